"""Why the alpha proxy misleads, measured on one grid cell (``bench_autoalpha_grid.py diagnose``).

For each alpha of ``--alphas`` (the first of ``--statistics``), the candidate is pruned by each scorer a
search could use -- the final run itself (the pruner, sequential, all calibration windows: the grid's own
evaluation, also scored on the WikiText-2 test windows, the truth), the pruner one-shot on a quarter of the
windows (the confirm stage before issue 14), Wanda one-shot from the statistics (the screen) -- and scored on
the grid's ``--heldout`` held-out calibration windows (the search's default 8 are their first 8).

Printed per scorer: the held-out proxy at each alpha, the alpha it would pick and the truth there, and each
alpha's gain over uniform (mean per-window loss drop) with its 95 % bootstrap lower bound on the first 8 and on
all held-out windows, beside the truth's gain. Cached under ``<cache>/diagnose/`` and ``<cache>/evals/``.
"""
from __future__ import annotations

import math

from bench_autoalpha_grid import JsonFileCache, fixed_ratios, log
from dlp.autoalpha import Proxy, Score, Scorer, bootstrap_gain


def scorers(pruner: str, nsamples: int) -> dict[str, Scorer]:
    out = {}
    if pruner != "magnitude":
        out["screen"] = Scorer("wanda", "oneshot")
    if pruner == "sparsegpt":
        out["oneshot/4"] = Scorer("sparsegpt", "oneshot", max(1, nsamples // 4))
    return out


def diagnose(grid, args) -> None:
    pruner, stat, calib, p = args.pruners[0], args.statistics[0], args.calibrations[0], args.sparsities[0]
    _, windows, stats, _, held = grid.calibration(calib)
    cache = JsonFileCache(grid.root / "diagnose" / f"{calib}-p{p:g}-h{args.heldout}.json")
    proxy = Proxy(grid.net, stats, windows, held, pattern="unstructured", sparsity=p, cache=cache)
    table, truth = {}, {}
    for a in args.alphas:
        ev = grid.evaluate(pruner, calib, p, fixed_ratios(stats, p, a, stat))
        truth[a] = ev["ppl"]
        table[("final", a)] = Score.of(ev["heldout_losses"])
        log(f"final      alpha {a:.4f}: truth {ev['ppl']:.2f}, proxy {table[('final', a)].proxy:.2f}")
    for tag, scorer in scorers(pruner, args.nsamples).items():
        for a in args.alphas:
            table[(tag, a)] = proxy(scorer, a, stat)
            proxy.restore()
            log(f"{tag:10s} alpha {a:.4f}: proxy {table[(tag, a)].proxy:.2f} ({table[(tag, a)].seconds:.0f}s)")
    report(table, truth, args.alphas, f"{pruner} {stat} {calib} p={p:g}, {args.heldout} held-out windows")


def report(table: dict, truth: dict, alphas: list[float], name: str) -> None:
    print(f"## {name}\n")
    print("| scorer | " + " | ".join(f"α={a:g}" for a in alphas) + " | picks | truth there |")
    print("|---|" + "---|" * (len(alphas) + 2))
    print("| truth (WikiText-2 test) | " + " | ".join(f"{truth[a]:.2f}" for a in alphas) + " | | |")
    for tag in dict.fromkeys(t for t, _ in table):
        vals = [table[(tag, a)].proxy for a in alphas]
        pick = alphas[vals.index(min(vals))]
        print(f"| {tag} (held-out) | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {pick:g} | {truth[pick]:.2f} |")
    print("\n| scorer | α | gain over uniform, 8 windows (lower 95 %) | all windows (lower 95 %) | truth's gain |")
    print("|---|---|---|---|---|")
    for (tag, a), score in table.items():
        base = table[(tag, alphas[0])]
        if a == alphas[0] or not math.isfinite(score.proxy):
            continue
        g8, l8 = bootstrap_gain(base.losses[:8], score.losses[:8])
        g, lo = bootstrap_gain(base.losses, score.losses)
        print(f"| {tag} | {a:g} | {g8:+.4f} ({l8:+.4f}) | {g:+.4f} ({lo:+.4f}) | "
              f"{math.log(truth[alphas[0]]) - math.log(truth[a]):+.4f} |")
