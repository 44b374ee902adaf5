"""Optional stage -- quantize the latest checkpoint (the pruned one, or what a later stage made of it) to 4 or 8
bits, keeping its zeros, and store the compressed-tensors W4A16 / W8A16 checkpoint.

Thin over :func:`dlp.quantize.quantize` (GPTQ through the one calibration engine, on the calibration stage's
windows; or round-to-nearest) and :func:`dlp.export.export_compressed`. The checkpoint is loaded back through
transformers / compressed-tensors before it is stored, and the stage fails unless the load-back has exactly the
parent's zero count. The parent is loaded whole (in memory), unlike prune, which streams.

The artifact is ``quantize/<key>/checkpoint`` (packed safetensors, config with compressed-tensors'
``quantization_config``, tokenizer, ``dlp_report.json``). Key: the parent's stage and content key, the compute
dtype, bits, group size, method, export dtype, and for GPTQ the compensation, the calibration-window
fingerprint and the number of windows used.

Evaluation cannot stream packed weights block by block; :func:`loaded_back` writes the load-back once as a
plain dense folder in the work dir's scratch (keyed by the artifact's sha256) and evaluation reads that: the
figures are those of exactly what transformers loads.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

from pipeline.cache import (
    StoreSpec,
    content_key,
    derived_folder,
    engine_progress,
    hook,
    materialize,
    run_cached,
    seed_derived_folder,
    seed_materialized,
    stage_logger,
)
from pipeline.manifest import Manifest
from pipeline.results import CalibrationResult, FetchResult, QuantizeResult, StageResult
from pipeline.stages.statistics import load_windows

__all__ = ["check_quantization", "loaded_back", "quantize_key", "quantize_params", "run_quantize"]


def quantize_params(cfg) -> dict[str, Any]:
    """The stage's parameters from a job with a ``quantization:`` section (plain JSON values)."""
    q, m = cfg.quantization, cfg.model
    return {"bits": q.bits, "group_size": q.group_size, "method": q.method, "compensation": q.compensation,
            "nsamples": q.nsamples, "export_dtype": q.export_dtype, "dtype": m.dtype, "device": m.device,
            "trust_remote_code": m.trust_remote_code, "batch_size": None}


def check_quantization(cfg, folder: str | os.PathLike[str]) -> str:
    """The job's quantization settings against the model folder's config alone (no weight is read):
    DLPError, one line naming the fix, when the group size does not divide a block linear's inputs."""
    from dlp.errors import DLPError
    from dlp.quantize import QuantSpec, check_folder

    q = cfg.quantization
    if q.nsamples is not None and q.nsamples > cfg.calibration.nsamples:
        raise DLPError(f"quantization.nsamples {q.nsamples} exceeds calibration.nsamples {cfg.calibration.nsamples}: "
                       "GPTQ reuses the calibration windows; lower it or leave it out")
    check_folder(str(folder), QuantSpec(q.bits, q.group_size), cfg.model.trust_remote_code)
    return f"quantization: W{q.bits}A16, group size {q.group_size} divides every block linear's in_features"


def quantize_key(source: StageResult, calib: CalibrationResult, params: Mapping[str, Any]) -> str:
    ingredients: dict[str, Any] = {
        "parent_stage": source.stage, "parent": source.key, "dtype": params["dtype"], "bits": int(params["bits"]),
        "group_size": int(params["group_size"]), "method": params["method"], "export_dtype": params["export_dtype"],
    }
    if params["method"] == "gptq":
        ingredients.update(compensation=params["compensation"], windows=calib.fingerprint,
                           nsamples=int(params["nsamples"] or calib.nsamples))
    return content_key("quantize", **ingredients)


def run_quantize(store: StoreSpec | Mapping[str, Any], model: FetchResult, calib: CalibrationResult,
                 source: StageResult, params: Mapping[str, Any]) -> QuantizeResult:
    spec = StoreSpec.of(store)
    key = quantize_key(source, calib, params)
    artifact_key = f"quantize/{key}/checkpoint"

    def compute(st):
        t0 = time.perf_counter()
        out, back = (spec.scratch / "tmp" / f"{name}-{key[:16]}" for name in ("quantized", "loaded-back"))
        for folder in (out, back):
            shutil.rmtree(folder, ignore_errors=True)
        figures = _quantize_export(spec, key, out, back, model, calib, source, params)
        hook("quantize", "save")
        put = st.put_dir(out, artifact_key)
        seed_derived_folder(spec, LOADED_BACK, put.sha256, back)  # evaluation reads it: no second load-back
        seed_materialized(spec, put, out)
        shutil.rmtree(out, ignore_errors=True)
        return put, {**figures, "compute_seconds": round(time.perf_counter() - t0, 3)}

    return run_cached(spec, "quantize", key, artifact_key, compute).typed(QuantizeResult)


