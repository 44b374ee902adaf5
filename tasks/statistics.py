"""Stage 2 -- calibration windows and block statistics (ONE dense forward per block).

``calibration``: draws the calibration windows (:func:`dlp.data.calibration_windows`) and stores them
(``calibration/<key>/windows.safetensors``) with their content fingerprint
(:func:`dlp.data.fingerprint_tokens`). Key: the tokenizer's file hash, the calibration text's content hash,
nsamples, seqlen, seed. Not cached by Prefect (it is cheap: when the manifest exists it only reads and hashes
the text); its fingerprint keys the statistics.

``statistics``: :func:`dlp.statistics.collect_statistics` -> ``statistics/<key>/statistics.safetensors``.
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
    block_progress,
    content_key,
    hook,
    materialize,
    run_cached,
    seed_materialized,
    stage_logger,
    text_fingerprint,
)
from dlp.bounds import DEFAULT_OWL_M
from tasks.stage import as_state, stage_task

#: Statistics are always collected with the library's OWL M; other M values are derived (dlp.recipe).
STATS_OWL_M = DEFAULT_OWL_M


# ============================================================================================ calibration
def calibration_key(tokenizer_fp: str, text_fp: str, nsamples: int, seqlen: int, seed: int) -> str:
    return content_key("calibration", tokenizer=tokenizer_fp, text=text_fp, nsamples=int(nsamples), seqlen=int(seqlen), seed=int(seed))


def calibration_windows(
    store: Mapping[str, Any],
    model: Mapping[str, Any],
    source: str,
    nsamples: int,
    seqlen: int,
    seed: int,
    data_dir: str | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    from dlp import data

    logger = stage_logger("calibration")
    text = data.load_text(source, data_dir)
    key = calibration_key(model["tokenizer_fp"], text_fingerprint(text), nsamples, seqlen, seed)
    artifact_key = f"calibration/{key}/windows.safetensors"
    spec = StoreSpec.of(store)

    def compute(st):
        import torch  # noqa: F401
        from safetensors.torch import save_file
        from transformers import AutoTokenizer

        t0 = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(model["ref"]["path"], trust_remote_code=trust_remote_code)
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

    return run_cached(spec, "calibration", key, artifact_key, compute)


@stage_task("calibration")
def calibration_task(store: dict[str, Any], model: dict[str, Any], source: str, nsamples: int, seqlen: int, seed: int,
                     data_dir: str | None = None, trust_remote_code: bool = False) -> dict[str, Any]:
    return as_state(calibration_windows(store, model, source, nsamples, seqlen, seed, data_dir, trust_remote_code))


def load_windows(store: Mapping[str, Any], calib: Mapping[str, Any]):
    from safetensors.torch import load_file

    return load_file(str(materialize(store, calib["manifest"])))["windows"]


# ============================================================================================ statistics
def statistics_key(model: Mapping[str, Any], calib: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    fig = calib["manifest"]["figures"]
    return content_key(
        "statistics",
        model=model["ref"]["fingerprint"],
        dtype=settings["dtype"],
        windows=fig["fingerprint"],
        nsamples=fig["nsamples"],
        seqlen=fig["seqlen"],
        seed=fig["seed"],
        owl_m=STATS_OWL_M,
    )


def _stats_keys(p: dict[str, Any]) -> tuple[str, str]:
    key = statistics_key(p["model"], p["calib"], p["settings"])
    return key, f"statistics/{key}/statistics.safetensors"


def collect(store: Mapping[str, Any], model: Mapping[str, Any], calib: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    from dlp.models import ModelRef, load_model, resolve_device
    from dlp.statistics import collect_statistics

    spec = StoreSpec.of(store)
    key, artifact_key = _stats_keys({"model": model, "calib": calib, "settings": settings})
    logger = stage_logger("statistics")

    def compute(st):
        t0 = time.perf_counter()
        net, _tok, _ref = load_model(ModelRef(**model["ref"]), dtype=settings["dtype"],
                                     trust_remote_code=settings.get("trust_remote_code", False))
        windows = load_windows(spec, calib)
        hook("statistics", "compute")
        logger.info("statistics: one dense forward per block over %d x %d tokens", windows.shape[0], windows.shape[1])
        t1 = time.perf_counter()
        with block_progress(net, "statistics"):
            stats = collect_statistics(net, windows, device=resolve_device(settings.get("device")),
                                       batch_size=settings.get("batch_size"), owl_m=STATS_OWL_M)
        engine_s = time.perf_counter() - t1
        tmp = spec.scratch / "tmp" / f"statistics-{key[:16]}.safetensors"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        stats.save(tmp)
        put = st.put_file(tmp, artifact_key)
        seed_materialized(spec, put, tmp)
        Path(tmp).unlink(missing_ok=True)
        secs = round(time.perf_counter() - t0, 3)
        logger.info("statistics: %d blocks in %.1fs", len(stats.blocks), engine_s)
        return put, {
            "num_blocks": len(stats.blocks),
            "blocks": stats.blocks,
            "nsamples": stats.nsamples,
            "tokens": stats.tokens,
            "owl_m": stats.owl_m,
            "block_passes": stats.meta.get("block_passes"),
            "engine_seconds": round(engine_s, 3),
            "compute_seconds": secs,
        }

    return run_cached(spec, "statistics", key, artifact_key, compute)


@stage_task("statistics")
def statistics_task(store: dict[str, Any], model: dict[str, Any], calib: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    return as_state(collect(store, model, calib, settings))


def load_statistics(store: Mapping[str, Any], stats: Mapping[str, Any]):
    from dlp.statistics import BlockStatistics

    return BlockStatistics.load(materialize(store, stats["manifest"]))
