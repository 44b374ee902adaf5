"""The ``calibration`` and ``statistics`` stage tasks (work: :mod:`pipeline.stages.statistics`)."""

from __future__ import annotations

from typing import Any

from pipeline.results import CalibrationResult, FetchResult
from pipeline.stages.statistics import calibration_windows, collect
from tasks.stage import as_state, stage_task


@stage_task("calibration")
def calibration_task(store: dict[str, Any], model: FetchResult, source: str, nsamples: int, seqlen: int, seed: int,
                     data_dir: str | None = None, trust_remote_code: bool = False):
    return as_state(calibration_windows(store, model, source, nsamples, seqlen, seed, data_dir, trust_remote_code))


@stage_task("statistics")
def statistics_task(store: dict[str, Any], model: FetchResult, calib: CalibrationResult, settings: dict[str, Any]):
    return as_state(collect(store, model, calib, settings))