def _quantize_export(spec: StoreSpec, key: str, out: Path, back: Path, model: FetchResult, calib: CalibrationResult,
                     source: StageResult, params: Mapping[str, Any]) -> dict[str, Any]:
    """Quantize the parent checkpoint, export it to ``out``, load it back (written densely to ``back``) and
    count its zeros."""
    from dlp import export
    from dlp.models import DTYPES, ModelRef, load_model, resolve_device
    from dlp.quantize import block_zeros, quantize

    logger = stage_logger("quantize")
    parent = materialize(spec, source.manifest)
    gptq = params["method"] == "gptq"
    windows = load_windows(spec, calib)[: params["nsamples"] or calib.nsamples] if gptq else None
    hook("quantize", "compute")
    ref = ModelRef(source=str(parent), path=str(parent), revision=None, fingerprint=source.manifest.sha256, kind="folder")
    net, tok, _ = load_model(ref, dtype=params["dtype"], trust_remote_code=params.get("trust_remote_code", False))
    scale_dtype = DTYPES[params["export_dtype"]]
    with engine_progress("quantize"):
        result = quantize(net, bits=params["bits"], group_size=params["group_size"], method=params["method"],
                          windows=windows, device=resolve_device(params.get("device")),
                          batch_size=params.get("batch_size"), compensation=params["compensation"],
                          scale_dtype=scale_dtype)
    report = {"base_model": model.ref.source, "base_fingerprint": model.ref.fingerprint, "cache_key": key,
              "parent": {"stage": source.stage, "key": source.key, "uri": source.uri, "sha256": source.manifest.sha256},
              "calibration": {"fingerprint": calib.fingerprint, "windows": int(windows.shape[0])} if gptq else None}
    info = export.export_compressed(net, tok, result, out, dtype=scale_dtype, report=report)
    del net
    zeros, total = block_zeros(export.dequantize_folder(out, back))
    if zeros != result.zeros_before or total != result.total:
        raise RuntimeError(f"quantize: the loaded-back checkpoint has {zeros} zero weights of {total}, the parent "
                           f"{result.zeros_before} of {result.total}; the zeros must survive exactly")
    logger.info("quantize: %s W%dA16 (group %d): %.1f MiB on disk (parent %.1f MiB), %d zeros kept exactly (%.1fs)",
                params["method"], params["bits"], params["group_size"], info.bytes_on_disk / 2**20,
                export.weight_bytes(parent) / 2**20, zeros, result.seconds)
    return {"bits": int(params["bits"]), "group_size": int(params["group_size"]), "method": params["method"],
            "compensation": result.compensation, "export_dtype": params["export_dtype"],
            "bytes_on_disk": info.bytes_on_disk, "parent_bytes": export.weight_bytes(parent),
            "zeros_parent": result.zeros_before, "zeros_loaded": zeros, "weights_total": total,
            "sparsity_loaded": zeros / max(total, 1), "parent_stage": source.stage, "parent_key": source.key,
            "parent_uri": source.uri, "parent_sha256": source.manifest.sha256,
            "quantized_linears": len(result.scales), "block_passes": result.block_passes,
            "engine_seconds": round(result.seconds, 3)}


LOADED_BACK = "loaded-back"  # the derived-folder kind of a quantized checkpoint's dense load-back


def loaded_back(spec: StoreSpec | Mapping[str, Any], manifest: Manifest | Mapping[str, Any]) -> Path:
    """A dense folder holding what transformers loads from the quantized checkpoint (module docstring), written
    once into ``<workdir>/cache/loaded-back/<sha256>/`` and reused while its stamp names the artifact's sha256."""
    from dlp.export import dequantize_folder

    return derived_folder(spec, LOADED_BACK, manifest, dequantize_folder)
