"""The ``log-sweep`` task: the sweep's MLflow run with its comparison table and plot (work:
:func:`pipeline.sweep_report.log_sweep`)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.sweep_report import log_sweep


@task(name="log-sweep", cache_policy=NO_CACHE)
def log_sweep_task(job: dict[str, Any], rows: list[dict[str, Any]], sweep_key: str, axes: dict[str, Any],
                   dense_ppl: float | None) -> dict[str, Any]:
    return log_sweep(job, rows, sweep_key, axes, dense_ppl)
