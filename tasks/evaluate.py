"""The ``evaluate`` (pruned) and ``baseline`` (dense) stage tasks (work: :mod:`pipeline.stages.evaluate`).

``target``: ``{"kind": "dense", "model": FetchResult}`` or ``{"kind": "pruned", "prune": PruneResult,
"model": FetchResult}`` (a mapping, so Prefect resolves the futures a sweep passes in it)."""

from __future__ import annotations

from typing import Any

from pipeline.stages.evaluate import run_evaluation
from tasks.stage import as_state, stage_task


@stage_task("evaluate")
def evaluate_task(store: dict[str, Any], target: dict[str, Any], spec: dict[str, Any]):
    return as_state(run_evaluation(store, target, spec, "evaluate"))


@stage_task("baseline")
def baseline_task(store: dict[str, Any], target: dict[str, Any], spec: dict[str, Any]):
    return as_state(run_evaluation(store, target, spec, "baseline"))
