"""Deployable output on the bundled SmolLM2-135M: Wanda + DLP 70 % (the demo job's settings), then 4-bit and
8-bit weights through GPTQ (mask-preserving) and round-to-nearest, exported as compressed-tensors checkpoints;
and a 6-variant sweep stored as masks over the base instead of dense copies.

    nice -n 10 .venv/bin/python benchmarks/bench_quantize.py [--work .dlp-work/bench-quantize] [--json out.json] [--no-sweep]

Prints, per quantized checkpoint: bytes on disk vs the dense checkpoint (float32 as bundled, and bfloat16),
WikiText-2 perplexity after loading the checkpoint back (first 16 windows of 2048 tokens) vs the pruned
model before quantization, and whether the sparsity measured after loading back equals the sparsity before,
exactly (per block). Then bytes of the sweep as masks vs as dense copies, each materialised back and checked
by sha256. Pruned variants are kept in --work, so a rerun skips the pruning.

SmolLM2-135M's hidden width is 576 = 4.5 x 128, so the group size is 64 here (128 divides no 576-wide input).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DLP_DATA_DIR", str(ROOT.parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SWEEP = [(m, p) for m in ("magnitude", "wanda", "sparsegpt") for p in (0.6, 0.7)]
#: (bits, method, GPTQ compensation)
RUNS = [(4, "gptq", "exact"), (4, "gptq", "shared"), (4, "rtn", None), (8, "gptq", "exact"), (8, "rtn", None)]


def _name(bits: int, method: str, compensation: str | None) -> str:
    return f"q{bits}-{method}" + (f"-{compensation}" if compensation else "")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pruned_variant(work: Path, base, tok, windows, stats, method: str, sparsity: float) -> Path:
    """The demo job's pruning (DLP alpha 0.15, median, sequential) at ``sparsity``, saved once under ``work``."""
    from dlp import allocation
    from dlp.checkpoint import save_checkpoint
    from dlp.pruning import prune

    folder = work / f"{method}-dlp{int(sparsity * 100)}"
    if (folder / "config.json").exists():
        return folder
    model = copy.deepcopy(base)
    rates = allocation.dlp(stats, sparsity, 0.15, "median")
    t = time.perf_counter()
    report = prune(model, rates.ratios, method=method, mode="sequential", windows=windows)
    log(f"pruned {folder.name} in {time.perf_counter() - t:.0f}s: sparsity {report.overall:.4f}")
    save_checkpoint(model, tok, folder, {**report.to_json(), "allocation": rates.to_json()})
    return folder


def quantized_rows(work: Path, pruned: Path, windows, ids, args) -> list[dict]:
    from dlp import export, models
    from dlp.perplexity import perplexity
    from dlp.pruning import measured_sparsity
    from dlp.quantize import quantize

    model, tok, _ = models.load_model(str(pruned))
    before = measured_sparsity(model)
    ppl_before = perplexity(model, ids, 2048, max_windows=args.windows)["ppl"]
    log(f"pruned model: perplexity {ppl_before:.2f}")
    rows = []
    runs = [r for r in RUNS if args.runs is None or _name(*r) in args.runs.split(",")]
    for bits, method, compensation in runs:
        name = _name(bits, method, compensation)
        done = work / "rows" / f"{name}.json"
        if done.exists():  # measured by an earlier run over the same pruned model
            rows.append(json.loads(done.read_text()))
            continue
        net = copy.deepcopy(model)
        t = time.perf_counter()
        result = quantize(net, bits=bits, group_size=args.group_size, method=method, compensation=compensation or "exact",
                          windows=windows if method == "gptq" else None, scale_dtype=torch.bfloat16)
        seconds = time.perf_counter() - t
        out = export.export_compressed(net, tok, result, work / name, dtype=torch.bfloat16)
        del net
        back = export.load_dequantized(out.path, dtype=torch.float32)
        after = measured_sparsity(back)
        ppl = perplexity(back, ids, 2048, max_windows=args.windows)["ppl"]
        rows.append({"name": name, "bits": bits, "method": method, "compensation": compensation, "seconds": seconds,
                     "bytes": out.bytes_on_disk, "ppl": ppl, "ppl_before": ppl_before,
                     "sparsity_before": sum(before) / len(before), "sparsity_loaded": sum(after) / len(after),
                     "sparsity_equal": after == before})
        done.parent.mkdir(exist_ok=True)
        done.write_text(json.dumps(rows[-1]))
        log(f"{name}: {out.bytes_on_disk / 2**20:.1f} MiB, perplexity {ppl:.2f} after loading back, "
            f"sparsity equal per block: {after == before} (quantized in {seconds:.0f}s)")
        del back
    return rows


