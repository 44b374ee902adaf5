"""Stage 4 -- prune the base model at the per-block rates and store the checkpoint.

Thin over :func:`dlp.pruning.prune` + :func:`dlp.checkpoint.save_checkpoint`; the artifact is a directory
``prune/<key>/checkpoint`` (HF folder: safetensors, config, tokenizer, ``dlp_report.json``). Key: model
fingerprint, dtype, the per-block ratios themselves (content of the rates), method, pattern, mode, and the
calibration-window fingerprint when the method reads calibration data (Wanda/SparseGPT; sequential Wanda
or any SparseGPT) or the statistics key when oneshot Wanda takes its input norms from the statistics.
"""

from __future__ import annotations

import shutil
import time
from typing import Any, Mapping

from pipeline.cache import (
    StoreSpec,
    block_progress,
    content_key,
    hook,
    run_cached,
    seed_materialized,
    stage_logger,
)
from dlp.recipe import needs
from pipeline.results import CalibrationResult, FetchResult, PruneResult, RatesResult, StatisticsResult
from pipeline.stages.statistics import load_statistics, load_windows

CHECKPOINT_WEIGHTS = "model.safetensors"


def prune_key(model: FetchResult, calib: CalibrationResult, stats: StatisticsResult, rates: RatesResult,
              params: Mapping[str, Any]) -> str:
    method, mode = params["method"], params["mode"]
    ingredients: dict[str, Any] = {
        "model": model.ref.fingerprint,
        "dtype": params["dtype"],
        "ratios": [float(r) for r in rates.ratios],
        "method": method,
        "pattern": params["pattern"],
        "mode": mode,
    }
    need = needs(method, mode)
    if need.windows:
        ingredients["windows"] = calib.fingerprint
    elif need.pruner_statistics:
        ingredients["statistics"] = stats.key
    return content_key("prune", **ingredients)


def run_prune(store: StoreSpec | Mapping[str, Any], model: FetchResult, calib: CalibrationResult,
              stats: StatisticsResult, rates: RatesResult, params: Mapping[str, Any]) -> PruneResult:
    from dlp.checkpoint import save_checkpoint
    from dlp.models import load_model, resolve_device
    from dlp.pruning import prune

    spec = StoreSpec.of(store)
    key = prune_key(model, calib, stats, rates, params)
    artifact_key = f"prune/{key}/checkpoint"
    logger = stage_logger("prune")
    method, mode, pattern = params["method"], params["mode"], params["pattern"]

    def compute(st):
        t0 = time.perf_counter()
        net, tok, _ref = load_model(model.ref.model_ref(), dtype=params["dtype"],
                                    trust_remote_code=params.get("trust_remote_code", False))
        ratios = [float(r) for r in rates.ratios]
        need = needs(method, mode)
        windows = load_windows(spec, calib) if need.windows else None
        bstats = load_statistics(spec, stats) if need.pruner_statistics else None
        hook("prune", "compute")
        logger.info("prune: %s (%s, %s) over %d blocks, mean target %.3f", method, mode, pattern, len(ratios),
                    sum(ratios) / len(ratios))
        with block_progress(net, "prune"):
            report = prune(net, ratios, method=method, pattern=pattern, mode=mode, windows=windows, stats=bstats,
                           device=resolve_device(params.get("device")), batch_size=params.get("batch_size"))
        logger.info("prune: achieved sparsity %.4f in %.1fs", report.overall, report.seconds)
        rep = report.to_json()
        rep.pop("per_linear", None)
        rep.update({"base_model": model.ref.source, "base_fingerprint": model.ref.fingerprint,
                    "rates": rates.params, "cache_key": key})
        out = spec.scratch / "tmp" / f"checkpoint-{key[:16]}"
        if out.exists():
            shutil.rmtree(out)
        hook("prune", "save")
        save_checkpoint(net, tok, out, rep)
        del net
        put = st.put_dir(out, artifact_key)
        listing = st.dir_listing(artifact_key)
        weights_sha = {rel: meta["sha256"] for rel, meta in (listing.files.items() if listing else [])
                       if rel.endswith(".safetensors")}
        seed_materialized(spec, put, out)
        shutil.rmtree(out, ignore_errors=True)
        secs = round(time.perf_counter() - t0, 3)
        return put, {
            "achieved_sparsity": report.overall,
            "achieved_per_block": [float(a) for a in report.achieved],
            "target_per_block": ratios,
            "method": method,
            "mode": mode,
            "pattern": pattern,
            "block_passes": report.block_passes,
            "engine_seconds": round(report.seconds, 3),
            "compute_seconds": secs,
            "weights_sha256": weights_sha,
        }

    return run_cached(spec, "prune", key, artifact_key, compute).typed(PruneResult)
