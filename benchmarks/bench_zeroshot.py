"""Benchmark: zero-shot suite (lm-eval 0.4.x, offline tasks) on the bundled SmolLM2-135M, CPU.

    python benchmarks/bench_zeroshot.py                 # 7 tasks, first 100 documents each
    python benchmarks/bench_zeroshot.py --full          # every document (long on 2 cores)
    python benchmarks/bench_zeroshot.py --tasks all --limit 50 --json out.json

Prints the model load time, the evaluation wall time, the peak RSS of the process and the per-task
accuracies. Data: --data-dir, else DLP_DATA_DIR, else ../shared/data beside the project root.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="zero-shot-7", help="task names, comma list, or a group (zero-shot-7, all)")
    parser.add_argument("--limit", type=int, default=100, help="documents per task (default 100)")
    parser.add_argument("--full", action="store_true", help="evaluate every document (overrides --limit)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    data_dir = args.data_dir or os.environ.get("DLP_DATA_DIR") or str(ROOT.parent / "shared" / "data")

    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    from dlp.models import load_model
    from dlp.zeroshot import evaluate_zero_shot

    t0 = time.perf_counter()
    model, tokenizer, ref = load_model("smollm2-135m")
    load_s = time.perf_counter() - t0
    limit = None if args.full else args.limit

    t0, c0 = time.perf_counter(), _cpu_s()
    report = evaluate_zero_shot(model, tokenizer, args.tasks, limit=limit, batch_size=args.batch_size,
                                data_dir=data_dir)
    eval_s, cpu_s = time.perf_counter() - t0, _cpu_s() - c0

    print()
    print(f"model        smollm2-135m ({ref.path})")
    print(f"lm-eval      {report['harness_version']}   limit={limit}   batch_size={args.batch_size}   "
          f"torch threads={torch.get_num_threads()}")
    print(f"{'task':<16}{'n':>7}{'acc':>9}{'acc_norm':>10}")
    def fmt(value) -> str:
        return "-" if value is None else f"{value:.4f}"

    for name, entry in report["tasks"].items():
        print(f"{name:<16}{entry['n_samples']:>7}{fmt(entry.get('acc')):>9}{fmt(entry.get('acc_norm')):>10}")
    print(f"{'mean':<16}{'':>7}{fmt(report['mean_acc']):>9}{fmt(report['mean_acc_norm']):>10}")
    print(f"model load   {load_s:.1f} s")
    print(f"wall time    {eval_s:.1f} s (evaluation)")
    print(f"cpu time     {cpu_s:.1f} s (user+sys, evaluation; other load on the machine inflates wall time)")
    print(f"peak RSS     {peak_rss_mib():.0f} MiB")
    if args.json:
        report["bench"] = {"load_s": load_s, "eval_s": eval_s, "cpu_s": cpu_s, "peak_rss_mib": peak_rss_mib()}
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
