"""Deployable-output commands of the ``dlp`` CLI: ``quantize``, ``pack``, ``materialize``.

- ``dlp quantize``: GPTQ (mask-preserving) or round-to-nearest, written as a compressed-tensors W4A16 / W8A16
  checkpoint, then loaded back to measure its sparsity;
- ``dlp pack``: store a pruned model folder as a bitmask (+ values) over its base checkpoint;
- ``dlp materialize``: write a packed variant back as a standard Hugging Face folder, bit-exactly.

Direct calls into dlp/, no pipeline. Every setting is checked before a weight is read: bad input prints
one line ``error: ...`` and exits with status 2.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from cli.library import (BatchOpt, CalibOpt, DataDirOpt, DeviceOpt, DtypeOpt, JsonOpt, NsamplesOpt, RevisionOpt,
                         SeedOpt, SeqlenOpt, TrustOpt, _log, _set_data_dir)
from dlp import bounds
from dlp.errors import DLPError


def _empty_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DLPError(f"--out {out} exists and is not empty; choose a new folder")


def quantize_cmd(
    model: str = typer.Option(..., "--model", help="the (pruned) model: local HF folder, hub id, .gguf or bundled name"),
    out: Path = typer.Option(..., "--out", help="folder for the compressed-tensors checkpoint"),
    bits: int = typer.Option(4, "--bits", help="4 (W4A16) or 8 (W8A16)"),
    group_size: int = typer.Option(128, "--group-size", help="inputs per scale; must divide every linear's in_features"),
    method: str = typer.Option("gptq", "--method", help="gptq (calibrated, zeros kept) | rtn (round-to-nearest, no data)"),
    compensation: str = typer.Option(bounds.DEFAULT_COMPENSATION, "--compensation", help="GPTQ: shared (SparseGPT's rule) | exact (per-row, survivors only; lower error, much slower)"),
    export_dtype: str = typer.Option("bfloat16", "--export-dtype", help="dtype of the scales and unquantized tensors (bfloat16 | float16 | float32)"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="load the checkpoint back and measure its sparsity"),
    revision: Optional[str] = RevisionOpt, dtype: str = DtypeOpt, device: str = DeviceOpt,
    trust_remote_code: bool = TrustOpt, calibration: str = CalibOpt, nsamples: int = NsamplesOpt,
    seqlen: int = SeqlenOpt, seed: int = SeedOpt, data_dir: Optional[Path] = DataDirOpt,
    batch_size: Optional[int] = BatchOpt, as_json: bool = JsonOpt,
):
    """Quantize a (pruned) model's linears to 4 or 8 bits keeping every zero; write a W4A16 / W8A16 checkpoint."""
    from dlp import data, export, models
    from dlp.pruning import measured_sparsity
    from dlp.quantize import COMPENSATIONS, METHODS, QuantSpec, check_folder, quantize

    _set_data_dir(data_dir)
    if method not in METHODS:
        raise DLPError(f"unknown quantization method '{method}'; use one of: {', '.join(METHODS)}")
    if compensation not in COMPENSATIONS:
        raise DLPError(f"unknown --compensation '{compensation}'; use one of: {', '.join(COMPENSATIONS)}")
    if export_dtype not in models.DTYPES:
        raise DLPError(f"unknown --export-dtype '{export_dtype}'; use one of: {', '.join(models.DTYPES)}")
    if method == "gptq" and (nsamples <= 0 or seqlen <= 1):
        raise DLPError(f"--nsamples must be positive and --seqlen above 1, got {nsamples} and {seqlen}")
    scale_dtype = models.DTYPES[export_dtype]
    spec = QuantSpec(bits, group_size, scale_dtype)
    spec.check()
    device = models.resolve_device(device)
    _empty_out(out)
    ref = models.resolve_model(model, revision)
    check_folder(ref.path, spec, trust_remote_code)
    text = data.load_text(calibration) if method == "gptq" else None  # bad data fails before the weights load
    net, tok, ref = models.load_model(ref, dtype=dtype, trust_remote_code=trust_remote_code)
    windows = data.calibration_windows(tok, text, nsamples, seqlen, seed) if text is not None else None
    before = measured_sparsity(net)
    t = time.perf_counter()
    result = quantize(net, bits=bits, group_size=group_size, method=method, windows=windows, device=device,
                      batch_size=batch_size, compensation=compensation, scale_dtype=scale_dtype)
    _log(f"quantized {result.to_json()['quantized_linears']} linears with {method} in {time.perf_counter() - t:.1f}s", as_json)
    calib = {"source": calibration, "nsamples": nsamples, "seqlen": seqlen, "seed": seed} if windows is not None else None
    info = export.export_compressed(net, tok, result, out, dtype=scale_dtype,
                                    report={"model": ref.source, "fingerprint": ref.fingerprint, "calibration": calib})
    summary = {**result.to_json(), **info.to_json(), "model": ref.source, "dense_bytes": export.weight_bytes(ref.path),
               "sparsity_per_block_before": before}
    del net
    if verify:
        back = export.load_dequantized(out)
        after = measured_sparsity(back)
        summary["sparsity_per_block_loaded"] = after
        summary["sparsity_kept"] = after == before
    _print_quantize(summary, as_json)


