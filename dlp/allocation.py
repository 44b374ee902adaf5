"""Per-block sparsity allocation: uniform, OWL, and DLP (median or mean statistic).

DLP: ``R_l = p + 2 alpha (u_l - mean u)``, ``u_l = (S_l - S_min) / (S_max - S_min)``; a block with a
larger statistic is pruned more; ``mean(R) = p`` and ``max R - min R = 2 alpha`` exactly. Unlike the
released code, a flat statistic or a block pushed outside (0, 1) is an error, never a silent clip.
OWL: ``D_l`` = share (%) of the block's scores above ``M x mean``; more outliers -> less pruning,
``R_l = p - 2 lambda (v_l - mean v)`` with ``v`` the min-max-normalised ``D``.
"""
from __future__ import annotations

from dataclasses import dataclass

from .bounds import ALPHA, DEFAULT_ALPHA, DEFAULT_OWL_LAMBDA, DEFAULT_STATISTIC, OWL_LAMBDA, SPARSITY
from .errors import DLPError
from .statistics import BlockStatistics

ALLOCATIONS = ("uniform", "owl", "dlp")
STATISTICS = ("median", "mean")


@dataclass
class Allocation:
    method: str
    sparsity: float  # target p
    ratios: list[float]  # per-block sparsity R_l
    params: dict

    def to_json(self) -> dict:
        return {"allocation": self.method, "target_sparsity": self.sparsity, "sparsity": self.ratios, **self.params}


def check_sparsity(p: float) -> None:
    SPARSITY.check(p)


def check_statistic(statistic: str) -> None:
    if statistic not in STATISTICS:
        raise DLPError(f"unknown statistic '{statistic}'; use one of: {', '.join(STATISTICS)}")


def check_params(method: str, p: float, alpha: float = DEFAULT_ALPHA, statistic: str = DEFAULT_STATISTIC,
                 owl_lambda: float = DEFAULT_OWL_LAMBDA) -> None:
    """Validate allocation settings up front, before any expensive work."""
    if method not in ALLOCATIONS:
        raise DLPError(f"unknown allocation '{method}'; use one of: {', '.join(ALLOCATIONS)}")
    check_sparsity(p)
    if method == "dlp":
        check_statistic(statistic)
        ALPHA.check(alpha)
    if method == "owl":
        OWL_LAMBDA.check(owl_lambda)


def _spread(values: list[float], p: float, half_range: float, sign: float, what: str) -> list[float]:
    lo, hi = min(values), max(values)
    if hi - lo <= 1e-12 * max(abs(hi), 1.0):
        raise DLPError(f"the {what} is the same for every block, so it cannot rank them; use --allocation uniform")
    u = [(v - lo) / (hi - lo) for v in values]
    mu = sum(u) / len(u)
    return [p + sign * 2.0 * half_range * (x - mu) for x in u]


def _guard(ratios: list[float], p: float, knob: str, value: float) -> list[float]:
    bad = [(i, r) for i, r in enumerate(ratios) if not 0.0 < r < 1.0]
    if bad:
        i, r = bad[0]
        raise DLPError(
            f"{knob}={value} with sparsity {p} puts block {i} at sparsity {r:.4f}, outside (0, 1); lower {knob} or the sparsity"
        )
    return ratios


def uniform(num_blocks: int, p: float) -> Allocation:
    check_sparsity(p)
    return Allocation("uniform", p, [float(p)] * num_blocks, {})


def dlp(stats: BlockStatistics | list[float], p: float, alpha: float = DEFAULT_ALPHA, statistic: str = DEFAULT_STATISTIC) -> Allocation:
    """DLP rates from per-block statistics (a :class:`BlockStatistics` or the list of S_l)."""
    check_sparsity(p)
    check_statistic(statistic)
    ALPHA.check(alpha)
    values = stats.statistic(statistic) if isinstance(stats, BlockStatistics) else list(stats)
    if alpha == 0.0:
        return Allocation("dlp", p, [float(p)] * len(values), {"alpha": 0.0, "statistic": statistic})
    ratios = _guard(_spread(values, p, alpha, +1.0, f"DLP {statistic} statistic"), p, "alpha", alpha)
    return Allocation("dlp", p, ratios, {"alpha": alpha, "statistic": statistic, "block_statistic": values})


def owl(stats: BlockStatistics | list[float], p: float, lam: float = DEFAULT_OWL_LAMBDA) -> Allocation:
    """OWL rates from per-block outlier ratios (%); more outliers -> less pruning."""
    check_sparsity(p)
    OWL_LAMBDA.check(lam)
    values = stats.statistic("owl_outlier_ratio") if isinstance(stats, BlockStatistics) else list(stats)
    m = stats.owl_m if isinstance(stats, BlockStatistics) else None
    if lam == 0.0:
        return Allocation("owl", p, [float(p)] * len(values), {"owl_lambda": 0.0, "owl_m": m})
    ratios = _guard(_spread(values, p, lam, -1.0, "OWL outlier ratio"), p, "owl-lambda", lam)
    return Allocation("owl", p, ratios, {"owl_lambda": lam, "owl_m": m, "outlier_ratio": values})


def allocate(stats: BlockStatistics, method: str, p: float, *, alpha: float = DEFAULT_ALPHA,
             statistic: str = DEFAULT_STATISTIC, owl_lambda: float = DEFAULT_OWL_LAMBDA) -> Allocation:
    """Dispatch on ``method`` (uniform | owl | dlp). OWL's M is fixed by the statistics (see
    :meth:`BlockStatistics.with_owl_m`)."""
    if method == "uniform":
        return uniform(len(stats.blocks), p)
    if method == "dlp":
        return dlp(stats, p, alpha, statistic)
    if method == "owl":
        return owl(stats, p, owl_lambda)
    raise DLPError(f"unknown allocation '{method}'; use one of: {', '.join(ALLOCATIONS)}")