def sweep_rows(work: Path, base_folder: Path, variants: list[Path]) -> list[dict]:
    from dlp.maskstore import materialize, pack
    from dlp.models import _sha256_file

    rows = []
    for folder in variants:
        t = time.perf_counter()
        info = pack(folder, base_folder, work / "masks" / folder.name, base_source="smollm2-135m")
        pack_s = time.perf_counter() - t
        t = time.perf_counter()
        back = materialize(info.path, base_folder, work / "materialized" / folder.name)
        mat_s = time.perf_counter() - t
        exact = all(_sha256_file(p) == _sha256_file(back / p.name) for p in folder.glob("*.safetensors"))
        rows.append({"variant": folder.name, "dense": info.bytes_dense, "stored": info.bytes_variant, "kinds": info.kinds,
                     "bit_exact": exact, "pack_s": pack_s, "materialize_s": mat_s})
        log(f"{folder.name}: {info.bytes_variant / 2**20:.2f} MiB as {info.kinds} vs {info.bytes_dense / 2**20:.1f} MiB "
            f"dense; materialized bit-exact: {exact} (pack {pack_s:.0f}s, materialize {mat_s:.0f}s)")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / ".dlp-work" / "bench-quantize")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--windows", type=int, default=16, help="WikiText-2 windows of 2048 tokens")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-sweep", action="store_true", help="only Wanda + DLP 70 %% and its quantized checkpoints")
    ap.add_argument("--runs", default=None, help="comma-separated subset of " + ",".join(_name(*r) for r in RUNS))
    args = ap.parse_args()
    from dlp import data, export, models
    from dlp.statistics import collect_statistics

    torch.manual_seed(0)
    args.work.mkdir(parents=True, exist_ok=True)
    base, tok, ref = models.load_model("smollm2-135m")
    windows = data.calibration_windows(tok, data.load_text("c4"), 32, 512, 0)
    ids = data.evaluation_tokens(tok, data.load_text("wikitext2"))
    sweep = [("wanda", 0.7)] if args.no_sweep else SWEEP
    done = all((args.work / f"{m}-dlp{int(p * 100)}" / "config.json").exists() for m, p in sweep)
    stats = None if done else collect_statistics(base, windows)  # only the pruning reads them
    variants = [pruned_variant(args.work, base, tok, windows, stats, m, p) for m, p in sweep]
    bf16 = args.work / "dense-bf16"
    if not (bf16 / "config.json").exists():
        copy.deepcopy(base).to(torch.bfloat16).save_pretrained(bf16)
    dense = {"float32": export.weight_bytes(ref.path), "bfloat16": export.weight_bytes(bf16)}
    del base
    result = {"dense_bytes": dense, "group_size": args.group_size,
              "quantized": quantized_rows(args.work, args.work / "wanda-dlp70", windows, ids, args),
              "sweep": [] if args.no_sweep else sweep_rows(args.work, Path(ref.path), variants)}
    print_tables(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


def print_tables(result: dict) -> None:
    d32, d16 = result["dense_bytes"]["float32"], result["dense_bytes"]["bfloat16"]
    print(f"\ndense checkpoint: float32 {d32 / 2**20:.1f} MiB, bfloat16 {d16 / 2**20:.1f} MiB; group size {result['group_size']}")
    print(f"{'checkpoint':<20} {'MiB':>7} {'vs f32':>7} {'vs bf16':>8} {'ppl':>9} {'before':>9} {'sparsity':>9} {'equal':>6} {'s':>6}")
    for r in result["quantized"]:
        print(f"{r['name']:<20} {r['bytes'] / 2**20:>7.1f} {r['bytes'] / d32:>7.3f} {r['bytes'] / d16:>8.3f} {r['ppl']:>9.2f} "
              f"{r['ppl_before']:>9.2f} {r['sparsity_loaded']:>9.4f} {str(r['sparsity_equal']):>6} {r['seconds']:>6.0f}")
    sweep = result["sweep"]
    if not sweep:
        return
    dense_total, stored_total = sum(r["dense"] for r in sweep), sum(r["stored"] for r in sweep)
    print(f"\n{'variant':<16} {'dense MiB':>10} {'stored MiB':>11} {'ratio':>7} {'bit-exact':>10}")
    for r in sweep:
        print(f"{r['variant']:<16} {r['dense'] / 2**20:>10.1f} {r['stored'] / 2**20:>11.2f} {r['stored'] / r['dense']:>7.3f} {str(r['bit_exact']):>10}")
    print(f"{'6 variants':<16} {dense_total / 2**20:>10.1f} {stored_total / 2**20:>11.2f} {stored_total / dense_total:>7.3f}"
          f"   (+ the base once: {(stored_total + d32) / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
