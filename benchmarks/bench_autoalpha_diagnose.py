"""Why the alpha proxy misleads, measured on one grid cell (``bench_autoalpha_grid.py diagnose``).

For each alpha of ``--alphas`` (the first ``--statistics``), the candidate is pruned by every scorer the search
could use -- the final run itself (the pruner, sequential, all calibration windows), the pruner one-shot on a
quarter of the windows (the old confirm stage), Wanda one-shot from the statistics (the screen) -- and each
pruned model is scored on ``--heldout`` held-out calibration windows (32 by default; the search's default 8
are their first 8). The final run's model is also scored on the WikiText-2 test windows: the truth.

Printed per scorer: the held-out proxy at each alpha, the alpha it would pick, the truth at that alpha, and
the gain over uniform with its bootstrap lower bound on the first 8 and on all held-out windows. Everything is
cached under ``<cache>/diagnose/`` (candidates by key, test perplexities by scorer and alpha).
"""
from __future__ import annotations

import json
import math

from bench_autoalpha_grid import JsonFileCache, eval_path, log, read_json, write_json
from dlp.autoalpha import Proxy, Scorer, bootstrap_gain
from dlp.perplexity import perplexity


def scorers(pruner: str, nsamples: int) -> dict[str, Scorer]:
    out = {"final": Scorer(pruner, "sequential", nsamples)}
    if pruner != "magnitude":
        out["screen"] = Scorer("wanda", "oneshot")
    if pruner == "sparsegpt":
        out["oneshot/4"] = Scorer("sparsegpt", "oneshot", max(1, nsamples // 4))
    return out


def diagnose(grid, args) -> None:
    pruner, stat, calib, p = args.pruners[0], args.statistics[0], args.calibrations[0], args.sparsities[0]
    text, windows, stats, _, held = grid.calibration(calib)
    name = f"{pruner}-{calib}-{stat}-p{p:g}-h{args.heldout}"
    cache = JsonFileCache(grid.root / "diagnose" / f"{calib}-p{p:g}-h{args.heldout}.json")
    truth_path = grid.root / "diagnose" / f"{name}-truth.json"
    truth = read_json(truth_path) or {}
    proxy = Proxy(grid.net, stats, windows, held, pattern="unstructured", sparsity=p, cache=cache)
    table = {}
    for tag, scorer in scorers(pruner, args.nsamples).items():
        for a in args.alphas:
            score = proxy(scorer, a, stat)
            table[(tag, a)] = score
            if tag == "final" and f"{a:g}" not in truth:
                known = read_json(eval_path(grid.root, pruner, calib, p, proxy.ratios(a, stat)))
                if known is None and not proxy._dirty:
                    proxy._prune(scorer, proxy.ratios(a, stat))  # served from the cache: prune again
                truth[f"{a:g}"] = known["ppl"] if known else perplexity(
                    grid.net, grid.test_ids, args.eval_seqlen, max_windows=args.eval_windows)["ppl"]
                write_json(truth_path, truth)
            proxy.restore()
            log(f"{tag:10s} alpha {a:.4f}: proxy {score.proxy:.2f} ({score.seconds:.0f}s)")
    report(table, truth, args.alphas, name)


def report(table: dict, truth: dict, alphas: list[float], name: str) -> None:
    print(f"## {name}")
    print("| scorer | " + " | ".join(f"α={a:g}" for a in alphas) + " | picks | truth there |")
    print("|---|" + "---|" * (len(alphas) + 2))
    print("| truth (WikiText-2 test) | " + " | ".join(f"{truth[f'{a:g}']:.2f}" for a in alphas) + " | | |")
    for tag in dict.fromkeys(t for t, _ in table):
        vals = [table[(tag, a)].proxy for a in alphas]
        pick = alphas[vals.index(min(vals))]
        print(f"| {tag} (held-out) | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {pick:g} | "
              f"{truth[f'{pick:g}']:.2f} |")
    print()
    print("| scorer | α | gain vs uniform, 8 windows (lower 95 %) | all windows (lower 95 %) | truth gain |")
    print("|---|---|---|---|---|")
    for (tag, a), score in table.items():
        base = table[(tag, alphas[0])]
        if a == alphas[0] or not math.isfinite(score.proxy):
            continue
        g8, l8 = bootstrap_gain(base.losses[:8], score.losses[:8])
        g, lo = bootstrap_gain(base.losses, score.losses)
        real = math.log(truth[f"{alphas[0]:g}"]) - math.log(truth[f"{a:g}"])
        print(f"| {tag} | {a:g} | {g8:+.4f} ({l8:+.4f}) | {g:+.4f} ({lo:+.4f}) | {real:+.4f} |")
    print(json.dumps({"name": name}))
