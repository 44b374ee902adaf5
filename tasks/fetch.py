"""The ``fetch`` stage task: resolve the base model (work: :mod:`pipeline.stages.fetch`)."""

from __future__ import annotations

from typing import Any

from pipeline.stages.fetch import fetch_model
from tasks.stage import as_state, stage_task


@stage_task("fetch")
def fetch_task(store: dict[str, Any], source: str, revision: str | None = None):
    return as_state(fetch_model(store, source, revision))
