"""Stage 6 -- register the variant in MLflow 3 (one run per variant, a new model version, alias, lineage).

Thin over :func:`pipeline.registry.log_variant_run`, which is idempotent on the **variant key** (the prune key +
the evaluation key): registering the same variant again creates nothing. So this task is never cached by
Prefect -- the registry itself is the record, and a fresh registry (another machine, a wiped workdir) gets
its version. The checkpoint is read from the store (downloaded only when a new version must be logged).

Logged: params (the full resolved job), metrics (dense and pruned perplexity, achieved sparsity overall and
per block, per-stage compute seconds, zero-shot accuracies with their delta to the dense model), artifacts
(per-block sparsity JSON + PNG via log_variant_run; ``config/job.yaml``, ``pipeline/manifests.json`` and
``evaluation/zero_shot.json`` as documents; the alpha search's curve), the pruned variant registered as a new
version with lineage tags and the alias moved to it: with ``registry.storage: masks`` (the default) a pyfunc model
holding only the bitmask (+ the changed survivors) over the base checkpoint, which is logged once per content
(:mod:`pipeline.mask_registry`); with ``dense`` the whole checkpoint (transformers flavor). A recovered variant
registers the recovered checkpoint instead, with what :mod:`pipeline.recovery_logging` adds (tag
``dlp.recovered=true``, its settings, perplexity and sparsity before / after, the loss curve); its variant key
includes the recover key.
"""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pipeline.cache import StoreSpec, content_key, hook, materialize, stage_lock, stage_logger
from pipeline.recovery_logging import (
    ADAPTER_ARTIFACT,
    loss_plot,
    recovery_documents,
    recovery_lineage,
    recovery_metrics,
    recovery_series,
    unmerged_adapter,
)
from pipeline.results import (
    CalibrationResult,
    EvaluationResult,
    FetchResult,
    PruneResult,
    QuantizeResult,
    RatesResult,
    RecoverResult,
    RegisterResult,
    Registration,
    StageResult,
    StatisticsResult,
)

_REGISTER_LOCK = threading.Lock()  # one registration at a time per process (SQLite registry, fluent MLflow API)


def variant_key(prune: PruneResult, evaluation: EvaluationResult, recover: RecoverResult | None = None,
                quantize: QuantizeResult | None = None) -> str:
    """The registered variant's identity: the prune key + the evaluation key, and the recover / quantize keys of a
    recovered / quantized variant (each another version)."""
    extra = {"recover": recover.key} if recover is not None else {}
    if quantize is not None:
        extra["quantize"] = quantize.key
    return content_key("variant", prune=prune.key, evaluation=evaluation.key, **extra)


def _ppl_metrics(evaluation: EvaluationResult, baseline: EvaluationResult | None) -> dict[str, float]:
    m: dict[str, float] = {}
    if evaluation.ppl is not None:
        m["ppl.pruned"] = float(evaluation.ppl)
    if baseline and baseline.ppl is not None:
        m["ppl.dense"] = float(baseline.ppl)
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
    prune: PruneResult,
    evaluation: EvaluationResult,
    baseline: EvaluationResult | None,
    stage_seconds: Mapping[str, float | None] | None = None,
    quantize: QuantizeResult | None = None,
) -> dict[str, float]:
    """Sparsity, perplexity (the variant's -- named ``ppl.pruned`` for every variant --, dense, delta, ratio),
    zero-shot (with deltas to dense), a quantized variant's figures, stage seconds."""
    m: dict[str, float] = {
        "sparsity.achieved": float(prune.achieved_sparsity),
        "sparsity.target": float(sum(prune.target_per_block) / len(prune.target_per_block)),
    }
    m.update(_ppl_metrics(evaluation, baseline))
    m.update(_zero_shot_metrics(evaluation.zero_shot or {}, (baseline.zero_shot if baseline else None) or {}))
    m.update(quantize_metrics(quantize, evaluation))
    for stage, secs in (stage_seconds or {}).items():
        if secs is not None:
            m[f"time.{stage}_s"] = float(secs)
    return m


def quantize_metrics(q: QuantizeResult | None, evaluation: EvaluationResult) -> dict[str, float]:
    """``quant.*``, ``bytes_on_disk*`` and ``sparsity.loaded_back`` of a quantized variant (empty otherwise)."""
    if q is None:
        return {}
    m = {"quant.bits": float(q.bits), "quant.group_size": float(q.group_size), "bytes_on_disk": float(q.bytes_on_disk),
         "bytes_on_disk.parent": float(q.parent_bytes), "bytes_on_disk.ratio": q.bytes_on_disk / max(q.parent_bytes, 1),
         "sparsity.loaded_back": float(q.sparsity_loaded),
         "sparsity.zeros_kept": float(q.zeros_loaded == q.zeros_parent)}
    if evaluation.ppl is not None:
        m["ppl.quantized"] = float(evaluation.ppl)
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


