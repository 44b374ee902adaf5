"""The ``recover`` stage task: LoRA recovery of the pruned checkpoint (work: :mod:`pipeline.stages.recover`)."""

from __future__ import annotations

from typing import Any

from pipeline.results import FetchResult, PruneResult
from pipeline.stages.recover import run_recover
from tasks.stage import as_state, stage_task


@stage_task("recover")
def recover_task(store: dict[str, Any], model: FetchResult, prune: PruneResult, params: dict[str, Any]):
    return as_state(run_recover(store, model, prune, params))
