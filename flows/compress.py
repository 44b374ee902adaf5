"""The ``compress`` flow: one job, end to end, resumable.

    fetch -> calibration -> statistics -> rates -> prune -> baseline (dense) + evaluate -> register

Every stage is a thin Prefect task over ``dlp/`` (see ``tasks/``); they pass small manifests (URI, sha256,
key figures), never models or tensors. Big things live in the artifact store (``<workdir>/artifacts`` or
``s3://bucket/prefix``); the stage's content key decides whether it runs (see :mod:`pipeline.cache`). Run the
same job again and only what did not finish runs; change alpha and only rates -> prune -> evaluate ->
register run; change the calibration and statistics and everything after run.

The store's manifests are the only cache; Prefect persists nothing (a served stage shows as ``Cached``).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Mapping

from prefect import flow

from pipeline.jobconfig import resolve_job
from pipeline.cache import StoreSpec, stage_logger
from tasks.evaluate import baseline_task, evaluate_task, evaluation_spec
from tasks.fetch import fetch_task
from tasks.prune import prune_task
from tasks.rates import chosen_allocation, rates_task
from tasks.register import register_task
from tasks.statistics import calibration_task, statistics_task

log = logging.getLogger("dlp.pipeline")

STAGES = ("fetch", "calibration", "statistics", "rates", "prune", "baseline", "evaluate", "register")

__all__ = ["STAGES", "compress", "search_settings", "resolve_job", "store_spec", "summarize"]


# ============================================================================================ job / store
def store_spec(cfg) -> StoreSpec:
    from pipeline.s3 import resolve_s3_endpoint

    uri = cfg.storage_uri
    endpoint = resolve_s3_endpoint(cfg.storage.endpoint_url) if uri.startswith("s3://") else None
    return StoreSpec(uri=uri, workdir=cfg.workdir, endpoint_url=endpoint, region=cfg.storage.region)


def model_settings(cfg) -> dict[str, Any]:
    return {"dtype": cfg.model.dtype, "device": cfg.model.device, "trust_remote_code": cfg.model.trust_remote_code,
            "batch_size": None}


def alloc_settings(cfg) -> dict[str, Any]:
    p = cfg.pruning
    return {"allocation": p.allocation, "sparsity": p.sparsity, "alpha": p.alpha, "statistic": p.statistic,
            "owl_m": p.owl_m, "owl_lambda": p.owl_lambda}


def search_settings(cfg) -> dict[str, Any] | None:
    """The alpha search's settings (``pruning.alpha: auto`` / ``statistic: auto`` under DLP), else None --
    so a fixed-alpha job's rates key is unchanged."""
    p = cfg.pruning
    if p.allocation != "dlp" or (p.alpha != "auto" and p.statistic != "auto"):
        return None
    return {"method": p.method, "pattern": p.pattern, "mode": p.mode, "heldout": p.search.heldout,
            "budget": p.search.budget, "confirm": p.search.confirm, "data_dir": cfg.data_dir}


