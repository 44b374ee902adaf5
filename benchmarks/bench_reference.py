"""Reproduction of the authors' released code on the bundled SmolLM2-135M: the perplexity figures.

The cheap reference checks (block statistic, per-block sparsities, block-0 masks, achieved sparsity) run in the
test suite (tests/test_reference.py); the whole-model perplexities take minutes on 2 cores, so they are here:
dense and sequential Wanda + DLP (mean, alpha 0.15, 70 %, calibration 32 x 512 from wikitext-2/valid.txt, seed 0)
on the first 64 x 512 WikiText-2 test tokens, against ../shared/reference/smollm2-135m.json, within the same
tolerances the suite once used (dense 0.5 %, pruned 5 %). ``--long`` adds the 16 x 2048 figures. Prints one
markdown row per check and exits 1 when any is out of tolerance.

    .venv/bin/python benchmarks/bench_reference.py [--long]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DLP_DATA_DIR", str(ROOT.parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REFERENCE = ROOT.parent / "shared" / "reference"
TOLERANCE = {"dense": 0.005, "wanda_dlp_mean_0.7": 0.05}


def block0_agreement(model, folder: Path = REFERENCE) -> tuple[float, int]:
    """Fraction of block-0 positions whose zero / non-zero state matches the released code's masks (the suite's
    tests/test_reference.py asks the same function), and the number of positions."""
    masks = np.load(Path(folder) / "smollm2-135m-wanda-dlp-mean-0.7-block0-masks.npz")
    params = dict(model.named_parameters())
    agree = total = 0
    for name in masks.files:
        w = params[name].detach().numpy()
        theirs = np.unpackbits(masks[name])[: w.size].reshape(w.shape).astype(bool)
        agree += int(((w == 0) == theirs).sum())
        total += w.size
    return agree / total, total


def check(rows: list[tuple[str, bool]], name: str, ours: float, theirs: float, tol: float) -> None:
    ok = abs(ours / theirs - 1) <= tol
    rows.append((f"| {name} | {tol:.1%} | {ours:.4f} (reference {theirs:.4f}, {ours / theirs - 1:+.2%}) | "
                 f"{'ok' if ok else 'OUT OF TOLERANCE'} |", ok))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--long", action="store_true", help="also the 16 x 2048 perplexities (about 2 x 100 s more)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="calibration windows per forward in the prune pass (default: the engine's, 5 for SmolLM2; "
                         "the released code runs 1); only the float summation order changes")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense perplexities")
    args = ap.parse_args()
    from dlp import allocation, data
    from dlp.models import load_model
    from dlp.perplexity import perplexity
    from dlp.pruning import prune
    from dlp.statistics import collect_statistics

    ref = json.loads((REFERENCE / "smollm2-135m.json").read_text())
    protocols = [("first_64_windows_of_512", 512, 64)] + ([("first_16_windows_of_2048", 2048, 16)] if args.long else [])
    model, tok, _ = load_model("smollm2-135m")
    ids = data.evaluation_tokens(tok, data.load_text("wikitext2"))
    windows = data.calibration_windows(tok, data.load_text("wikitext2-valid"), 32, 512, 0)
    rows: list[tuple[str, bool]] = []
    t0 = time.perf_counter()
    for label, seqlen, n in ([] if args.no_dense else protocols):
        ppl = perplexity(model, ids, seqlen, max_windows=n)["ppl"]
        check(rows, f"dense perplexity, {label}", ppl, ref["perplexity"][label]["dense"], TOLERANCE["dense"])
    stats = collect_statistics(model, windows)
    rates = allocation.dlp(stats, 0.7, 0.15, "mean")
    report = prune(model, rates.ratios, method="wanda", mode="sequential", windows=windows, batch_size=args.batch_size)
    agree, total = block0_agreement(model)
    rows.append((f"| block-0 zero pattern, sequential Wanda + DLP | >= 99.9 % | {agree:.4%} of {total:,} positions | "
                 f"{'ok' if agree >= 0.999 else 'OUT OF TOLERANCE'} |", agree >= 0.999))
    for label, seqlen, n in protocols:
        ppl = perplexity(model, ids, seqlen, max_windows=n)["ppl"]
        check(rows, f"Wanda + DLP perplexity, {label} (achieved sparsity {report.overall:.6f}, reference "
                    f"{ref['pruning']['achieved_sparsity']:.6f})", ppl, ref["perplexity"][label]["wanda_dlp_mean_0.7"],
              TOLERANCE["wanda_dlp_mean_0.7"])
    batch = args.batch_size or "engine default"
    print(f"\nagainst {REFERENCE / 'smollm2-135m.json'}, prune batch {batch} ({time.perf_counter() - t0:.0f} s)")
    print("| check | tolerance | result | verdict |\n|---|---|---|---|")
    for row, _ in rows:
        print(row)
    return 0 if all(ok for _, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
