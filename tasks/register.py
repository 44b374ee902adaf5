"""Stage 6 -- register the variant in MLflow 3 (one run per variant, a new model version, alias, lineage).

Thin over :func:`pipeline.registry.log_variant_run`, which is idempotent on the **variant key** (the prune key +
the evaluation key): registering the same variant again creates nothing. So this task is never cached by
Prefect -- the registry itself is the record, and a fresh registry (another machine, a wiped workdir) gets
its version. The checkpoint is read from the store (downloaded only when a new version must be logged).

Logged: params (the full resolved job), metrics (dense and pruned perplexity, achieved sparsity overall and
per block, per-stage compute seconds, zero-shot accuracies with their delta to the dense model), artifacts
(per-block sparsity JSON + PNG via log_variant_run, the job YAML, the pipeline manifests), the pruned
checkpoint (transformers flavor) registered as a new version with lineage tags and the alias moved to it.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.cache import StoreSpec, content_key, hook, materialize, retry_on_storage_error, stage_lock, stage_logger
from tasks.rates import chosen_allocation

_REGISTER_LOCK = threading.Lock()  # one registration at a time per process (SQLite registry, fluent MLflow API)


def variant_key(prune: Mapping[str, Any], evaluation: Mapping[str, Any]) -> str:
    return content_key("variant", prune=prune["key"], evaluation=evaluation["key"])


def variant_metrics(
    stats: Mapping[str, Any],
    prune: Mapping[str, Any],
    evaluation: Mapping[str, Any],
    baseline: Mapping[str, Any] | None,
    stage_seconds: Mapping[str, float] | None = None,
) -> dict[str, float]:
    pf = prune["manifest"]["figures"]
    m: dict[str, float] = {
        "sparsity.achieved": float(pf["achieved_sparsity"]),
        "sparsity.target": float(sum(pf["target_per_block"]) / len(pf["target_per_block"])),
    }
    if evaluation.get("ppl") is not None:
        m["ppl.pruned"] = float(evaluation["ppl"])
    if baseline and baseline.get("ppl") is not None:
        m["ppl.dense"] = float(baseline["ppl"])
        if "ppl.pruned" in m:
            m["ppl.delta"] = m["ppl.pruned"] - m["ppl.dense"]
            m["ppl.ratio"] = m["ppl.pruned"] / m["ppl.dense"]
    zs = evaluation.get("zero_shot") or {}
    dense_zs = (baseline or {}).get("zero_shot") or {}
    for name, t in (zs.get("tasks") or {}).items():
        for metric in ("acc", "acc_norm"):
            v = t.get(metric)
            if v is None:
                continue
            m[f"zeroshot.{name}.{metric}"] = float(v)
            d = ((dense_zs.get("tasks") or {}).get(name) or {}).get(metric)
            if d is not None:
                m[f"zeroshot.{name}.{metric}_dense"] = float(d)
                m[f"zeroshot.{name}.{metric}_delta"] = float(v) - float(d)
    for metric in ("mean_acc", "mean_acc_norm"):
        if zs.get(metric) is not None:
            m[f"zeroshot.{metric}"] = float(zs[metric])
            if dense_zs.get(metric) is not None:
                m[f"zeroshot.{metric}_delta"] = float(zs[metric]) - float(dense_zs[metric])
    for stage, secs in (stage_seconds or {}).items():
        if secs is not None:
            m[f"time.{stage}_s"] = float(secs)
    return m


def search_metrics(found: Mapping[str, Any] | None) -> dict[str, float]:
    """``alpha_search.*`` metrics of an ``alpha: auto`` variant (empty otherwise)."""
    if not found:
        return {}
    m = {"alpha_search.alpha": float(found["alpha"]), "alpha_search.evaluations": float(found["evaluations"]),
         "alpha_search.cached_candidates": float(found.get("cached_candidates") or 0),
         "alpha_search.seconds": float(found["cost"]["seconds"])}
    for name in ("proxy", "uniform_proxy"):
        if found.get(name) is not None:
            m[f"alpha_search.{name}"] = float(found[name])
    return m


def register_variant(
    store: Mapping[str, Any],
    job: Mapping[str, Any],
    model: Mapping[str, Any],
    calib: Mapping[str, Any],
    stats: Mapping[str, Any],
    rates: Mapping[str, Any],
    prune: Mapping[str, Any],
    evaluation: Mapping[str, Any],
    baseline: Mapping[str, Any] | None,
    stage_seconds: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Log + register the variant (idempotent); returns ``{"stage", "key", "computed", "registered"}``."""
    from pipeline import registry
    from pipeline.jobconfig import JobConfig

    spec = StoreSpec.of(store)
    cfg = JobConfig.model_validate(dict(job))
    if stage_seconds is None:  # the recorded compute time of each stage's artifact (stable across reruns)
        stage_seconds = {s["stage"]: s["manifest"]["figures"].get("compute_seconds") for s in (calib, stats, rates, prune)}
        for label, ev in (("evaluate", evaluation), ("baseline", baseline)):
            if ev:
                stage_seconds[label] = sum(float(p["manifest"]["figures"].get("compute_seconds") or 0.0)
                                           for p in ev.get("parts", {}).values())
    logger = stage_logger("register")
    vkey = variant_key(prune, evaluation)
    name = cfg.registry.model_name
    workdir = cfg.workdir_path
    t0 = time.perf_counter()
    with _REGISTER_LOCK:
        client = registry.get_client(cfg.registry.tracking_uri, workdir)
        existing = registry.find_version_by_variant_key(name, vkey, client=client)
        if existing is None:
            hook("register", "start")
            ckpt = materialize(spec, prune["manifest"])
        else:
            ckpt = workdir  # not read: log_variant_run returns the existing version
        rf = rates["manifest"]["figures"]
        pf = prune["manifest"]["figures"]
        p = cfg.pruning
        chosen = chosen_allocation(rates)
        found = rf.get("alpha_search")
        lineage = {
            "base_model": model["ref"]["source"],
            "base_revision": model["ref"].get("revision"),
            "base_hash": model["ref"]["fingerprint"],
            "method": p.method,
            "allocation": p.allocation,
            "statistic": chosen["statistic"] if p.allocation == "dlp" else None,
            "sparsity": p.sparsity,
            "alpha": chosen["alpha"] if p.allocation == "dlp" else None,
            "alpha_requested": p.alpha if p.allocation == "dlp" and found else None,
            "statistic_requested": p.statistic if p.allocation == "dlp" and found else None,
            "pattern": p.pattern,
            "calibration_fingerprint": calib["manifest"]["figures"]["fingerprint"],
            "artifact_uri": prune["manifest"]["uri"],
        }
        with tempfile.TemporaryDirectory(prefix="dlp-register-") as tmp:
            (Path(tmp) / "job.yaml").write_text(cfg.to_yaml())
            manifests = {s["stage"]: s["manifest"] for s in (model, calib, stats, rates, prune) if s}
            manifests["evaluate"] = {k: v["manifest"] for k, v in evaluation.get("parts", {}).items()}
            if baseline:
                manifests["baseline"] = {k: v["manifest"] for k, v in baseline.get("parts", {}).items()}
            (Path(tmp) / "manifests.json").write_text(json.dumps(manifests, indent=1, sort_keys=True))
            extra = {"config": Path(tmp) / "job.yaml", "pipeline": Path(tmp) / "manifests.json"}
            if found:  # the alpha search's proxy curve (JSON + PNG) beside the variant
                st, folder = spec.open(), Path(tmp) / "alpha_search"
                folder.mkdir()
                for part in ("curve_key", "plot_key"):
                    st.get_file(found[part], folder / Path(found[part]).name)
                extra["alpha_search"] = folder
            if evaluation.get("zero_shot"):
                (Path(tmp) / "zero_shot.json").write_text(json.dumps(
                    {"pruned": evaluation["zero_shot"], "dense": (baseline or {}).get("zero_shot")}, indent=1))
                extra["evaluation"] = Path(tmp) / "zero_shot.json"
            result = registry.log_variant_run(
                registered_name=name,
                variant_key=vkey,
                checkpoint_dir=ckpt,
                params=cfg.model_dump(mode="json"),
                metrics={**variant_metrics(stats, prune, evaluation, baseline, stage_seconds), **search_metrics(found)},
                block_sparsity=pf["achieved_per_block"],
                block_target=rf["ratios"],
                block_statistic=rf.get("block_statistic"),
                statistic_name=rf.get("statistic_name", "block statistic"),
                lineage=lineage,
                experiment=cfg.registry.experiment,
                artifact_location=cfg.registry.artifact_location,
                run_name=cfg.variant_name(),
                tracking_uri=cfg.registry.tracking_uri,
                workdir=workdir,
                alias=cfg.registry.alias,
                extra_artifacts=extra,
                extra_tags={"dlp.job_name": cfg.name} if cfg.name else None,
            )
    secs = round(time.perf_counter() - t0, 3)
    computed = not result["reused"]
    if computed:
        hook("register", "computed")
        logger.info("register: %s version %s (alias %s) in %.1fs", result["name"], result["version"], result["alias"], secs)
    else:
        hook("register", "hit")
        logger.info("register: variant already registered as %s version %s", result["name"], result["version"])
    return {"stage": "register", "key": vkey, "computed": computed, "registered": result, "compute_seconds": secs if computed else 0.0}


@task(name="register", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=3, retry_condition_fn=retry_on_storage_error)
def register_task(store: dict[str, Any], job: dict[str, Any], model: dict[str, Any], calib: dict[str, Any],
                  stats: dict[str, Any], rates: dict[str, Any], prune: dict[str, Any], evaluation: dict[str, Any],
                  baseline: dict[str, Any] | None, stage_seconds: dict[str, float] | None = None) -> dict[str, Any]:
    # one registration per variant among overlapping runs in a work dir: the second finds the first's version
    with stage_lock(StoreSpec.of(store), "register", variant_key(prune, evaluation)):
        return register_variant(store, job, model, calib, stats, rates, prune, evaluation, baseline, stage_seconds)
