"""Engine benchmark on the bundled SmolLM2-135M: forward passes per block, wall time and peak RSS of
each stage, each as a multiple of one plain batched forward of the whole model over the same tokens.

    .venv/bin/python benchmarks/bench_engine.py [--nsamples 32 --seqlen 512 --calibration wikitext2-valid]

Reads the data under DLP_DATA_DIR (default ../shared/data) and prints the authors' released-code figures
from ../shared/reference beside ours (those were taken on a shared machine: indicative only).
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DLP_DATA_DIR", str(ROOT.parent / "shared" / "data"))


class PeakRSS:
    """Samples this process's RSS every 5 ms while a stage runs; ``peak_mb`` is the highest seen."""

    def __init__(self):
        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--calibration", default="wikitext2-valid")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--alpha", type=float, default=0.15)
    ap.add_argument("--statistic", default="mean")
    ap.add_argument("--floor-batch", type=int, default=None, help="windows per batch for the floor forward")
    args = ap.parse_args()

    from dlp import allocation, data
    from dlp.decoder import find_decoder
    from dlp.models import load_model
    from dlp.pruning import prune
    from dlp.statistics import collect_statistics

    model, tok, ref = load_model("smollm2-135m")
    windows = data.calibration_windows(tok, data.load_text(args.calibration), args.nsamples, args.seqlen, 0)
    layout = find_decoder(model)
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    hidden_mb = windows.numel() * model.config.hidden_size * 4 / 2**20
    print(f"model {ref.source}: {layout.num_blocks} blocks, weights {weights_mb:.0f} MiB; calibration "
          f"{args.nsamples} x {args.seqlen} ({args.calibration}), hidden states {hidden_mb:.0f} MiB per buffer; "
          f"torch threads {torch.get_num_threads()}")

    rows = []
    # the floor: one plain forward of the whole model over the same tokens, batched as memory allows
    batch = args.floor_batch or max(1, 8192 // args.seqlen)
    with torch.no_grad(), PeakRSS() as m:
        for chunk in windows.split(batch):
            model(input_ids=chunk, use_cache=False)
    floor = m.seconds
    rows.append(("floor: plain batched forward", 1, m.seconds, m.peak_mb))

    with PeakRSS() as m:
        stats = collect_statistics(model, windows)
    rows.append(("statistics (DLP + OWL)", stats.meta["block_passes"], m.seconds, m.peak_mb))
    t_stats = m.seconds

    with PeakRSS() as m:
        rates = allocation.dlp(stats, args.sparsity, args.alpha, args.statistic)
    rows.append(("DLP rates", 0, m.seconds, m.peak_mb))
    t_rates = m.seconds

    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with PeakRSS() as m:
        rep = prune(model, rates.ratios, method="wanda", mode="oneshot", stats=stats)
    rows.append(("Wanda one-shot (from statistics)", rep.block_passes, m.seconds, m.peak_mb))
    t_oneshot = m.seconds

    model.load_state_dict(dense)
    with PeakRSS() as m:
        rep_seq = prune(model, rates.ratios, method="wanda", mode="sequential", windows=windows)
    rows.append(("Wanda sequential (prune pass)", rep_seq.block_passes, m.seconds, m.peak_mb))
    t_seq = m.seconds

    print(f"\n{'stage':<36} {'fwd/block':>9} {'seconds':>9} {'x floor':>8} {'peak RSS MiB':>13}")
    for name, passes, sec, peak in rows:
        print(f"{name:<36} {passes:>9.0f} {sec:>9.2f} {sec / floor:>8.2f} {peak:>13.0f}")
    print(f"{'statistics + rates + one-shot Wanda':<36} {stats.meta['block_passes'] + rep.block_passes:>9.0f} "
          f"{t_stats + t_rates + t_oneshot:>9.2f} {(t_stats + t_rates + t_oneshot) / floor:>8.2f}")
    print(f"{'statistics + rates + sequential Wanda':<36} {stats.meta['block_passes'] + rep_seq.block_passes:>9.0f} "
          f"{t_stats + t_rates + t_seq:>9.2f} {(t_stats + t_rates + t_seq) / floor:>8.2f}")
    print("targets: statistics <= 1.5x floor; statistics + rates + one-shot Wanda <= 2x floor")
    block_mb = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in layout.blocks) / 2**20
    print(f"memory target: weights {weights_mb:.0f} + one block {block_mb:.0f} + 2 hidden buffers {2 * hidden_mb:.0f} MiB "
          f"(+ the Python/torch runtime)")

    ref_file = ROOT.parent / "shared" / "reference" / "smollm2-135m.json"
    if ref_file.exists():
        cost = json.loads(ref_file.read_text())["cost_on_this_cpu"]
        calls = cost["block_forward_calls"]
        print(f"\nreleased code (reference file; {cost['note']}):")
        print(f"  ratio pass {cost['ratio_pass_s']} s, prune pass {cost['prune_pass_s']} s, peak RSS {cost['peak_rss_mb']} MB; "
              f"block forwards per block per sample: {calls['per_block_per_sample']} "
              f"({calls['ratio_pass']} per-sample calls in the ratio pass + {calls['prune_pass']} in the prune pass)")
        ours = stats.meta["block_passes"] + rep_seq.block_passes
        print(f"  ours, same job (statistics + sequential Wanda): {ours:.0f} batched passes per block, "
              f"{t_stats + t_rates + t_seq:.1f} s")


if __name__ == "__main__":
    main()
