"""Stage 6 -- register the variant in MLflow 3 (one run per variant, a new model version, alias, lineage).

Thin over :func:`pipeline.registry.log_variant_run`, which is idempotent on the **variant key** (the prune key +
the evaluation key): registering the same variant again creates nothing. So this task is never cached by
Prefect -- the registry itself is the record, and a fresh registry (another machine, a wiped workdir) gets
its version. The checkpoint is read from the store (downloaded only when a new version must be logged).

Logged: params (the full resolved job), metrics (dense and pruned perplexity, achieved sparsity overall and
per block, per-stage compute seconds, zero-shot accuracies with their delta to the dense model), artifacts
(per-block sparsity JSON + PNG via log_variant_run; ``config/job.yaml``, ``pipeline/manifests.json`` and
``evaluation/zero_shot.json`` as documents; the alpha search's curve), the pruned checkpoint (transformers
flavor) registered as a new version with lineage tags and the alias moved to it.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.cache import StoreSpec, content_key, hook, materialize, retry_on_storage_error, stage_lock, stage_logger
from tasks.rates import chosen_allocation

_REGISTER_LOCK = threading.Lock()  # one registration at a time per process (SQLite registry, fluent MLflow API)


def variant_key(prune: Mapping[str, Any], evaluation: Mapping[str, Any]) -> str:
    return content_key("variant", prune=prune["key"], evaluation=evaluation["key"])


def _ppl_metrics(evaluation: Mapping[str, Any], baseline: Mapping[str, Any] | None) -> dict[str, float]:
    m: dict[str, float] = {}
    if evaluation.get("ppl") is not None:
        m["ppl.pruned"] = float(evaluation["ppl"])
    if baseline and baseline.get("ppl") is not None:
        m["ppl.dense"] = float(baseline["ppl"])
        if "ppl.pruned" in m:
            m["ppl.delta"] = m["ppl.pruned"] - m["ppl.dense"]
            m["ppl.ratio"] = m["ppl.pruned"] / m["ppl.dense"]
    return m


def _zero_shot_metrics(zs: Mapping[str, Any], dense_zs: Mapping[str, Any]) -> dict[str, float]:
    """Per-task ``zeroshot.<task>.<acc|acc_norm>`` with ``_dense`` / ``_delta``, and the means with ``_delta``."""
    m: dict[str, float] = {}
    dense_tasks = dense_zs.get("tasks") or {}
    for name, t in (zs.get("tasks") or {}).items():
        for metric in ("acc", "acc_norm"):
            v = t.get(metric)
            if v is None:
                continue
            m[f"zeroshot.{name}.{metric}"] = float(v)
            d = (dense_tasks.get(name) or {}).get(metric)
            if d is not None:
                m[f"zeroshot.{name}.{metric}_dense"] = float(d)
                m[f"zeroshot.{name}.{metric}_delta"] = float(v) - float(d)
    for metric in ("mean_acc", "mean_acc_norm"):
        if zs.get(metric) is not None:
            m[f"zeroshot.{metric}"] = float(zs[metric])
            if dense_zs.get(metric) is not None:
                m[f"zeroshot.{metric}_delta"] = float(zs[metric]) - float(dense_zs[metric])
    return m


def variant_metrics(
    prune: Mapping[str, Any],
    evaluation: Mapping[str, Any],
    baseline: Mapping[str, Any] | None,
    stage_seconds: Mapping[str, float | None] | None = None,
) -> dict[str, float]:
    """Sparsity, perplexity (pruned, dense, delta, ratio), zero-shot (with deltas to dense), stage seconds."""
    pf = prune["manifest"]["figures"]
    m: dict[str, float] = {
        "sparsity.achieved": float(pf["achieved_sparsity"]),
        "sparsity.target": float(sum(pf["target_per_block"]) / len(pf["target_per_block"])),
    }
    m.update(_ppl_metrics(evaluation, baseline))
    m.update(_zero_shot_metrics(evaluation.get("zero_shot") or {}, (baseline or {}).get("zero_shot") or {}))
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


def _figure(stage: Mapping[str, Any], name: str) -> Any:
    return stage["manifest"]["figures"].get(name)


def recorded_stage_seconds(calib: Mapping[str, Any], stats: Mapping[str, Any], rates: Mapping[str, Any],
                           prune: Mapping[str, Any], evaluation: Mapping[str, Any],
                           baseline: Mapping[str, Any] | None) -> dict[str, float | None]:
    """The recorded compute time of each stage's artifact (stable across reruns)."""
    seconds: dict[str, float | None] = {s["stage"]: _figure(s, "compute_seconds") for s in (calib, stats, rates, prune)}
    for label, ev in (("evaluate", evaluation), ("baseline", baseline)):
        if ev:
            seconds[label] = sum(float(_figure(p, "compute_seconds") or 0.0) for p in ev.get("parts", {}).values())
    return seconds


