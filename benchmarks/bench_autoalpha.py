"""Automatic alpha on the bundled SmolLM2-135M: the final-note table, and the proxy's justification.

  # table: uniform, alpha = 0.15 (median, mean) and auto, per pruner (sequential): WikiText-2 perplexity
  # (first 16 x 2048 tokens) and wall time (statistics + search + prune), side by side in one process
  python benchmarks/bench_autoalpha.py table --json auto_table.json

  # rank: for an alpha grid, the real WikiText-2 perplexity (sequential prune) against the proxy
  # (held-out C4 perplexity) in its real and its cheap (oneshot) modes; rank correlations and regret
  python benchmarks/bench_autoalpha.py rank --json auto_rank.json

Calibration: C4, 32 x 512, seed 0 (DLP_DATA_DIR); held-out proxy windows: the next 8 draws of that seed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DLP_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dlp import allocation, data  # noqa: E402
from dlp.autoalpha import DenseWeights, alpha_max, choose_alpha, heldout_windows  # noqa: E402
from dlp.models import load_model  # noqa: E402
from dlp.perplexity import perplexity  # noqa: E402
from dlp.pruning import prune  # noqa: E402
from dlp.statistics import collect_statistics  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def setup(args):
    t = time.perf_counter()
    net, tok, ref = load_model(args.model)
    net.to(args.device)  # a GPU run keeps the model there (perplexity and pruning move nothing)
    text = data.load_text(args.calibration)
    windows = data.calibration_windows(tok, text, args.nsamples, args.seqlen, args.seed)
    heldout = heldout_windows(tok, text, args.nsamples, args.seqlen, args.seed, args.heldout)
    test_ids = data.evaluation_tokens(tok, data.load_text("wikitext2"))
    log(f"loaded {ref.source}, {tuple(windows.shape)} calibration, {tuple(heldout.shape)} held out "
        f"({time.perf_counter() - t:.1f}s)")
    return net, windows, heldout, test_ids


def wikitext(net, test_ids, args) -> float:
    return perplexity(net, test_ids, args.eval_seqlen, max_windows=args.eval_windows, device=args.device)["ppl"]


# ------------------------------------------------------------------ table
def table(args) -> dict:
    net, windows, heldout, test_ids = setup(args)
    dense = DenseWeights(net)
    rows = []
    t = time.perf_counter()
    stats = collect_statistics(net, windows, device=args.device)
    stats_s = time.perf_counter() - t
    log(f"statistics {stats_s:.1f}s")
    for method in args.methods:
        configs = [("uniform", 0.0, "median")] + [(f"alpha={a:g}", a, s) for a in args.alphas for s in args.statistics]
        configs.append(("auto", None, args.auto_statistic))
        configs = [c for c in configs if c[0].split("=")[0] in args.rows]
        for name, alpha, stat in configs:
            dense.restore()
            search = None
            t = time.perf_counter()
            if alpha is None:
                search = choose_alpha(net, stats, windows, heldout=heldout, method=method, mode="sequential",
                                      sparsity=args.sparsity, statistic=stat, device=args.device, budget=args.budget)
                ratios, alpha, stat = search.ratios, search.alpha, search.statistic
            elif alpha == 0:
                ratios = allocation.uniform(len(stats.blocks), args.sparsity).ratios
            else:
                ratios = allocation.dlp(stats, args.sparsity, alpha, stat).ratios
            search_s = time.perf_counter() - t
            report = prune(net, ratios, method=method, mode="sequential", windows=windows, device=args.device)
            prune_s = report.seconds
            # uniform needs no statistics; every other row pays for the one statistics sweep
            total = (0.0 if name == "uniform" else stats_s) + search_s + prune_s
            ppl = wikitext(net, test_ids, args) if args.eval_windows > 0 else float("nan")
            row = {"method": method, "allocation": name, "alpha": alpha, "statistic": stat if alpha else None,
                   "wikitext2_ppl": ppl, "achieved_sparsity": report.overall, "stats_s": stats_s if name != "uniform" else 0.0,
                   "search_s": search_s, "prune_s": prune_s, "total_s": total}
            if search is not None:
                row["search"] = search.to_json()
                if args.report_dir:
                    search.save(Path(args.report_dir) / f"{method}-{args.sparsity:g}")
            rows.append(row)
            log(f"{method:9s} {name:18s} alpha={alpha:.4f} {row['statistic'] or '':6s} ppl={ppl:9.2f} "
                f"time={total:7.1f}s (search {search_s:.1f}s, prune {prune_s:.1f}s)")
    dense.restore()
    print_table(rows)
    return {"rows": rows, "settings": vars(args)}


def print_table(rows: list[dict]) -> None:
    print(f"| pruner | allocation | α | statistic | WikiText-2 ppl | wall s (stats+search+prune) | × α=0.15 run |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        base = [x for x in rows if x["method"] == r["method"] and x["allocation"] == "alpha=0.15"]
        ratio = r["total_s"] / base[0]["total_s"] if base else float("nan")
        print(f"| {r['method']} | {r['allocation']} | {r['alpha']:.4f} | {r['statistic'] or '-'} | "
              f"{r['wikitext2_ppl']:.2f} | {r['total_s']:.1f} ({r['stats_s']:.0f}+{r['search_s']:.0f}+{r['prune_s']:.0f}) "
              f"| {ratio:.2f} |")


# ------------------------------------------------------------------ rank
def spearman(a: list[float], b: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for pos, i in enumerate(order):
            r[i] = float(pos)
        return r

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var else float("nan")


def rank(args) -> dict:
    net, windows, heldout, test_ids = setup(args)
    dense = DenseWeights(net)
    stats = collect_statistics(net, windows, device=args.device)
    held_ids = heldout.reshape(1, -1)
    half = heldout[: max(1, heldout.shape[0] // 2)].reshape(1, -1)

    def proxy(ids):
        return perplexity(net, ids, args.seqlen, device=args.device)["ppl"]

    points = []
    for method in args.methods:
        cheap = [("oneshot", None)] if method == "wanda" else [("oneshot", args.subset)]
        seen_uniform = False
        for stat in args.statistics:
            hi = alpha_max(stats.statistic(stat), args.sparsity, 0.01)
            grid = sorted({0.0, *[round(hi * f, 4) for f in args.fractions], *[a for a in args.alphas if a < hi]})
            for alpha in grid:
                if alpha == 0 and seen_uniform:
                    continue
                seen_uniform |= alpha == 0
                ratios = (allocation.uniform(len(stats.blocks), args.sparsity).ratios if alpha == 0
                          else allocation.dlp(stats, args.sparsity, alpha, stat).ratios)
                row = {"method": method, "statistic": stat if alpha else "uniform", "alpha": alpha, "alpha_hi": hi}
                t = time.perf_counter()
                dense.restore()
                prune(net, ratios, method=method, mode="sequential", windows=windows, device=args.device)
                row["prune_sequential_s"] = time.perf_counter() - t
                row["wikitext2_ppl"] = wikitext(net, test_ids, args)
                row["proxy_sequential"] = proxy(held_ids)
                row["proxy_sequential_half"] = proxy(half)
                for mode, sub in cheap:
                    tag = f"{mode}" + (f"{sub}" if sub else "")
                    dense.restore()
                    t = time.perf_counter()
                    prune(net, ratios, method=method, mode=mode, windows=windows[:sub] if sub else windows,
                          stats=stats, device=args.device)
                    row[f"prune_{tag}_s"] = time.perf_counter() - t
                    t = time.perf_counter()
                    row[f"proxy_{tag}"] = proxy(held_ids)
                    row["proxy_eval_s"] = time.perf_counter() - t
                    row[f"proxy_{tag}_half"] = proxy(half)
                points.append(row)
                log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
                if args.json:  # partial results survive a time limit
                    Path(args.json).write_text(json.dumps({"points": points, "settings": vars(args)}, indent=1))
    dense.restore()
    summary = summarize(points)
    for line in summary["lines"]:
        print(line)
    return {"points": points, "summary": summary, "settings": vars(args)}


def summarize(points: list[dict]) -> dict:
    """Per pruner (and per statistic, and pooled over both statistics): Spearman rho of each proxy with the
    real perplexity, and the regret of each proxy's argmin (its real perplexity / the best real one)."""
    out, lines = {}, []
    for method in sorted({p["method"] for p in points}):
        pts = [p for p in points if p["method"] == method]
        proxies = [k for k in pts[0] if k.startswith("proxy_") and not k.endswith("_s")]
        for scope in ["pooled", *sorted({p["statistic"] for p in pts} - {"uniform"})]:
            sel = [p for p in pts if scope == "pooled" or p["statistic"] in (scope, "uniform")]
            real = [p["wikitext2_ppl"] for p in sel]
            best = min(real)
            real_best = sel[real.index(best)]
            for k in proxies:
                vals = [p[k] for p in sel]
                pick = sel[vals.index(min(vals))]
                rho = spearman(vals, real)
                out[f"{method}/{scope}/{k}"] = {"spearman": rho, "picked": [pick["statistic"], pick["alpha"]],
                                                "picked_ppl": pick["wikitext2_ppl"], "best": [real_best["statistic"], real_best["alpha"]],
                                                "best_ppl": best, "regret": pick["wikitext2_ppl"] / best}
                lines.append(f"{method:9s} {scope:7s} {k:26s} rho={rho:+.3f} picks {pick['statistic']}@{pick['alpha']:.4f} "
                             f"(ppl {pick['wikitext2_ppl']:.2f}); best {real_best['statistic']}@{real_best['alpha']:.4f} "
                             f"(ppl {best:.2f}); regret x{pick['wikitext2_ppl'] / best:.3f}")
    return {"by": out, "lines": lines}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["table", "rank"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calibration", default="c4")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heldout", type=int, default=8, help="held-out calibration windows for the proxy")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    ap.add_argument("--alphas", nargs="+", type=float, default=[0.15], help="fixed alphas (table rows; rank grid)")
    ap.add_argument("--statistics", nargs="+", default=["median", "mean"])
    ap.add_argument("--auto-statistic", default="auto")
    ap.add_argument("--budget", type=int, default=None, help="proxy evaluations of the auto search")
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.25, 0.5, 0.75, 1.0], help="rank: grid as fractions of alpha_hi")
    ap.add_argument("--subset", type=int, default=8, help="rank: calibration windows of the cheap SparseGPT proxy")
    ap.add_argument("--eval-windows", type=int, default=16, help="0: skip the perplexity (timings only)")
    ap.add_argument("--rows", nargs="+", default=["uniform", "alpha", "auto"], help="table: which rows")
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--report-dir", default=None, help="table: write each search's JSON + PNG here")
    ap.add_argument("--json", default=None, help="write the full results here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    start = time.perf_counter()
    result = table(args) if args.what == "table" else rank(args)
    result["seconds"] = time.perf_counter() - start
    result["device"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu x{torch.get_num_threads()}"
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    log(f"done in {result['seconds']:.0f}s")


if __name__ == "__main__":
    main()
