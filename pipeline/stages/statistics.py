"""Stage 2 -- calibration windows and block statistics (ONE dense forward per block).

``calibration``: draws the calibration windows (:func:`dlp.data.calibration_windows`) and stores them
(``calibration/<key>/windows.safetensors``) with their content fingerprint
(:func:`dlp.data.fingerprint_tokens`). Key: the tokenizer's file hash, the calibration text's content hash,
nsamples, seqlen, seed. Not cached by Prefect (it is cheap: when the manifest exists it only reads and hashes
the text); its fingerprint keys the statistics.

``statistics``: :func:`dlp.statistics.collect_statistics` on the model streamed block by block from its
checkpoint (never loaded whole), journaled in the work dir so a killed sweep resumes at its first unfinished
block -> ``statistics/<key>/statistics.safetensors``.
Key: model fingerprint, dtype, calibration-window fingerprint, nsamples, seqlen, seed, the OWL M the
statistics are collected with (fixed: another M is derived later from the weights, without a forward).
Independent of sparsity, allocation, alpha, method: a sweep computes it once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

from pipeline.cache import (
    StoreSpec,
    engine_progress,
    content_key,
    hook,
    materialize,
    run_cached,
    seed_materialized,
    stage_logger,
    text_fingerprint,
)
from dlp.bounds import DEFAULT_OWL_M
from pipeline.results import CalibrationResult, FetchResult, StatisticsResult

#: Statistics are always collected with the library's OWL M; other M values are derived (dlp.recipe).
STATS_OWL_M = DEFAULT_OWL_M


# ============================================================================================ calibration
def calibration_key(tokenizer_fp: str, text_fp: str, nsamples: int, seqlen: int, seed: int) -> str:
    return content_key("calibration", tokenizer=tokenizer_fp, text=text_fp, nsamples=int(nsamples), seqlen=int(seqlen), seed=int(seed))


def calibration_windows(
    store: StoreSpec | Mapping[str, Any],
    model: FetchResult,
    source: str,
    nsamples: int,
    seqlen: int,
    seed: int,
    data_dir: str | None = None,
    trust_remote_code: bool = False,
) -> CalibrationResult:
    from dlp import data

    logger = stage_logger("calibration")
    text = data.load_text(source, data_dir)
    key = calibration_key(model.tokenizer_fp, text_fingerprint(text), nsamples, seqlen, seed)
    artifact_key = f"calibration/{key}/windows.safetensors"
    spec = StoreSpec.of(store)

    def compute(st):
        import torch  # noqa: F401
        from safetensors.torch import save_file
        from transformers import AutoTokenizer

        t0 = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(model.ref.path, trust_remote_code=trust_remote_code)
        windows = data.calibration_windows(tok, text, nsamples, seqlen, seed)
        fp = data.fingerprint_tokens(windows)
        tmp = spec.scratch / "tmp" / f"windows-{key[:16]}.safetensors"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        save_file({"windows": windows.contiguous()}, str(tmp), metadata={"fingerprint": fp})
        put = st.put_file(tmp, artifact_key)
        tmp.unlink(missing_ok=True)
        secs = round(time.perf_counter() - t0, 3)
        logger.info("calibration: %d x %d tokens from %s (%.1fs)", windows.shape[0], windows.shape[1], source, secs)
        return put, {"fingerprint": fp, "shape": list(windows.shape), "source": source, "nsamples": int(nsamples),
                     "seqlen": int(seqlen), "seed": int(seed), "compute_seconds": secs}

    return run_cached(spec, "calibration", key, artifact_key, compute).typed(CalibrationResult)


def load_windows(store: StoreSpec | Mapping[str, Any], calib: CalibrationResult):
    from safetensors.torch import load_file

    return load_file(str(materialize(store, calib.manifest)))["windows"]


# ============================================================================================ statistics
def statistics_key(model: FetchResult, calib: CalibrationResult, settings: Mapping[str, Any]) -> str:
    return content_key("statistics", model=model.ref.fingerprint, dtype=settings["dtype"], windows=calib.fingerprint,
                       nsamples=calib.nsamples, seqlen=calib.seqlen, seed=calib.seed, owl_m=STATS_OWL_M)


def collect(store: StoreSpec | Mapping[str, Any], model: FetchResult, calib: CalibrationResult,
            settings: Mapping[str, Any]) -> StatisticsResult:
    spec = StoreSpec.of(store)
    key = statistics_key(model, calib, settings)
    artifact_key = f"statistics/{key}/statistics.safetensors"

    def compute(st):
        t0 = time.perf_counter()
        stats, engine_s = _streamed_statistics(spec, key, model, calib, settings)
        tmp = spec.scratch / "tmp" / f"statistics-{key[:16]}.safetensors"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        stats.save(tmp)
        put = st.put_file(tmp, artifact_key)
        seed_materialized(spec, put, tmp)
        Path(tmp).unlink(missing_ok=True)
        return put, {"num_blocks": len(stats.blocks), "blocks": stats.blocks, "nsamples": stats.nsamples,
                     "tokens": stats.tokens, "owl_m": stats.owl_m, "block_passes": stats.meta.get("block_passes"),
                     "engine_seconds": round(engine_s, 3), "compute_seconds": round(time.perf_counter() - t0, 3)}

    return run_cached(spec, "statistics", key, artifact_key, compute).typed(StatisticsResult)


def _streamed_statistics(spec: StoreSpec, key: str, model: FetchResult, calib: CalibrationResult,
                         settings: Mapping[str, Any]):
    """One dense sweep over the streamed model, journaled under ``<workdir>/cache/state/statistics-<key>``."""
    from dlp.models import resolve_device
    from dlp.resume import BlockJournal
    from dlp.statistics import collect_statistics
    from dlp.streaming import open_streamed

    logger = stage_logger("statistics")
    windows = load_windows(spec, calib)
    hook("statistics", "compute")
    journal = BlockJournal(spec.scratch / "state" / f"statistics-{key[:16]}", key)
    logger.info("statistics: one dense forward per block over %d x %d tokens%s", windows.shape[0], windows.shape[1],
                f", resuming at block {journal.next_block + 1}" if journal.next_block else "")
    t0 = time.perf_counter()
    with open_streamed(model.ref.path, dtype=settings["dtype"],
                       trust_remote_code=settings.get("trust_remote_code", False)) as sm, engine_progress("statistics"):
        stats = collect_statistics(sm, windows, device=resolve_device(settings.get("device")),
                                   batch_size=settings.get("batch_size"), owl_m=STATS_OWL_M, journal=journal,
                                   memory_budget=settings.get("memory_budget"), spill_dir=spec.scratch / "spill")
    engine_s = time.perf_counter() - t0
    journal.clear()
    logger.info("statistics: %d blocks in %.1fs", len(stats.blocks), engine_s)
    return stats, engine_s


def load_statistics(store: StoreSpec | Mapping[str, Any], stats: StatisticsResult):
    from dlp.statistics import BlockStatistics

    return BlockStatistics.load(materialize(store, stats.manifest))