def rates_inputs(cfg, calib: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of the rates task besides store/model/stats."""
    search = search_settings(cfg)
    out: dict[str, Any] = {"alloc": alloc_settings(cfg), "settings": model_settings(cfg)}
    if search is not None:
        out.update(calib=calib, search=search)
    return out


def prune_params(cfg) -> dict[str, Any]:
    p = cfg.pruning
    return {"method": p.method, "mode": p.mode, "pattern": p.pattern, **model_settings(cfg)}


# ============================================================================================ running stages
def stage_record(state: Any, result: Mapping[str, Any] | None, seconds: float) -> dict[str, Any]:
    result = result or {}
    manifest = result.get("manifest") or {}
    computed = bool(result.get("computed", True)) and getattr(state, "name", "") != "Cached"
    compute_s = 0.0
    if computed:
        compute_s = float(result.get("compute_seconds") or (manifest.get("figures") or {}).get("compute_seconds") or 0.0)
    uri = manifest.get("uri")
    if result.get("stage") == "register":
        uri = (result.get("registered") or {}).get("model_uri")
    return {"cached": not computed, "seconds": round(seconds, 3), "compute_seconds": round(compute_s, 3), "uri": uri,
            "state": getattr(state, "name", None)}


def call_stage(task_obj, stages: dict[str, Any], stage: str, **kwargs: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    state = task_obj(**kwargs, return_state=True)
    result = state.result()  # re-raises the stage's exception: the flow fails, a rerun resumes
    stages[stage] = stage_record(state, result, time.perf_counter() - t0)
    return result


def summarize(cfg, model: Mapping[str, Any], stats: Mapping[str, Any], rates: Mapping[str, Any],
              prune: Mapping[str, Any], evaluation: Mapping[str, Any], baseline: Mapping[str, Any] | None,
              registered: Mapping[str, Any], stages: Mapping[str, Any]) -> dict[str, Any]:
    reg = registered["registered"]
    pf = prune["manifest"]["figures"]
    rf = rates["manifest"]["figures"]
    stat = rf.get("block_statistic") or []
    per_block = [
        {"block": i, "target": float(t), "achieved": float(a), "statistic": float(stat[i]) if i < len(stat) else None}
        for i, (t, a) in enumerate(zip(pf["target_per_block"], pf["achieved_per_block"]))
    ]
    zs = None
    if evaluation.get("zero_shot"):
        dense = (baseline or {}).get("zero_shot") or {}
        tasks_out = {}
        for name, t in (evaluation["zero_shot"].get("tasks") or {}).items():
            d = ((dense.get("tasks") or {}).get(name) or {})
            entry = {"acc": t.get("acc"), "acc_dense": d.get("acc")}
            if t.get("acc") is not None and d.get("acc") is not None:
                entry["acc_delta"] = t["acc"] - d["acc"]
            if t.get("acc_norm") is not None:
                entry["acc_norm"] = t["acc_norm"]
                entry["acc_norm_dense"] = d.get("acc_norm")
            tasks_out[name] = entry
        mean, mean_d = evaluation["zero_shot"].get("mean_acc"), dense.get("mean_acc")
        zs = {"tasks": tasks_out, "mean_acc": mean, "mean_acc_dense": mean_d,
              "mean_acc_delta": (mean - mean_d) if mean is not None and mean_d is not None else None,
              "limit": evaluation["zero_shot"].get("limit")}
    ref = model["ref"]
    return {
        "registered_name": reg["name"],
        "version": str(reg["version"]),
        "model_uri": reg["model_uri"],
        "alias_uri": f"models:/{reg['name']}@{reg['alias'] or cfg.registry.alias}",
        "run_id": reg.get("run_id"),
        "variant_key": registered["key"],
        "variant": cfg.variant_name(),
        "allocation": {"allocation": cfg.pruning.allocation, **chosen_allocation(rates)},
        "alpha_search": rf.get("alpha_search"),
        "dense_ppl": (baseline or {}).get("ppl"),
        "pruned_ppl": evaluation.get("ppl"),
        "achieved_sparsity": float(pf["achieved_sparsity"]),
        "target_sparsity": float(cfg.pruning.sparsity),
        "per_block": per_block,
        "zero_shot": zs,
        "stages": dict(stages),
        "base_model": {"source": ref["source"], "revision": ref.get("revision"), "fingerprint": ref["fingerprint"]},
        "checkpoint_uri": prune["manifest"]["uri"],
        "checkpoint_sha256": prune["manifest"]["sha256"],
        "weights_sha256": pf.get("weights_sha256"),
        "workdir": cfg.workdir,
        "store": cfg.storage_uri,
    }


def prepare(cfg, stages: dict[str, Any]):
    """Preflight, store, result storage, and the shared front of the pipeline (fetch, calibration,
    statistics, dense baseline). Returns (spec, model, calib, stats, eval_spec, baseline)."""
    from pipeline.preflight import run_preflight

    logger = stage_logger("compress")
    for line in run_preflight(cfg):
        logger.info("preflight: %s", line)
    spec = store_spec(cfg)
    store = spec.as_dict()
    settings = model_settings(cfg)
    model = call_stage(fetch_task, stages, "fetch", store=store, source=cfg.model.source,
                       revision=cfg.model.revision)
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
    evaluation = call_stage(evaluate_task, stages, "evaluate", store=store,
                            target={"kind": "pruned", "prune": pruned, "model": model}, spec=espec)
    registered = call_stage(register_task, stages, "register", store=store, job=cfg.model_dump(mode="json"),
                            model=model, calib=calib, stats=stats, rates=rates, prune=pruned, evaluation=evaluation,
                            baseline=baseline)
    summary = summarize(cfg, model, stats, rates, pruned, evaluation, baseline, registered, stages)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    logger.info("compress: done in %.1fs -- %s version %s (dense ppl %s, pruned ppl %s, sparsity %.4f)",
                summary["seconds"], summary["registered_name"], summary["version"], _fmt(summary["dense_ppl"]),
                _fmt(summary["pruned_ppl"]), summary["achieved_sparsity"])
    return summary


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"
