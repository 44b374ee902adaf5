"""What each pruning recipe needs, decided in one place: the CLI and the pipeline's stages both ask here.

- :func:`needs`: which calibration products a (method, mode, allocation) reads -- calibration windows (a
  forward through the blocks), the statistics artifact, Hessians -- so a stage loads only those, and a
  cache key names only what the result depends on.
- :func:`is_auto`: whether the rates come from the alpha search (:func:`dlp.autoalpha.choose_alpha_from_text`,
  the one entry both callers use).
- :func:`statistics_with_owl_m`: OWL's outlier threshold M is fixed when the statistics are collected
  (:data:`dlp.bounds.DEFAULT_OWL_M`); another M is derived from the weights and the stored input norms,
  without a forward.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .statistics import BlockStatistics


@dataclass(frozen=True)
class Needs:
    """The calibration products a recipe reads."""

    windows: bool  # calibration windows streamed through the blocks (sequential scoring, SparseGPT)
    statistics: bool  # the statistics artifact (a non-uniform allocation, or oneshot Wanda's input norms)
    hessian: bool  # X^T X per linear, built during the walk (SparseGPT)
    pruner_statistics: bool  # the pruner itself reads the stored input norms (oneshot Wanda)


def needs(method: str, mode: str, allocation: str = "uniform") -> Needs:
    """What pruning with ``method`` in ``mode`` at an ``allocation`` reads (see the module docstring)."""
    oneshot_wanda = method == "wanda" and mode == "oneshot"
    return Needs(windows=method != "magnitude" and not oneshot_wanda,
                 statistics=allocation != "uniform" or oneshot_wanda,
                 hessian=method == "sparsegpt",
                 pruner_statistics=oneshot_wanda)


def is_auto(allocation: str, alpha: object, statistic: object) -> bool:
    """DLP whose alpha and/or statistic is chosen by the search."""
    return allocation == "dlp" and (alpha == "auto" or statistic == "auto")


def statistics_with_owl_m(stats: BlockStatistics, model, owl_m: float) -> BlockStatistics:
    """``stats`` with OWL outlier ratios at threshold ``owl_m``; ``model`` (in memory or a
    :class:`dlp.streaming.StreamedModel`, or a loader of either) is touched only when ``owl_m`` differs from the M
    the statistics were collected with."""
    if float(owl_m) == float(stats.owl_m):
        return stats
    net = model() if callable(model) and not isinstance(model, nn.Module) else model
    return stats.with_owl_m(net, owl_m)
