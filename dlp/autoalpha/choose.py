"""The alpha search: screen cheaply, confirm with the pruner the user runs, keep uniform unless it clearly loses.

1. **Screen** (:func:`screen`): :func:`search` over ``alpha in [0, alpha_hi]`` per statistic, each candidate
   pruned by the cheap :func:`screen_scorer` (magnitude itself; Wanda one-shot from the cached statistics for
   Wanda and SparseGPT: no forward pass) and scored on the held-out windows.
2. **Confirm** (:func:`finalists`): uniform and the screened best (with ``confirm >= 3``, that alpha shrunk
   towards uniform) are pruned by :func:`final_scorer` -- the user's pruner, in the user's mode, on all the
   calibration windows, exactly as the final run will prune them -- and scored on the same windows. Skipped
   when the screen already used the final scorer (magnitude, Wanda one-shot): the screen decides.
3. **Decide** (:mod:`.decision`): the best finalist replaces uniform only when its gain exceeds the proxy's
   noise, measured by resampling the held-out windows.

With a fixed ``alpha`` and ``statistic="auto"`` only the statistic is chosen: both are confirmed and the
median (the paper's) stays unless the mean beats it beyond the noise.

Cost, against one fixed-alpha run (statistics ``S`` + one prune ``P``): the statistics are shared; the screen
costs ``budget`` cheap prunes (no forward) and proxy forwards ``E`` over the held-out tokens; the confirm
stage at most ``confirm`` prunes ``P`` (one when the screen's best is uniform; none for magnitude and Wanda
one-shot) and forwards ``E``; the run then prunes once more. Defaults (budget 6, confirm 2, 4096 held-out
tokens, 32 x 512 calibration): ``S + 3P + 8E`` against ``S + P``, i.e. at most 3x while the eight proxy
forwards (32768 tokens) cost no more than two statistics passes (2 x 16384 tokens); ``cost`` in the result
counts the evaluations, block passes and seconds so the bound can be checked on each run.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, MutableMapping

import torch
from torch import nn

from .. import allocation
from ..errors import DLPError
from ..statistics import BlockStatistics
from .decision import LEVEL, Candidate, best_candidate, decide
from .proxy import Proxy, Score, Scorer, candidate_key, heldout_windows
from .result import AlphaSearch
from .search import alpha_max, search

STATISTICS = allocation.STATISTICS  # ("median", "mean")
SEARCH_VERSION = "confirm-bootstrap-1"  # the bench's cache of whole searches; bump when the rule changes


def screen_scorer(method: str) -> Scorer:
    """Scores the screen's candidates: magnitude itself (it reads no data); for Wanda and SparseGPT, Wanda
    one-shot from the cached statistics (a forward pass per candidate would cost a whole run)."""
    return Scorer("magnitude") if method == "magnitude" else Scorer("wanda", "oneshot")


def final_scorer(method: str, mode: str, windows: int | None) -> Scorer:
    """Scores the finalists as the final run prunes: the pruner, its mode, all ``windows`` calibration
    windows (Wanda one-shot reads the statistics' norms, which are those windows' own)."""
    if method == "magnitude" or (method == "wanda" and mode == "oneshot"):
        return screen_scorer(method)
    if windows is None:
        raise DLPError(f"{method} ({mode}) needs the calibration windows for the alpha search")
    return Scorer(method, mode, windows)


def default_heldout_count(seqlen: int, tokens: int = 4096) -> int:
    """Held-out windows for the proxy: about ``tokens`` tokens (8 x 512), at least 2 windows."""
    return max(2, math.ceil(tokens / seqlen))


def default_budget(statistic: str) -> int:
    """Screening evaluations: 6 for one statistic, 8 for both (uniform shared)."""
    return 8 if statistic == "auto" else 6


@dataclass
class Plan:
    """What is searched: the statistics, the alpha range per statistic, the screening budget."""

    statistics: list[str]
    bounds: dict[str, float]  # the exclusive (0, 1) bound of alpha per statistic
    ends: dict[str, float]  # the searched end (``margin`` inside the bound), or the fixed alpha
    lo: float
    budget: int
    fixed: bool

    @classmethod
    def of(cls, stats: BlockStatistics, sparsity: float, statistic: str, budget: int | None,
           alpha: float | None, margin: float) -> "Plan":
        allocation.check_sparsity(sparsity)
        names = list(STATISTICS) if statistic == "auto" else [statistic]
        if any(s not in STATISTICS for s in names):
            raise DLPError(f"unknown statistic '{statistic}'; use one of: {', '.join(STATISTICS)}, auto")
        budget = budget if budget is not None else default_budget(statistic)
        if budget < 1:
            raise DLPError(f"the alpha search needs a budget of at least 1 proxy evaluation, got {budget}")
        bounds = {s: alpha_max(stats.statistic(s), sparsity) for s in names}
        ends = {s: alpha_max(stats.statistic(s), sparsity, margin) for s in names}
        if alpha is not None:
            names = [s for s in names if 0 <= alpha < bounds[s]]
            if not names:
                raise DLPError(f"alpha={alpha} puts a block outside (0, 1) (alpha_max {max(bounds.values()):.4f}); "
                               "lower alpha")
            ends = {s: alpha for s in names}
        return cls(names, bounds, ends, alpha if alpha is not None else 0.0, budget, alpha is not None)


def screen(proxy: Proxy, scorer: Scorer, plan: Plan, coarse: int) -> dict[Candidate, Score]:
    """Stage 1: the coarse grid per statistic (uniform shared), then the better statistic refined with the
    rest of the budget (``plan.budget`` distinct candidates in all, cached ones included)."""
    scores: dict[Candidate, Score] = {}

    def f(s: str) -> Callable[[float], float]:
        def value(a: float) -> float:
            scores[(a, s)] = proxy(scorer, a, s)
            return scores[(a, s)].proxy
        return value

    def left() -> int:
        return max(plan.budget - len({candidate_key(scorer, *k) for k in scores}), 0)

    points: dict[str, list[tuple[float, float]]] = {}
    names = plan.statistics
    for s in names:
        shared = [(a, y.proxy) for (a, _), y in scores.items() if a == 0.0][:1]  # uniform, scored once
        share = plan.budget if len(names) == 1 else min(coarse, len(shared) + left())
        points[s] = search(f(s), plan.lo, plan.ends[s], budget=share, coarse=coarse, known=shared).points
        scores.update({(a, s): y for (a, _), y in list(scores.items()) if a == 0.0})
    if len(names) > 1:  # refine the better statistic with what is left
        best = min(names, key=lambda s: (min(y for _, y in points[s]), names.index(s)))
        search(f(best), plan.lo, plan.ends[best], coarse=coarse, budget=len(points[best]) + left(),
               known=points[best])
    return scores


def finalists(screened: dict[Candidate, Score], plan: Plan, confirm: int) -> list[Candidate]:
    """Stage 2's candidates: with a fixed alpha, that alpha for each statistic; else uniform, the screened
    best and (``confirm >= 3``) the best alpha shrunk towards uniform by 2/3 per step."""
    if plan.fixed:
        return [(plan.lo, s) for s in plan.statistics]
    best = best_candidate(screened, plan.statistics)
    shrunk = [(best[0] * (2 / 3) ** k, best[1]) for k in range(1, max(confirm - 1, 1))]
    return list(dict.fromkeys([(0.0, best[1]), best, *shrunk]))[: max(confirm, 1)]


def choose_alpha(model: nn.Module | Callable[[], nn.Module], stats: BlockStatistics, windows: torch.Tensor | None,
                 *, heldout: torch.Tensor, method: str = "wanda", pattern: str = "unstructured",
                 mode: str = "sequential", sparsity: float = 0.7, statistic: str = "median",
                 device: str = "cpu", budget: int | None = None, confirm: int = 2, alpha: float | None = None,
                 coarse: int = 3, margin: float = 0.01, level: float = LEVEL, batch_size: int | None = None,
                 cache: MutableMapping[str, dict] | None = None) -> AlphaSearch:
    """Choose DLP's alpha (and, with ``statistic="auto"``, the statistic) for this model, pruner, pattern,
    mode and sparsity (module docstring). ``model``: the dense model (or a factory returning it); it is left
    dense. ``windows``: the calibration windows the statistics came from; ``heldout``: windows not among them
    (:func:`heldout_windows`). ``alpha``: fix alpha and only choose the statistic. ``cache`` maps
    :func:`candidate_key` to :meth:`Score.to_json`; cached candidates cost nothing. ``level``: the decision's
    bootstrap confidence (:mod:`.decision`)."""
    start = time.perf_counter()
    model = model if isinstance(model, nn.Module) else model()
    plan = Plan.of(stats, sparsity, statistic, budget, alpha, margin)
    proxy = Proxy(model, stats, windows, heldout, pattern=pattern, sparsity=sparsity, device=device,
                  batch_size=batch_size, cache=cache)
    cheap = screen_scorer(method)
    final = final_scorer(method, mode, None if windows is None else int(windows.shape[0]))
    try:
        screened = {} if plan.fixed else screen(proxy, cheap, plan, coarse)
        confirmed = {}
        if plan.fixed or final != cheap:
            confirmed = {k: proxy(final, *k) for k in finalists(screened, plan, confirm)}
        deciding = _unique_uniform(confirmed or screened)
        base = next(k for k in deciding if k[0] == plan.lo)  # uniform; with a fixed alpha, the median
        decision = decide(deciding, base, plan.statistics, level=level)
    finally:
        proxy.restore()
    settings = {"method": method, "pattern": str(pattern), "mode": mode, "sparsity": sparsity,
                "statistic_requested": statistic, "screen_pruner": cheap.tag, "final_pruner": final.tag,
                "budget": plan.budget, "confirm": len(confirmed), "coarse": coarse, "margin": margin,
                "level": level, "heldout": {"windows": int(heldout.shape[0]), "seqlen": int(heldout.shape[-1])},
                "proxy_kind": "perplexity on held-out calibration windows", "search_version": SEARCH_VERSION}
    return AlphaSearch(
        alpha=decision.chosen[0], statistic=decision.chosen[1], ratios=proxy.ratios(*decision.chosen),
        curve=_curve(proxy, cheap, screened, final, confirmed),
        alpha_max={s: {"bound": plan.bounds[s], "searched_to": plan.ends[s]} for s in plan.statistics},
        cost={**proxy.cost.to_json(), "seconds": round(time.perf_counter() - start, 3)},
        decision=decision.to_json(), settings=settings)


def _unique_uniform(scores: dict[Candidate, Score]) -> dict[Candidate, Score]:
    """One uniform candidate (it is the same allocation whatever the statistic): the first one listed."""
    out, seen = {}, False
    for k, v in scores.items():
        if k[0] == 0.0:
            if seen:
                continue
            seen = True
        out[k] = v
    return out


def _curve(proxy: Proxy, cheap: Scorer, screened: dict, final: Scorer, confirmed: dict) -> list[dict]:
    order = {k: i for i, k in enumerate(proxy.log)}

    def point(k: Candidate, score: Score, scorer: Scorer, stage: str) -> dict:
        return {"alpha": k[0], "statistic": k[1], "proxy": score.proxy, "pruner": scorer.tag, "stage": stage,
                "evaluation": order.get(candidate_key(scorer, *k)), "losses": score.losses}

    points = ([point(k, v, cheap, "screen") for k, v in screened.items()]
              + [point(k, v, final, "confirm") for k, v in confirmed.items()])
    return sorted(points, key=lambda c: (c["stage"] != "screen", c["statistic"], c["alpha"]))


def choose_alpha_from_text(model: nn.Module, tokenizer, stats: BlockStatistics, windows: torch.Tensor | None,
                           text, *, nsamples: int, seqlen: int, seed: int, heldout: int | None = None,
                           **kwargs) -> AlphaSearch:
    """:func:`choose_alpha` with its held-out windows drawn from the calibration text ``text`` right after the
    ``nsamples`` calibration windows (:func:`heldout_windows`; ``heldout`` windows, default
    :func:`default_heldout_count`). ``kwargs`` go to :func:`choose_alpha`."""
    count = heldout if heldout is not None else default_heldout_count(seqlen)
    held = heldout_windows(tokenizer, text, nsamples, seqlen, seed, count)
    return choose_alpha(model, stats, windows, heldout=held, **kwargs)
