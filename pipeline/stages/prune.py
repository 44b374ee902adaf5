"""Stage 4 -- prune the base model at the per-block rates and store the checkpoint.

Thin over :func:`dlp.pruning.prune_checkpoint`: the base model is streamed block by block from its checkpoint
and each pruned block is written into the output shards as soon as it is done (the model is never held whole);
the run is journaled in the work dir, so a killed prune resumes at its first unfinished block and ends
bit-identical. The artifact is a directory ``prune/<key>/checkpoint`` (sharded HF folder: safetensors + index,
config, tokenizer, ``dlp_report.json``). Key: model
fingerprint, dtype, the per-block ratios themselves (content of the rates), method, pattern, mode, and the
calibration-window fingerprint when the method reads calibration data (Wanda/SparseGPT; sequential Wanda
or any SparseGPT) or the statistics key when oneshot Wanda takes its input norms from the statistics.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

from pipeline.cache import (
    StoreSpec,
    engine_progress,
    content_key,
    hook,
    run_cached,
    seed_materialized,
    stage_logger,
)
from dlp.recipe import needs
from pipeline.results import CalibrationResult, FetchResult, PruneResult, RatesResult, StatisticsResult
from pipeline.stages.statistics import load_statistics, load_windows
from pipeline.store import ArtifactStore, PutResult



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
    spec = StoreSpec.of(store)
    key = prune_key(model, calib, stats, rates, params)
    artifact_key = f"prune/{key}/checkpoint"

    def compute(st):
        t0 = time.perf_counter()
        out = spec.scratch / "tmp" / f"checkpoint-{key[:16]}"
        report = _finished_report(out) or _streamed_prune(spec, key, out, model, calib, stats, rates, params)
        hook("prune", "save")
        put, weights_sha = store_checkpoint(spec, st, out, artifact_key)
        return put, {"achieved_sparsity": report["achieved_sparsity"],
                     "achieved_per_block": [float(a) for a in report["achieved_per_block"]],
                     "target_per_block": [float(r) for r in rates.ratios], "method": params["method"],
                     "mode": params["mode"], "pattern": params["pattern"], "block_passes": report["block_passes"],
                     "engine_seconds": round(report["seconds"], 3),
                     "compute_seconds": round(time.perf_counter() - t0, 3), "weights_sha256": weights_sha}

    return run_cached(spec, "prune", key, artifact_key, compute).typed(PruneResult)


def store_checkpoint(spec: StoreSpec | Mapping[str, Any], store: ArtifactStore, local: Path,
                     artifact_key: str) -> tuple[PutResult, dict[str, str]]:
    """Upload a checkpoint folder, keep it as the verified local copy (then ``local`` is gone) and return the
    put and the sha256 of each of its ``.safetensors`` files (a stage's ``weights_sha256`` figure)."""
    put = store.put_dir(local, artifact_key)
    listing = store.dir_listing(artifact_key)
    weights_sha = {rel: meta["sha256"] for rel, meta in (listing.files.items() if listing else [])
                   if rel.endswith(".safetensors")}
    seed_materialized(spec, put, local)
    shutil.rmtree(local, ignore_errors=True)
    return put, weights_sha


def _finished_report(out: Path) -> dict | None:
    """The report of a checkpoint a killed run had finished but not yet stored (the folder only appears whole)."""
    from dlp.checkpoint import REPORT_NAME

    try:
        return json.loads((out / REPORT_NAME).read_text())
    except (OSError, ValueError):
        return None


def _streamed_prune(spec: StoreSpec, key: str, out: Path, model: FetchResult, calib: CalibrationResult,
                    stats: StatisticsResult, rates: RatesResult, params: Mapping[str, Any]) -> dict:
    from dlp.models import resolve_device
    from dlp.pruning import prune_checkpoint
    from dlp.streaming import open_streamed

    logger = stage_logger("prune")
    method, mode, pattern = params["method"], params["mode"], params["pattern"]
    ratios = [float(r) for r in rates.ratios]
    need = needs(method, mode)
    windows = load_windows(spec, calib) if need.windows else None
    bstats = load_statistics(spec, stats) if need.pruner_statistics else None
    hook("prune", "compute")
    logger.info("prune: %s (%s, %s) over %d blocks, mean target %.3f", method, mode, pattern, len(ratios),
                sum(ratios) / len(ratios))
    extra = {"base_model": model.ref.source, "base_fingerprint": model.ref.fingerprint, "rates": rates.params,
             "cache_key": key}
    with open_streamed(model.ref.path, dtype=params["dtype"],
                       trust_remote_code=params.get("trust_remote_code", False)) as sm, engine_progress("prune"):
        report = prune_checkpoint(sm, out, ratios, run_key=key, max_shard_size=params.get("max_shard_size"),
                                  report_extra=extra, method=method, pattern=pattern, mode=mode, windows=windows,
                                  stats=bstats, device=resolve_device(params.get("device")),
                                  batch_size=params.get("batch_size"), memory_budget=params.get("memory_budget"),
                                  spill_dir=spec.scratch / "spill")
    logger.info("prune: achieved sparsity %.4f in %.1fs", report.overall, report.seconds)
    rep = report.to_json()
    rep.pop("per_linear", None)
    return rep
