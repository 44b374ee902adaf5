"""Automatic alpha (and statistic) for DLP: never worse than uniform beyond the proxy's noise, no hand tuning.

A candidate ``(alpha, statistic)`` gives the rates ``R_l = p + 2 alpha (u_l - mean u)`` from the cached
statistics (no calibration sweep), scored by the *proxy*: the pruned model's loss on calibration windows held
out from the statistics (same corpus and sampling, never the evaluation text), window by window.

- :mod:`.search`: the alpha range (:func:`alpha_max`) and the one-dimensional minimiser (:func:`search`);
- :mod:`.proxy`: pruning a candidate in place and scoring it (:class:`Proxy`, :class:`Scorer`, :class:`Score`);
- :mod:`.decision`: uniform stays unless a candidate beats it beyond the bootstrap noise (:func:`decide`);
- :mod:`.choose`: screen, confirm with the user's pruner and mode, decide (:func:`choose_alpha`);
- :mod:`.result`: the choice, its curve and cost as JSON and a plot (:class:`AlphaSearch`).
"""
from .choose import (SEARCH_VERSION, STATISTICS, Plan, choose_alpha, choose_alpha_from_text, default_budget,
                     default_heldout_count, final_scorer, finalists, screen, screen_scorer)
from .decision import LEVEL, Decision, bootstrap_gain, decide
from .proxy import DenseWeights, Proxy, ProxyCost, Score, Scorer, candidate_key, heldout_windows, window_losses
from .result import AlphaSearch
from .search import SearchResult, alpha_max, search

__all__ = ["SEARCH_VERSION", "STATISTICS", "LEVEL", "AlphaSearch", "Decision", "DenseWeights", "Plan", "Proxy",
           "ProxyCost", "Score", "Scorer", "SearchResult", "alpha_max", "bootstrap_gain", "candidate_key",
           "choose_alpha", "choose_alpha_from_text", "decide", "default_budget", "default_heldout_count",
           "final_scorer", "finalists", "heldout_windows", "screen", "screen_scorer", "search", "window_losses"]
