"""The optional ``quantize`` stage task: the W4A16 / W8A16 checkpoint of the latest checkpoint (work:
:mod:`pipeline.stages.quantize`)."""

from __future__ import annotations

from typing import Any

from pipeline.results import CalibrationResult, FetchResult, StageResult
from pipeline.stages.quantize import run_quantize
from tasks.stage import as_state, stage_task


@stage_task("quantize")
def quantize_task(store: dict[str, Any], model: FetchResult, calib: CalibrationResult, source: StageResult,
                  params: dict[str, Any]):
    return as_state(run_quantize(store, model, calib, source, params))
