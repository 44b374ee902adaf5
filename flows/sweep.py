"""The ``sweep`` flow: statistics ONCE, then many variants fanned out through a Prefect task runner.

    fetch -> calibration -> statistics -> baseline            (once, shared)
      \\-> for each (method, allocation, sparsity, alpha): rates -> prune -> evaluate -> register

The variants run through the flow's task runner: ``ThreadPoolTaskRunner`` by default, or
``prefect_dask.DaskTaskRunner`` (``sweep.with_options(task_runner=DaskTaskRunner(...))``, ``dlp sweep --dask``).
Every stage keeps its content key, so a rerun or a larger sweep reuses everything already computed. At the
end a comparison table and a plot (perplexity vs sparsity per allocation) are logged to MLflow in a
``sweep`` run (:mod:`pipeline.sweep_report`; one per distinct set of variants: a rerun reuses it).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.compress import prepare
from pipeline.cache import content_key, stage_logger
from pipeline.jobconfig import resolve_job
from pipeline.stage_inputs import expand_variants, prune_params, rates_inputs
from pipeline.stages.quantize import quantize_params
from pipeline.summary import stage_record, summarize
from pipeline.sweep_report import format_table, sweep_row
from tasks.evaluate import evaluate_task
from tasks.prune import prune_task
from tasks.rates import rates_task
from tasks.quantize import quantize_task
from tasks.register import register_task
from tasks.sweep_log import log_sweep_task

log = logging.getLogger("dlp.pipeline")

__all__ = ["dask_runner", "expand_variants", "sweep"]


def _submit(v, shared: dict[str, Any]) -> dict[str, Any]:
    """rates -> prune -> evaluate -> register of one variant, submitted to the task runner (futures)."""
    store, model, calib, stats = shared["store"], shared["model"], shared["calib"], shared["stats"]
    rates_f = rates_task.submit(store=store, model=model, stats=stats, **rates_inputs(v, calib))
    prune_f = prune_task.submit(store=store, model=model, calib=calib, stats=stats, rates=rates_f,
                                params=prune_params(v))
    futures = {"rates": rates_f, "prune": prune_f}
    target = {"kind": "pruned", "prune": prune_f, "model": model}
    if v.quantization is not None:
        futures["quantize"] = quantize_task.submit(store=store, model=model, calib=calib, source=prune_f,
                                                   params=quantize_params(v))
        target = {"kind": "quantized", "quantize": futures["quantize"], "model": model}
    futures["evaluate"] = evaluate_task.submit(store=store, target=target, spec=shared["espec"])
    futures["register"] = register_task.submit(
        store=store, job=v.model_dump(mode="json"), model=model, calib=calib, stats=stats, rates=rates_f,
        prune=prune_f, evaluation=futures["evaluate"], baseline=shared["baseline"], quantize=futures.get("quantize"))
    return futures


def _collect(v, futures: dict[str, Any], shared: dict[str, Any], stages: dict[str, Any], logger) -> dict | str:
    """The variant's summary, or the one-line error that stopped it (one failing variant loses no other)."""
    try:
        res = {name: f.result() for name, f in futures.items()}
    except Exception as e:  # noqa: BLE001
        msg = " ".join(str(e).split()) or type(e).__name__
        logger.error("sweep: variant %s failed: %s", v.variant_name(), msg)
        return f"{type(e).__name__}: {msg}"
    vstages = dict(stages)
    for name, f in futures.items():
        vstages[name] = stage_record(f.state.name, res[name], None)  # ran concurrently: no per-stage wall time
    return summarize(v, shared["model"], res["rates"], res["prune"], res["evaluate"], shared["baseline"],
                     res["register"], vstages, quantize=res.get("quantize"))


def _axes(base, variants) -> dict[str, Any]:
    return {"methods": sorted({v.pruning.method for v in variants}),
            "allocations": sorted({v.pruning.allocation for v in variants}),
            "sparsities": sorted({v.pruning.sparsity for v in variants}),
            "alphas": sorted({v.pruning.alpha for v in variants if v.pruning.allocation == "dlp"}, key=str),
            "model": base.model.source}


@flow(name="sweep", task_runner=ThreadPoolTaskRunner(max_workers=2))
def sweep(job: dict | None = None, job_file: str | None = None, overrides: dict | None = None,
          methods: list[str] | None = None, allocations: list[str] | None = None,
          sparsities: list[float] | None = None, alphas: list[float | Literal["auto"]] | None = None) -> dict:
    """Statistics once, then every variant (rates -> prune -> evaluate -> register) through the task runner.

    Returns ``{"variants": [compress-like summary per variant], "failed": [{"variant", "error"}],
    "table": str, "rows": [...], "stages": {shared stages}, "sweep_run_id", "dense_ppl"}``."""
    t0 = time.perf_counter()
    base = resolve_job(job, job_file, overrides)
    variants = expand_variants(base, methods, allocations, sparsities, alphas)  # bad axes fail before any stage
    logger = stage_logger("sweep")
    logger.info("sweep: %d variants of %s: %s", len(variants), base.model.source, ", ".join(v.variant_name() for v in variants))
    stages: dict[str, Any] = {}
    spec, model, calib, stats, espec, baseline = prepare(base, stages)
    variants = expand_variants(base, methods, allocations, sparsities, alphas)  # with the dtype prepare resolved
    shared = {"store": spec.as_dict(), "model": model, "calib": calib, "stats": stats, "espec": espec,
              "baseline": baseline}
    outcomes = [(v, _collect(v, f, shared, stages, logger)) for v, f in [(v, _submit(v, shared)) for v in variants]]
    summaries = [o for _, o in outcomes if isinstance(o, dict)]
    failed = [{"variant": v.variant_name(), "error": o} for v, o in outcomes if isinstance(o, str)]
    rows = [sweep_row(v, o if isinstance(o, dict) else None, o.split(": ", 1)[-1] if isinstance(o, str) else None)
            for v, o in outcomes]
    sweep_key = content_key("variant", sweep=sorted(s["variant_key"] for s in summaries),
                            failed=sorted(f["variant"] for f in failed))
    table = format_table(rows)
    logger.info("sweep: comparison\n%s", table)
    logged = log_sweep_task(job=base.model_dump(mode="json"), rows=rows, sweep_key=sweep_key,
                            axes=_axes(base, variants), dense_ppl=baseline.ppl)
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return {"task_runner": type(ctx.task_runner).__name__ if ctx is not None else None, "variants": summaries,
            "failed": failed, "rows": rows, "table": table, "stages": stages, "dense_ppl": baseline.ppl,
            "sweep_run_id": logged["run_id"], "sweep_key": sweep_key, "seconds": round(time.perf_counter() - t0, 3)}


def dask_runner(workers: int = 1, threads: int = 2, processes: bool = False):
    """A DaskTaskRunner on a local cluster (in-process workers by default: no extra interpreter startup)."""
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": threads, "processes": processes,
                                          "dashboard_address": None})

