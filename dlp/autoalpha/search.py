"""The alpha search's one-dimensional minimiser and the range it searches (pure functions, no model).

:func:`alpha_max` bounds alpha so that every block's rate ``R_l = p + 2 alpha (u_l - mean u)`` stays in
``[margin, 1 - margin]``; :func:`search` minimises a function of alpha on that range with a fixed number of
evaluations: a coarse grid from the lower end, then bisection around the best point.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable


def alpha_max(values: list[float], p: float, margin: float = 0.0) -> float:
    """Largest alpha keeping every ``R_l = p + 2 alpha (u_l - mean u)`` in ``[margin, 1 - margin]``
    (capped at 0.5, the allocation's own limit); 0 for a flat statistic. With ``margin = 0`` the bound
    is exclusive: at ``alpha_max`` a block sits exactly at 0 or 1."""
    lo, hi = min(values), max(values)
    if hi - lo <= 1e-12 * max(abs(hi), 1.0):
        return 0.0
    u = [(v - lo) / (hi - lo) for v in values]
    ubar = sum(u) / len(u)  # strictly inside (0, 1): min u = 0 and max u = 1
    up = (1.0 - margin - p) / (2.0 * (1.0 - ubar))  # the most-pruned block reaches 1 - margin
    down = (p - margin) / (2.0 * ubar)  # the least-pruned block reaches margin
    return max(0.0, min(up, down, 0.5))


@dataclass
class SearchResult:
    best: float  # the chosen x (tie-break applied)
    value: float  # f(best)
    points: list[tuple[float, float]]  # (x, f(x)) in evaluation order, given points first


def _choose(points: dict[float, float], rtol: float) -> float:
    finite = [y for y in points.values() if math.isfinite(y)]
    if not finite:
        return min(points)
    ymin = min(finite)
    return min(x for x, y in points.items() if y <= ymin + rtol * abs(ymin))


def _bisection_point(seen: dict[float, float], lo: float, hi: float, xtol: float) -> float | None:
    """The midpoint of the wider gap beside the best point (``hi`` closes the last gap as an unevaluated
    neighbour that wins ties); None when both gaps are below ``xtol``."""
    xs = sorted(seen)
    b = xs.index(min(xs, key=lambda x: (seen[x], x)))
    gaps = []  # (width, neighbour's value, midpoint)
    if b > 0:
        gaps.append((xs[b] - xs[b - 1], seen[xs[b - 1]], (xs[b] + xs[b - 1]) / 2))
    right = xs[b + 1] if b + 1 < len(xs) else hi
    gaps.append((right - xs[b], seen.get(right, -math.inf), (xs[b] + right) / 2))  # unexplored end wins ties
    gaps = [g for g in gaps if g[0] > xtol]
    if not gaps:
        return None
    return min(gaps, key=lambda g: (-round(g[0] / (hi - lo), 9), g[1]))[2]  # equal widths up to rounding


def search(f: Callable[[float], float], lo: float, hi: float, *, budget: int = 6, coarse: int = 3,
           rtol: float = 0.0, xtol: float = 1e-4,
           known: list[tuple[float, float]] | None = None) -> SearchResult:
    """Minimise ``f`` on ``[lo, hi]`` with at most ``budget`` evaluations (``known`` points count).

    1. coarse grid: ``lo + (hi - lo) i / coarse`` for ``i = 0 .. coarse - 1`` (``lo`` always, ``hi`` never:
       at the end of the range a block is nearly empty or nearly dense, which measured far worse);
    2. refine: bisect the wider of the two gaps beside the best point (the side of the lower neighbour
       on a tie); ``hi`` bounds the last gap as an unevaluated neighbour that wins ties, so a curve still
       falling at the last grid point is followed towards ``hi``. Stops when the budget is spent or both gaps are below
       ``xtol``. For a unimodal ``f`` the minimiser stays bracketed and the bracket halves about every two
       evaluations; a monotone ``f`` ends at (or, within the bisection's resolution, next to) the
       boundary it decreases towards.
    The result is the smallest ``x`` whose value is within ``rtol * |min|`` of the minimum (exact ties go to
    the smaller ``x``, so a flat curve gives ``lo``). NaN counts as +inf.
    """
    if hi < lo:
        raise ValueError(f"search interval [{lo}, {hi}] is empty")
    budget = max(1, budget)
    seen: dict[float, float] = {}
    order: list[tuple[float, float]] = []

    def record(x: float, y: float) -> None:
        seen[x] = float(y) if not math.isnan(y) else math.inf
        order.append((x, seen[x]))

    for x, y in known or []:
        if lo <= x <= hi and x not in seen:
            record(float(x), y)
    n = max(1, coarse) if hi > lo else 1
    for x in [lo + (hi - lo) * i / n for i in range(n)]:
        if len(seen) >= budget:
            break
        if x not in seen:
            record(x, f(x))
    while len(seen) < budget:
        x = _bisection_point(seen, lo, hi, xtol)
        if x is None:
            break
        record(x, f(x))
    best = _choose(seen, rtol)
    return SearchResult(best, seen[best], order)
