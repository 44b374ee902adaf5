"""The ``prune`` stage task: the pruned checkpoint (work: :mod:`pipeline.stages.prune`)."""

from __future__ import annotations

from typing import Any

from pipeline.results import CalibrationResult, FetchResult, RatesResult, StatisticsResult
from pipeline.stages.prune import run_prune
from tasks.stage import as_state, stage_task


@stage_task("prune")
def prune_task(store: dict[str, Any], model: FetchResult, calib: CalibrationResult, stats: StatisticsResult,
               rates: RatesResult, params: dict[str, Any]):
    return as_state(run_prune(store, model, calib, stats, rates, params))
