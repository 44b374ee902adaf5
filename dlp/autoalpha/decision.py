"""The alpha search's decision rule: the baseline stays unless a candidate beats it by more than the noise.

The baseline is uniform (alpha 0) when alpha is searched, or the default statistic (median) when only the
statistic is. The best finalist by the proxy replaces it only when its gain -- the mean drop of the
per-window held-out loss, paired window by window -- stays positive at the lower end of a one-sided
bootstrap interval over the held-out windows (``level``, default 95 %). The windows are resampled, not
re-scored: the rule costs no forward pass. With few windows the interval is wide and uniform is kept unless
the margin is clear, which is the asymmetry the user asked for: auto must never be worse than uniform.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .proxy import Score

LEVEL = 0.95
RESAMPLES = 2000

Candidate = tuple[float, str]  # (alpha, statistic)


def bootstrap_gain(base: list[float], cand: list[float], *, level: float = LEVEL, resamples: int = RESAMPLES,
                   seed: int = 0) -> tuple[float, float]:
    """(mean gain, its one-sided lower bound at ``level``) of ``cand`` over ``base``: the gain is the
    per-window loss drop ``base_i - cand_i`` (positive: the candidate is better), averaged over the windows;
    the bound is the ``1 - level`` quantile of that average over ``resamples`` draws of the windows with
    replacement (a fixed seed: the same scores always give the same decision)."""
    if len(base) != len(cand) or not base:
        raise ValueError(f"paired losses needed, got {len(base)} and {len(cand)} windows")
    drop = torch.tensor(base, dtype=torch.float64) - torch.tensor(cand, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    means = drop[torch.randint(len(base), (resamples, len(base)), generator=gen)].mean(dim=1)
    return float(drop.mean()), float(torch.quantile(means, 1.0 - level))


@dataclass
class Decision:
    chosen: Candidate
    best: Candidate  # the finalist with the lowest proxy
    baseline: Candidate
    gain: float  # the best finalist's mean per-window loss drop over the baseline (log perplexity)
    lower: float  # its bootstrap lower bound; the best replaces the baseline only when it is above 0
    level: float

    def to_json(self) -> dict:
        return {"chosen": list(self.chosen), "best": list(self.best), "baseline": list(self.baseline),
                "gain": _num(self.gain), "lower": _num(self.lower), "level": self.level,
                "kept_baseline": self.chosen == self.baseline and self.best != self.baseline}


def _num(x: float) -> float | None:
    return x if math.isfinite(x) else None


def best_candidate(scores: dict[Candidate, Score], stat_order: list[str]) -> Candidate:
    """The lowest proxy; ties go to the smaller alpha, then to the earlier statistic."""
    return min(scores, key=lambda k: (scores[k].proxy, k[0], stat_order.index(k[1])))


def decide(scores: dict[Candidate, Score], baseline: Candidate, stat_order: list[str], *,
           level: float = LEVEL) -> Decision:
    """Keep ``baseline`` unless the best of ``scores`` beats it beyond the bootstrap noise (module docstring).
    A baseline the pruner rejected (+inf) loses to any finite candidate; a rejected best never wins."""
    best = best_candidate(scores, stat_order)
    base, top = scores[baseline], scores[best]
    if best == baseline or not math.isfinite(top.proxy):
        return Decision(baseline, best, baseline, 0.0, 0.0, level)
    if not math.isfinite(base.proxy):
        return Decision(best, best, baseline, math.inf, math.inf, level)
    gain, lower = bootstrap_gain(base.losses, top.losses, level=level)
    return Decision(best if lower > 0 else baseline, best, baseline, gain, lower, level)
