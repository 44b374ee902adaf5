"""What a run reports: one record per stage (cached or not, seconds, URI, Prefect state) and the JSON-able
summary of a compressed variant (what ``dlp compress`` prints and ``--json`` emits)."""

from __future__ import annotations

from typing import Any, Mapping

from pipeline.results import (
    EvaluationResult,
    FetchResult,
    PruneResult,
    QuantizeResult,
    RatesResult,
    RecoverResult,
    RegisterResult,
    StageResult,
)

__all__ = ["recovery_summary", "stage_record", "summarize"]


def stage_record(state_name: str | None, result: StageResult | None, seconds: float | None) -> dict[str, Any]:
    """How one stage went: served (``Cached``) or computed, wall and compute seconds, its artifact's URI."""
    computed = result is not None and result.computed and state_name != "Cached"
    uri = result.registered.model_uri if isinstance(result, RegisterResult) else (result.uri if result else None)
    return {"cached": not computed, "seconds": None if seconds is None else round(seconds, 3),
            "compute_seconds": round(result.compute_seconds, 3) if computed else 0.0, "uri": uri,
            "state": state_name}


def _per_block(prune: PruneResult, rates: RatesResult) -> list[dict[str, Any]]:
    stat = rates.block_statistic
    return [{"block": i, "target": float(t), "achieved": float(a), "statistic": float(stat[i]) if i < len(stat) else None}
            for i, (t, a) in enumerate(zip(prune.target_per_block, prune.achieved_per_block))]


def _zero_shot(evaluation: EvaluationResult, baseline: EvaluationResult | None) -> dict[str, Any] | None:
    """Pruned vs dense accuracy per task and on average."""
    pruned = evaluation.zero_shot
    if not pruned:
        return None
    dense = (baseline.zero_shot if baseline else None) or {}
    tasks = {}
    for name, t in (pruned.get("tasks") or {}).items():
        d = (dense.get("tasks") or {}).get(name) or {}
        entry = {"acc": t.get("acc"), "acc_dense": d.get("acc")}
        if t.get("acc") is not None and d.get("acc") is not None:
            entry["acc_delta"] = t["acc"] - d["acc"]
        if t.get("acc_norm") is not None:
            entry["acc_norm"], entry["acc_norm_dense"] = t["acc_norm"], d.get("acc_norm")
        tasks[name] = entry
    mean, mean_d = pruned.get("mean_acc"), dense.get("mean_acc")
    return {"tasks": tasks, "mean_acc": mean, "mean_acc_dense": mean_d,
            "mean_acc_delta": (mean - mean_d) if mean is not None and mean_d is not None else None,
            "limit": pruned.get("limit")}


def summarize(cfg: Any, model: FetchResult, rates: RatesResult, prune: PruneResult, evaluation: EvaluationResult,
              baseline: EvaluationResult | None, registered: RegisterResult,
              stages: Mapping[str, Any], quantize: QuantizeResult | None = None) -> dict[str, Any]:
    """The summary of one compressed variant (JSON values only). ``pruned_ppl`` is the registered variant's
    (the quantized one's load-back when the job quantizes); ``checkpoint_*`` name its checkpoint."""
    reg, ref = registered.registered, model.ref
    final = quantize if quantize is not None else prune
    return {
        "registered_name": reg.name, "version": str(reg.version), "model_uri": reg.model_uri,
        "alias_uri": f"models:/{reg.name}@{reg.alias or cfg.registry.alias}", "run_id": reg.run_id,
        "variant_key": registered.key, "variant": cfg.variant_name(),
        "allocation": {"allocation": cfg.pruning.allocation, **rates.chosen()},
        "alpha_search": rates.alpha_search,
        "dense_ppl": baseline.ppl if baseline else None, "pruned_ppl": evaluation.ppl,
        "achieved_sparsity": float(prune.achieved_sparsity), "target_sparsity": float(cfg.pruning.sparsity),
        "per_block": _per_block(prune, rates), "zero_shot": _zero_shot(evaluation, baseline),
        "stages": dict(stages),
        "base_model": {"source": ref.source, "revision": ref.revision, "fingerprint": ref.fingerprint},
        "checkpoint_uri": final.uri, "checkpoint_sha256": final.manifest.sha256 if final.manifest else None,
        "weights_sha256": prune.weights_sha256, "workdir": cfg.workdir, "store": cfg.storage_uri,
        "quantization": _quantization(quantize, prune),
    }


def recovery_summary(recover: RecoverResult, before: EvaluationResult | None,
                     evaluation: EvaluationResult) -> dict[str, Any]:
    """What a recovered variant adds to the summary: the recovered checkpoint (what was registered), its sparsity
    per block, and the ``recovery`` figures (perplexity and sparsity before / after, the loss curve's ends)."""
    loss = recover.loss
    return {
        "achieved_sparsity": float(recover.achieved_sparsity), "checkpoint_uri": recover.uri,
        "checkpoint_sha256": recover.manifest.sha256 if recover.manifest else None,
        "weights_sha256": recover.weights_sha256,
        "recovery": {"ppl_before": before.ppl if before else None, "ppl_after": evaluation.ppl,
                     "sparsity_before": float(recover.sparsity_before), "sparsity_after": float(recover.achieved_sparsity),
                     "exact": recover.exact, "steps": recover.steps,
                     "resumed_from_step": recover.figures.get("resumed_from_step"), "loss_first": loss[0] if loss else None,
                     "loss_last": loss[-1] if loss else None, "settings": recover.settings,
                     "train_seconds": recover.train_seconds, "key": recover.key},
    }


def _quantization(q: QuantizeResult | None, prune: PruneResult) -> dict[str, Any] | None:
    """A quantized variant's figures: bits, group size, bytes on disk vs its parent, zeros after load-back."""
    if q is None:
        return None
    keep = ("bits", "group_size", "method", "compensation", "export_dtype", "bytes_on_disk", "parent_bytes",
            "zeros_parent", "zeros_loaded", "weights_total", "sparsity_loaded", "parent_stage", "parent_key",
            "parent_uri")
    return {**{k: getattr(q, k) for k in keep}, "key": q.key, "prune_key": prune.key}