def recorded_stage_seconds(stages: "VariantStages") -> dict[str, float | None]:
    """The recorded compute time of each stage's artifact (stable across reruns)."""
    s = stages
    seconds: dict[str, float | None] = {r.stage: r.recorded_seconds for r in (s.calib, s.stats, s.rates, s.prune)}
    if s.recover is not None:
        seconds["recover"] = s.recover.recorded_seconds
    if s.quantize is not None:
        seconds["quantize"] = s.quantize.recorded_seconds
    for label, ev in (("evaluate", s.evaluation), ("baseline", s.baseline)):
        if ev:
            seconds[label] = sum(float(p.recorded_seconds or 0.0) for p in ev.parts.values())
    return seconds


def variant_lineage(cfg: Any, stages: "VariantStages") -> dict[str, Any]:
    """The lineage fields of the variant (tagged ``dlp.<field>`` on its run and version)."""
    p, ref = cfg.pruning, stages.model.ref
    dlp = p.allocation == "dlp"
    chosen = stages.rates.chosen()
    searched = dlp and bool(stages.rates.alpha_search)
    return {
        "base_model": ref.source,
        "base_revision": ref.revision,
        "base_hash": ref.fingerprint,
        "method": p.method,
        "allocation": p.allocation,
        "statistic": chosen["statistic"] if dlp else None,
        "sparsity": p.sparsity,
        "alpha": chosen["alpha"] if dlp else None,
        "alpha_requested": p.alpha if searched else None,
        "statistic_requested": p.statistic if searched else None,
        "pattern": p.pattern,
        "calibration_fingerprint": stages.calib.fingerprint,
        "artifact_uri": stages.final.uri,
        **(recovery_lineage(stages.recover) if stages.recover is not None else {}),
        **quantize_lineage(stages),
    }


def quantize_lineage(stages: "VariantStages") -> dict[str, Any]:
    """A quantized variant's tags naming its pruned parent (prune key, checkpoint URI and sha256) and itself."""
    q = stages.quantize
    if q is None:
        return {}
    return {"quantized": True, "quantize_key": q.key, "quant_method": q.method, "quant_bits": q.bits,
            "quant_group_size": q.group_size, "prune_key": stages.prune.key, "parent_stage": q.parent_stage,
            "parent_key": q.parent_key, "parent_artifact_uri": q.parent_uri, "parent_sha256": q.parent_sha256}


def _manifests(results: Mapping[str, StageResult]) -> dict[str, Any]:
    return {k: v.manifest.model_dump(mode="json") if v.manifest else None for k, v in results.items()}


def variant_documents(cfg: Any, stages: "VariantStages") -> dict[str, Any]:
    """The job YAML, the pipeline manifests and the zero-shot reports, by artifact file."""
    s = stages
    results = (s.model, s.calib, s.stats, s.rates, s.prune, s.recover, s.quantize)
    manifests: dict[str, Any] = _manifests({r.stage: r for r in results if r is not None})
    manifests["evaluate"] = _manifests(s.evaluation.parts)
    if s.baseline:
        manifests["baseline"] = _manifests(s.baseline.parts)
    docs: dict[str, Any] = {"config/job.yaml": cfg.to_yaml(), "pipeline/manifests.json": manifests}
    if s.recover is not None:
        docs.update(recovery_documents(s.recover, s.before, s.evaluation))
    if s.evaluation.zero_shot:
        docs["evaluation/zero_shot.json"] = {"pruned": s.evaluation.zero_shot,
                                             "dense": s.baseline.zero_shot if s.baseline else None}
    return docs


def _fetch_alpha_search(spec: StoreSpec, found: Mapping[str, Any], folder: Path) -> Path:
    """The alpha search's proxy curve (JSON + PNG), copied from the store to ``folder``."""
    st = spec.open()
    folder.mkdir(parents=True, exist_ok=True)
    for part in ("curve_key", "plot_key"):
        st.get_file(found[part], folder / Path(found[part]).name)
    return folder


def _log_outcome(logger: Any, result: Registration, secs: float) -> bool:
    computed = not result.reused
    hook("register", "computed" if computed else "hit")
    if computed:
        logger.info("register: %s version %s (alias %s) in %.1fs", result.name, result.version, result.alias, secs)
    else:
        logger.info("register: variant already registered as %s version %s", result.name, result.version)
    return computed


