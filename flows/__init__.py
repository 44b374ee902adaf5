"""Prefect flows of the DLP pipeline (outermost layer: flows -> tasks -> dlp).

- :func:`flows.compress.compress` -- one job: fetch -> calibration -> statistics -> rates -> prune ->
  baseline/evaluate -> register; returns a JSON-able summary.
- :func:`flows.sweep.sweep` -- statistics once, many variants fanned out through a task runner.
- :mod:`flows.cli_commands` -- ``dlp compress`` / ``dlp sweep`` (registered on the ``dlp`` Typer app).

Importing this package does not import prefect; import the submodules for the flows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

__all__ = ["resolve_job"]


def resolve_job(job: Mapping[str, Any] | None = None, job_file: str | os.PathLike[str] | None = None,
                overrides: Mapping[str, Any] | None = None):
    """The validated :class:`tasks.jobconfig.JobConfig` (demo job when neither job nor job_file is given),
    with the workdir and data folder made absolute. Raises JobError / DLPError (one line)."""
    from dlp.errors import DLPError
    from tasks.jobconfig import DEMO_JOB, JobError, load_job, load_job_data

    if job is not None and job_file is not None:
        raise JobError("give either a job mapping or a job file, not both")
    if job is None:
        cfg = load_job(job_file if job_file is not None else DEMO_JOB, overrides)
    else:
        cfg = load_job_data(job, overrides)
    cfg.workdir = str(cfg.workdir_path)
    if cfg.data_dir:
        cfg.data_dir = str(Path(cfg.data_dir).expanduser().resolve())
    return cfg
