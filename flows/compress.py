"""The ``compress`` flow: one job, end to end, resumable.

    fetch -> calibration -> statistics -> rates -> prune [-> recover] [-> quantize] -> baseline (dense) + evaluate
    -> register

The stages after prune that change the model (``recover`` when the job has a ``recovery:`` block, then
``quantize`` when it has a ``quantization:`` block) each take the current final checkpoint and return the next;
evaluate and register read whichever came last (a quantized checkpoint is evaluated on its load-back).

Every stage is a thin Prefect task (``tasks/``) over its work in :mod:`pipeline.stages`; they pass small typed
results (:mod:`pipeline.results`: manifest URI, sha256, key figures), never models or tensors. Big things live in the artifact store (``<workdir>/artifacts`` or
``s3://bucket/prefix``); the stage's content key decides whether it runs (see :mod:`pipeline.cache`). Run the
same job again and only what did not finish runs; change alpha and only rates -> prune -> evaluate ->
register run; change the calibration and statistics and everything after run.

The store's manifests are the only cache; Prefect persists nothing (a served stage shows as ``Cached``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prefect import flow

from pipeline.cache import stage_logger
from pipeline.jobconfig import resolve_job
from pipeline.stage_inputs import model_settings, prune_params, rates_inputs, resolve_dtype, store_spec
from pipeline.stages.evaluate import checkpoint_target, evaluation_spec
from pipeline.stages.quantize import check_quantization, quantize_params
from pipeline.stages.recover import check_recovery, recovery_params
from pipeline.summary import recovery_summary, stage_record, summarize
from tasks.evaluate import baseline_task, evaluate_task
from tasks.fetch import fetch_task
from tasks.prune import prune_task
from tasks.quantize import quantize_task
from tasks.rates import rates_task
from tasks.recover import recover_task
from tasks.register import register_task
from tasks.statistics import calibration_task, statistics_task

log = logging.getLogger("dlp.pipeline")

STAGES = ("fetch", "calibration", "statistics", "rates", "prune", "baseline", "evaluate", "register")
#: the stages a job with a ``recovery:`` block adds (the pruned model's evaluation, then the LoRA recovery)
RECOVERY_STAGES = ("evaluate_pruned", "recover")
#: the stage a job with a ``quantization:`` block adds
QUANTIZE_STAGES = ("quantize",)

__all__ = ["QUANTIZE_STAGES", "RECOVERY_STAGES", "STAGES", "call_stage", "compress", "prepare"]


def call_stage(task_obj, stages: dict[str, Any], stage: str, **kwargs: Any) -> Any:
    """Run one stage task; its record goes into ``stages``. A failed stage re-raises: the flow fails, a rerun
    resumes."""
    t0 = time.perf_counter()
    state = task_obj(**kwargs, return_state=True)
    result = state.result()
    stages[stage] = stage_record(state.name, result, time.perf_counter() - t0)
    return result


def prepare(cfg, stages: dict[str, Any]):
    """Preflight, store, result storage, and the shared front of the pipeline (fetch, calibration,
    statistics, dense baseline). Returns (spec, model, calib, stats, eval_spec, baseline)."""
    from pipeline.preflight import check_disk_for_model, run_preflight

    logger = stage_logger("compress")
    for line in run_preflight(cfg):
        logger.info("preflight: %s", line)
    spec = store_spec(cfg)
    store = spec.as_dict()
    model = call_stage(fetch_task, stages, "fetch", store=store, source=cfg.model.source,
                       revision=cfg.model.revision)
    resolve_dtype(cfg, model)
    logger.info("preflight: %s", check_disk_for_model(cfg, model.ref.path, cfg.model.dtype))
    if cfg.recovery is not None:  # bad targets / too little training text: fail before any calibration
        logger.info("preflight: %s", check_recovery(recovery_params(cfg), model.ref.path))
    if cfg.quantization is not None:  # the model's config only: fails before any weight is loaded
        logger.info("preflight: %s", check_quantization(cfg, model.ref.path))
    settings = model_settings(cfg)
    c = cfg.calibration
    calib = call_stage(calibration_task, stages, "calibration", store=store, model=model,
                       source=c.source, nsamples=c.nsamples, seqlen=c.seqlen, seed=c.seed, data_dir=cfg.data_dir,
                       trust_remote_code=cfg.model.trust_remote_code)
    stats = call_stage(statistics_task, stages, "statistics", store=store, model=model, calib=calib,
                       settings=settings)
    espec = evaluation_spec(cfg)
    baseline = call_stage(baseline_task, stages, "baseline", store=store,
                          target={"kind": "dense", "model": model}, spec=espec)
    return spec, model, calib, stats, espec, baseline


# ============================================================================================ the flow
@flow(name="compress", log_prints=False)
def compress(job: dict | None = None, job_file: str | None = None, overrides: dict | None = None) -> dict:
    """Compress one model with one DLP variant; returns the JSON-able summary (see the module docstring).

    ``job``: a job mapping (the YAML document); ``job_file``: a YAML path; neither: the offline demo job.
    ``overrides``: dotted keys, e.g. ``{"pruning.alpha": 0.2, "model.source": "/snapshots/abc"}``."""
    t0 = time.perf_counter()
    cfg = resolve_job(job, job_file, overrides)
    logger = stage_logger("compress")
    logger.info("compress: %s (%s) into %s", cfg.model.source, cfg.variant_name(), cfg.storage_uri)
    stages: dict[str, Any] = {}
    spec, model, calib, stats, espec, baseline = prepare(cfg, stages)
    store = spec.as_dict()
    rates = call_stage(rates_task, stages, "rates", store=store, model=model, stats=stats,
                       **rates_inputs(cfg, calib))
    pruned = call_stage(prune_task, stages, "prune", store=store, model=model, calib=calib,
                        stats=stats, rates=rates, params=prune_params(cfg))
    final, recovered, before, quantized = pruned, None, None, None  # final: the checkpoint evaluate + register read
    if cfg.recovery is not None:
        before = call_stage(evaluate_task, stages, "evaluate_pruned", store=store,
                            target=checkpoint_target(pruned, model), spec=espec)
        final = recovered = call_stage(recover_task, stages, "recover", store=store, model=model, prune=pruned,
                                       params=recovery_params(cfg))
    if cfg.quantization is not None:
        final = quantized = call_stage(quantize_task, stages, "quantize", store=store, model=model, calib=calib,
                                       source=final, params=quantize_params(cfg))
    evaluation = call_stage(evaluate_task, stages, "evaluate", store=store, target=checkpoint_target(final, model),
                            spec=espec)
    registered = call_stage(register_task, stages, "register", store=store, job=cfg.model_dump(mode="json"),
                            model=model, calib=calib, stats=stats, rates=rates, prune=pruned, evaluation=evaluation,
                            baseline=baseline, recover=recovered, before=before, quantize=quantized)
    summary = summarize(cfg, model, rates, pruned, evaluation, baseline, registered, stages, quantize=quantized)
    if recovered is not None:
        summary.update(recovery_summary(recovered, before, evaluation))
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    logger.info("compress: done in %.1fs -- %s version %s (dense ppl %s, pruned ppl %s, sparsity %.4f)",
                summary["seconds"], summary["registered_name"], summary["version"], _fmt(summary["dense_ppl"]),
                _fmt(summary["pruned_ppl"]), summary["achieved_sparsity"])
    return summary


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"