@dataclass(frozen=True)
class VariantStages:
    """Everything a variant's registration reads: the results of the stages before it."""

    model: FetchResult
    calib: CalibrationResult
    stats: StatisticsResult
    rates: RatesResult
    prune: PruneResult
    evaluation: EvaluationResult
    baseline: EvaluationResult | None
    recover: RecoverResult | None = None  # the recovered checkpoint (then ``evaluation`` is of it)
    before: EvaluationResult | None = None  # the pruned model's evaluation, before recovery
    quantize: QuantizeResult | None = None  # the quantized checkpoint (of the recovered one when both ran)

    @property
    def final(self) -> StageResult:
        """The checkpoint that is registered: the latest one (prune's, else recover's, else quantize's)."""
        return self.quantize or self.recover or self.prune

    @property
    def sparse(self) -> PruneResult | RecoverResult:
        """The latest checkpoint with per-block sparsity (quantization keeps every zero, so it is the same)."""
        return self.recover or self.prune


def _metrics(stages: VariantStages, stage_seconds: Mapping[str, float | None]) -> dict[str, float]:
    m = {**variant_metrics(stages.prune, stages.evaluation, stages.baseline, stage_seconds, stages.quantize),
         **search_metrics(stages.rates.alpha_search)}
    if stages.recover is not None:
        m.update(recovery_metrics(stages.recover, stages.before, stages.evaluation))
    return m


def _extra_artifacts(spec: StoreSpec, stages: VariantStages, tmp: Path) -> dict[str, Path]:
    found, out = stages.rates.alpha_search, {}
    if found:
        out["alpha_search"] = _fetch_alpha_search(spec, found, tmp / "alpha_search")
    if stages.recover is not None:
        out["recovery"] = loss_plot(stages.recover, tmp / "recovery").parent
        adapter = unmerged_adapter(materialize(spec, stages.recover.manifest))
        if adapter is not None:
            out[ADAPTER_ARTIFACT] = adapter
    return out


def registry_storage(cfg: Any, stages: VariantStages) -> str:
    """``registry.storage``, except that a quantized variant is logged whole (``dense``): its packed integer weights
    share nothing with the base, and the compressed-tensors folder is already the small form."""
    return "dense" if stages.quantize is not None else cfg.registry.storage


def _log_variant(cfg: Any, spec: StoreSpec, stages: VariantStages, vkey: str, new: bool,
                 stage_seconds: Mapping[str, float | None], tmp: Path) -> Registration:
    """One :func:`pipeline.registry.log_variant_run` call with everything the variant's run holds."""
    from pipeline import registry

    rates, workdir = stages.rates, cfg.workdir_path
    logged = registry.log_variant_run(
        registered_name=cfg.registry.model_name, variant_key=vkey,
        checkpoint_dir=materialize(spec, stages.final.manifest) if new else workdir,  # not read when registered
        params=cfg.model_dump(mode="json"), metrics=_metrics(stages, stage_seconds),
        series=recovery_series(stages.recover) if stages.recover is not None else None,
        block_sparsity=stages.sparse.achieved_per_block, block_target=rates.ratios,
        block_statistic=rates.block_statistic, statistic_name=rates.statistic_name,
        lineage=variant_lineage(cfg, stages), experiment=cfg.registry.experiment,
        artifact_location=cfg.registry.artifact_location, run_name=cfg.variant_name(),
        tracking_uri=cfg.registry.tracking_uri, workdir=workdir, alias=cfg.registry.alias,
        documents=variant_documents(cfg, stages),
        extra_artifacts=_extra_artifacts(spec, stages, tmp) if new else None,
        extra_tags={"dlp.job_name": cfg.name} if cfg.name else None,
        storage=registry_storage(cfg, stages), base_dir=stages.model.ref.path if new else None,
        base_source=stages.model.ref.source,
    )
    return Registration.model_validate(logged)


def register_variant(store: StoreSpec | Mapping[str, Any], job: Mapping[str, Any], stages: VariantStages,
                     stage_seconds: Mapping[str, float | None] | None = None) -> RegisterResult:
    """Log + register the variant, idempotent on its variant key. One registration per variant among
    overlapping runs sharing a work dir (the second finds the first's version), one at a time per process."""
    from pipeline import registry
    from pipeline.jobconfig import JobConfig

    spec, cfg = StoreSpec.of(store), JobConfig.model_validate(dict(job))
    seconds = recorded_stage_seconds(stages) if stage_seconds is None else stage_seconds
    vkey = variant_key(stages.prune, stages.evaluation, stages.recover, stages.quantize)
    t0 = time.perf_counter()
    with stage_lock(spec, "register", vkey), _REGISTER_LOCK, tempfile.TemporaryDirectory(prefix="dlp-register-") as tmp:
        client = registry.get_client(cfg.registry.tracking_uri, cfg.workdir_path)
        new = registry.find_version_by_variant_key(cfg.registry.model_name, vkey, client=client) is None
        if new:
            hook("register", "start")
        registered = _log_variant(cfg, spec, stages, vkey, new, seconds, Path(tmp))
    secs = round(time.perf_counter() - t0, 3)
    computed = _log_outcome(stage_logger("register"), registered, secs)
    return RegisterResult(stage="register", key=vkey, computed=computed, registered=registered,
                          compute_seconds=secs if computed else 0.0)
