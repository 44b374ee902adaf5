"""The ``rates`` stage task: per-block sparsity (work, the alpha search included:
:mod:`pipeline.stages.rates`)."""

from __future__ import annotations

from typing import Any

from pipeline.results import CalibrationResult, FetchResult, StatisticsResult
from pipeline.stages.rates import compute_rates
from tasks.stage import as_state, stage_task


@stage_task("rates")
def rates_task(store: dict[str, Any], model: FetchResult, stats: StatisticsResult, alloc: dict[str, Any],
               settings: dict[str, Any], calib: CalibrationResult | None = None, search: dict[str, Any] | None = None):
    return as_state(compute_rates(store, model, stats, alloc, settings, calib, search))
