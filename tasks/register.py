"""The ``register`` stage task: the variant's MLflow run and model version (work:
:mod:`pipeline.stages.register`). Never cached by Prefect: the registry is the record (idempotent on the
variant key), so a fresh registry gets its version."""

from __future__ import annotations

from typing import Any

from pipeline.results import (
    CalibrationResult,
    EvaluationResult,
    FetchResult,
    PruneResult,
    QuantizeResult,
    RatesResult,
    RecoverResult,
    StatisticsResult,
)
from pipeline.stages.register import VariantStages, register_variant
from tasks.stage import as_state, stage_task


@stage_task("register", retry_delay_seconds=3)
def register_task(store: dict[str, Any], job: dict[str, Any], model: FetchResult, calib: CalibrationResult,
                  stats: StatisticsResult, rates: RatesResult, prune: PruneResult, evaluation: EvaluationResult,
                  baseline: EvaluationResult | None, stage_seconds: dict[str, float] | None = None,
                  recover: RecoverResult | None = None, before: EvaluationResult | None = None,
                  quantize: QuantizeResult | None = None):
    stages = VariantStages(model, calib, stats, rates, prune, evaluation, baseline, recover=recover, before=before,
                           quantize=quantize)
    return as_state(register_variant(store, job, stages, stage_seconds))