def _print_quantize(summary: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(summary))
        return
    loaded = summary.get("sparsity_per_block_loaded")
    kept = "not verified" if loaded is None else ("equal to before, exactly" if summary["sparsity_kept"] else "CHANGED")
    typer.echo(f"{summary['method']} W{summary['bits']}A16 (group {summary['group_size']}) of {summary['model']}: "
               f"{summary['bytes_on_disk'] / 2**20:.1f} MiB on disk vs {summary['dense_bytes'] / 2**20:.1f} MiB dense; "
               f"sparsity {summary['sparsity_before']:.4f} -> {summary['sparsity_after']:.4f}, after loading back: {kept}; "
               f"checkpoint in {summary['path']}")


def pack_cmd(
    model: Path = typer.Option(..., "--model", help="the variant: a local HF folder (e.g. written by dlp prune)"),
    base: str = typer.Option(..., "--base", help="its base model: local HF folder, hub id, .gguf or bundled name"),
    out: Path = typer.Option(..., "--out", help="folder for the mask-stored variant"),
    revision: Optional[str] = RevisionOpt, as_json: bool = JsonOpt,
):
    """Store a pruned model folder as a bitmask (+ surviving values where they differ) over its base."""
    from dlp.maskstore import pack
    from dlp.models import resolve_model

    if not model.is_dir() or not (model / "config.json").is_file():
        raise DLPError(f"--model {model} is not a Hugging Face model folder (no config.json)")
    _empty_out(out)
    ref = resolve_model(base, revision)
    info = pack(model, ref.path, out, base_source=ref.source)
    res = info.to_json()
    if as_json:
        typer.echo(json.dumps(res))
        return
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(info.kinds.items()))
    typer.echo(f"packed {model} over {ref.source}: {res['bytes_variant'] / 2**20:.2f} MiB vs "
               f"{res['bytes_dense'] / 2**20:.1f} MiB dense ({100 * res['ratio']:.1f} %); tensors: {kinds}; variant in {out}")


def materialize_cmd(
    variant: Path = typer.Argument(..., help="a mask-stored variant folder (written by dlp pack)"),
    base: str = typer.Option(..., "--base", help="the base it was packed over: local HF folder, hub id, .gguf or bundled name"),
    out: Path = typer.Option(..., "--out", help="folder for the standard Hugging Face checkpoint"),
    revision: Optional[str] = RevisionOpt, as_json: bool = JsonOpt,
):
    """Write a mask-stored variant back as a standard HF folder, byte for byte the dense copy it was packed from."""
    from dlp.maskstore import materialize, read_manifest
    from dlp.models import resolve_model

    manifest = read_manifest(variant)
    _empty_out(out)
    ref = resolve_model(base, revision)
    t = time.perf_counter()
    path = materialize(variant, ref.path, out)
    res = {"path": str(path), "base": ref.source, "files": sorted(manifest["files"]), "seconds": time.perf_counter() - t}
    typer.echo(json.dumps(res) if as_json else f"materialized {variant} over {ref.source} into {path} (bit-exact, {res['seconds']:.1f}s)")


def register(app: typer.Typer) -> None:
    """Add ``quantize``, ``pack`` and ``materialize`` to ``app`` (idempotent)."""
    have = {c.name for c in app.registered_commands}
    for name, fn in (("quantize", quantize_cmd), ("pack", pack_cmd), ("materialize", materialize_cmd)):
        if name not in have:
            app.command(name)(fn)