def variant_lineage(cfg: Any, model: Mapping[str, Any], calib: Mapping[str, Any], rates: Mapping[str, Any],
                    prune: Mapping[str, Any]) -> dict[str, Any]:
    """The lineage fields of the variant (tagged ``dlp.<field>`` on its run and version)."""
    p = cfg.pruning
    dlp = p.allocation == "dlp"
    chosen = chosen_allocation(rates)
    searched = dlp and bool(_figure(rates, "alpha_search"))
    return {
        "base_model": model["ref"]["source"],
        "base_revision": model["ref"].get("revision"),
        "base_hash": model["ref"]["fingerprint"],
        "method": p.method,
        "allocation": p.allocation,
        "statistic": chosen["statistic"] if dlp else None,
        "sparsity": p.sparsity,
        "alpha": chosen["alpha"] if dlp else None,
        "alpha_requested": p.alpha if searched else None,
        "statistic_requested": p.statistic if searched else None,
        "pattern": p.pattern,
        "calibration_fingerprint": _figure(calib, "fingerprint"),
        "artifact_uri": prune["manifest"]["uri"],
    }


def variant_documents(cfg: Any, stages: Sequence[Mapping[str, Any]], evaluation: Mapping[str, Any],
                      baseline: Mapping[str, Any] | None) -> dict[str, Any]:
    """The job YAML, the pipeline manifests and the zero-shot reports, by artifact file."""
    manifests: dict[str, Any] = {s["stage"]: s["manifest"] for s in stages if s}
    manifests["evaluate"] = {k: v["manifest"] for k, v in evaluation.get("parts", {}).items()}
    if baseline:
        manifests["baseline"] = {k: v["manifest"] for k, v in baseline.get("parts", {}).items()}
    docs: dict[str, Any] = {"config/job.yaml": cfg.to_yaml(), "pipeline/manifests.json": manifests}
    if evaluation.get("zero_shot"):
        docs["evaluation/zero_shot.json"] = {"pruned": evaluation["zero_shot"],
                                             "dense": (baseline or {}).get("zero_shot")}
    return docs


def _fetch_alpha_search(spec: StoreSpec, found: Mapping[str, Any], folder: Path) -> Path:
    """The alpha search's proxy curve (JSON + PNG), copied from the store to ``folder``."""
    st = spec.open()
    folder.mkdir(parents=True, exist_ok=True)
    for part in ("curve_key", "plot_key"):
        st.get_file(found[part], folder / Path(found[part]).name)
    return folder


def _log_outcome(logger: Any, result: Mapping[str, Any], secs: float) -> bool:
    computed = not result["reused"]
    hook("register", "computed" if computed else "hit")
    if computed:
        logger.info("register: %s version %s (alias %s) in %.1fs", result["name"], result["version"],
                    result["alias"], secs)
    else:
        logger.info("register: variant already registered as %s version %s", result["name"], result["version"])
    return computed


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

    spec, cfg = StoreSpec.of(store), JobConfig.model_validate(dict(job))
    if stage_seconds is None:
        stage_seconds = recorded_stage_seconds(calib, stats, rates, prune, evaluation, baseline)
    vkey, name, workdir = variant_key(prune, evaluation), cfg.registry.model_name, cfg.workdir_path
    rf, found = rates["manifest"]["figures"], _figure(rates, "alpha_search")
    t0 = time.perf_counter()
    with _REGISTER_LOCK, tempfile.TemporaryDirectory(prefix="dlp-register-") as tmp:
        client = registry.get_client(cfg.registry.tracking_uri, workdir)
        new = registry.find_version_by_variant_key(name, vkey, client=client) is None
        if new:
            hook("register", "start")
        result = registry.log_variant_run(
            registered_name=name, variant_key=vkey,
            checkpoint_dir=materialize(spec, prune["manifest"]) if new else workdir,  # not read when registered
            params=cfg.model_dump(mode="json"),
            metrics={**variant_metrics(prune, evaluation, baseline, stage_seconds), **search_metrics(found)},
            block_sparsity=_figure(prune, "achieved_per_block"), block_target=rf["ratios"],
            block_statistic=rf.get("block_statistic"), statistic_name=rf.get("statistic_name", "block statistic"),
            lineage=variant_lineage(cfg, model, calib, rates, prune),
            experiment=cfg.registry.experiment, artifact_location=cfg.registry.artifact_location,
            run_name=cfg.variant_name(), tracking_uri=cfg.registry.tracking_uri, workdir=workdir,
            alias=cfg.registry.alias,
            documents=variant_documents(cfg, (model, calib, stats, rates, prune), evaluation, baseline),
            extra_artifacts={"alpha_search": _fetch_alpha_search(spec, found, Path(tmp) / "alpha_search")}
            if found and new else None,
            extra_tags={"dlp.job_name": cfg.name} if cfg.name else None,
        )
    secs = round(time.perf_counter() - t0, 3)
    computed = _log_outcome(stage_logger("register"), result, secs)
    return {"stage": "register", "key": vkey, "computed": computed, "registered": result,
            "compute_seconds": secs if computed else 0.0}


@task(name="register", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=3, retry_condition_fn=retry_on_storage_error)
def register_task(store: dict[str, Any], job: dict[str, Any], model: dict[str, Any], calib: dict[str, Any],
                  stats: dict[str, Any], rates: dict[str, Any], prune: dict[str, Any], evaluation: dict[str, Any],
                  baseline: dict[str, Any] | None, stage_seconds: dict[str, float] | None = None) -> dict[str, Any]:
    # one registration per variant among overlapping runs in a work dir: the second finds the first's version
    with stage_lock(StoreSpec.of(store), "register", variant_key(prune, evaluation)):
        return register_variant(store, job, model, calib, stats, rates, prune, evaluation, baseline, stage_seconds)
