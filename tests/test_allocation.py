import math
import random

import pytest

from dlp import allocation as alloc
from dlp.errors import DLPError
from dlp.statistics import BlockStatistics


def _stats(n=30, seed=1):
    rng = random.Random(seed)
    return [rng.uniform(0.2, 2.0) for _ in range(n)]


@pytest.mark.parametrize("p,alpha", [(0.5, 0.05), (0.7, 0.15), (0.6, 0.2)])
def test_dlp_invariants(p, alpha):
    s = _stats()
    r = alloc.dlp(s, p, alpha, "median").ratios
    assert math.isclose(sum(r) / len(r), p, abs_tol=1e-12)
    assert math.isclose(max(r) - min(r), 2 * alpha, abs_tol=1e-12)
    # a larger statistic means more pruning: same order as the statistic
    order_s = sorted(range(len(s)), key=s.__getitem__)
    order_r = sorted(range(len(r)), key=r.__getitem__)
    assert order_s == order_r


def test_dlp_matches_released_formula():
    """The released code's route (importance 1 - S/sum S, min-max to [0, 2 alpha], keep = d - mean d + 1 - p)
    gives the same sparsities as R = p + 2 alpha (u - mean u)."""
    s, p, a = _stats(12, 3), 0.7, 0.15
    imp = [1 - x / sum(s) for x in s]
    d = [(i - min(imp)) / (max(imp) - min(imp)) * 2 * a for i in imp]
    keep = [x - sum(d) / len(d) + 1 - p for x in d]
    # min-max of the importance reverses the order of S; the released code's keep ratio grows with
    # importance, i.e. shrinks as S grows -> sparsity 1 - keep grows with S
    released = [1 - k for k in keep]
    ours = alloc.dlp(s, p, a).ratios
    assert all(math.isclose(x, y, abs_tol=1e-12) for x, y in zip(ours, released))


def test_owl_direction_and_invariants():
    d = _stats(20, 5)
    r = alloc.owl(d, 0.7, 0.08).ratios
    assert math.isclose(sum(r) / len(r), 0.7, abs_tol=1e-12)
    assert math.isclose(max(r) - min(r), 0.16, abs_tol=1e-12)
    assert r[d.index(max(d))] == min(r)  # most outliers -> least pruning


def test_uniform():
    r = alloc.uniform(7, 0.6).ratios
    assert r == [0.6] * 7


def test_flat_statistic_is_refused():
    with pytest.raises(DLPError, match="same for every block"):
        alloc.dlp([1.0] * 5, 0.7, 0.15)


def test_block_pushed_out_of_range_is_refused_not_clipped():
    s = [0.0] * 29 + [1.0]  # one outlier block: R_max = p + 2a(1 - 1/30)
    with pytest.raises(DLPError, match="outside \\(0, 1\\)"):
        alloc.dlp(s, 0.8, 0.15)
    assert max(alloc.dlp(s, 0.7, 0.15).ratios) < 1


@pytest.mark.parametrize("p", [0, 1, -0.1, 1.5])
def test_sparsity_out_of_range(p):
    with pytest.raises(DLPError, match=r"sparsity must be in \(0, 1\)"):
        alloc.dlp(_stats(), p, 0.1)


@pytest.mark.parametrize("alpha", [-0.1, 0.5, 2])
def test_alpha_out_of_range(alpha):
    with pytest.raises(DLPError, match="alpha"):
        alloc.dlp(_stats(), 0.7, alpha)


def test_alpha_zero_is_uniform():
    assert alloc.dlp(_stats(), 0.7, 0.0).ratios == [0.7] * 30


def test_unknown_statistic():
    with pytest.raises(DLPError, match="median, mean"):
        alloc.dlp(_stats(), 0.7, 0.1, "max")


# -- dlp.recipe: one place decides what each recipe reads
def test_recipe_needs_per_method_and_mode():
    from dlp.recipe import needs

    assert needs("magnitude", "sequential") == needs("magnitude", "oneshot")
    assert not needs("magnitude", "sequential").windows and not needs("magnitude", "oneshot", "uniform").statistics
    assert needs("magnitude", "oneshot", "dlp").statistics  # the allocation reads them, the pruner does not
    w1 = needs("wanda", "oneshot")
    assert (w1.windows, w1.statistics, w1.pruner_statistics, w1.hessian) == (False, True, True, False)
    ws = needs("wanda", "sequential")
    assert (ws.windows, ws.statistics, ws.pruner_statistics) == (True, False, False)
    for mode in ("sequential", "oneshot"):
        sg = needs("sparsegpt", mode, "owl")
        assert sg.windows and sg.hessian and sg.statistics and not sg.pruner_statistics


def test_owl_m_only_touches_the_model_when_it_differs():
    from dlp.recipe import is_auto, statistics_with_owl_m

    stats = BlockStatistics({}, [{"median": 1.0, "mean": 1.0, "owl_outlier_ratio": 1.0}], 4, 16, 5.0, {})

    def loader():
        raise AssertionError("the model must not be loaded for the M the statistics already have")

    assert statistics_with_owl_m(stats, loader, 5.0) is stats
    assert is_auto("dlp", "auto", "median") and is_auto("dlp", 0.1, "auto") and not is_auto("owl", "auto", "auto")
