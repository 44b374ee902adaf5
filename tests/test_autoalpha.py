"""--alpha auto: the pure search on synthetic curves, the alpha_max bound, the decision rule on synthetic
scores (and through the whole search, on a cache of synthetic scores), the proxy, the cache reuse and the
resume on a tiny model, the CLI, and one small end-to-end run on the real SmolLM2-135M."""
import json
import math
import zlib

import pytest
import torch

from dlp import allocation
from dlp.autoalpha import (Proxy, Score, Scorer, alpha_max, bootstrap_gain, candidate_key, choose_alpha, decide,
                           heldout_windows, search)
from dlp.errors import DLPError

from . import tiny_models


# ------------------------------------------------------------------ search on synthetic curves
def counted(f):
    calls = []

    def g(x):
        calls.append(x)
        return f(x)

    return g, calls


@pytest.mark.parametrize("x0", [0.03, 0.11, 0.137, 0.2])
def test_search_finds_minimum_of_convex_curve(x0):
    f, calls = counted(lambda x: (x - x0) ** 2 + 1.0)
    r = search(f, 0.0, 0.25, budget=10)
    assert len(calls) == 10 and len(set(calls)) == 10
    assert abs(r.best - x0) < 0.25 / 3 / 2 ** 3  # the grid step, halved every ~2 evaluations
    assert r.value == min(y for _, y in r.points)
    assert r.points[0] == (0.0, f(0.0))  # uniform first


def test_search_flat_curve_returns_lower_bound():
    r = search(lambda x: 5.0, 0.0, 0.3, budget=6)
    assert r.best == 0.0 and r.value == 5.0


def test_search_tie_break_and_rtol_prefer_smaller_alpha():
    # a curve within 0.1% of uniform: with rtol=0.5% uniform wins, with rtol=0 the true minimum
    f = lambda x: 100.0 - 0.1 * math.sin(math.pi * x / 0.3)  # noqa: E731
    assert search(f, 0.0, 0.3, budget=6, rtol=0.005).best == 0.0
    assert search(f, 0.0, 0.3, budget=6).best > 0.0


def test_search_monotone_curves_end_at_a_boundary():
    up = search(lambda x: x, 0.0, 0.3, budget=8)
    assert up.best == 0.0
    down = search(lambda x: -x, 0.0, 0.3, budget=8)
    assert 0.3 - down.best <= 0.3 / 3 / 2 ** 3 and down.best < 0.3  # follows the curve towards hi


def test_search_stays_inside_bounds_and_budget():
    f, calls = counted(lambda x: math.cos(40 * x))
    r = search(f, 0.05, 0.2, budget=7)
    assert len(calls) <= 7 and all(0.05 <= x <= 0.2 for x in calls)
    assert 0.2 not in calls  # the end of the range is never a coarse point
    assert search(lambda x: 1.0, 0.1, 0.1, budget=5).points == [(0.1, 1.0)]


def test_search_known_points_count_and_are_not_reevaluated():
    f, calls = counted(lambda x: (x - 0.1) ** 2)
    r = search(f, 0.0, 0.3, budget=5, known=[(0.0, 0.01), (0.1, 0.0)])
    assert 0.0 not in calls and 0.1 not in calls and len(calls) == 3
    assert r.best == 0.1


def test_search_nan_counts_as_worst():
    r = search(lambda x: float("nan") if x > 0 else 3.0, 0.0, 0.3, budget=4)
    assert r.best == 0.0


# ------------------------------------------------------------------ alpha_max
@pytest.mark.parametrize("values,p", [([0.17, 0.24, 0.26, 0.3, 0.5, 0.77], 0.7),
                                      ([0.27, 0.31, 0.34, 0.4, 0.95, 1.75], 0.7),
                                      ([1.0, 2.0, 3.0, 10.0], 0.2), ([5.0, 1.0, 1.0, 1.0], 0.5)])
def test_alpha_max_is_where_a_block_leaves_0_1(values, p):
    a = alpha_max(values, p)
    assert 0 < a <= 0.5
    if a < 0.5:
        r = allocation.dlp(values, p, a * (1 - 1e-6), "median").ratios
        assert all(0 < x < 1 for x in r) and (max(r) > 1 - 1e-5 or min(r) < 1e-5)
        with pytest.raises(DLPError):
            allocation.dlp(values, p, a * (1 + 1e-6), "median")
    m = alpha_max(values, p, margin=0.01)
    r = allocation.dlp(values, p, m, "median").ratios
    assert m < a and min(r) >= 0.01 - 1e-9 and max(r) <= 0.99 + 1e-9
    # the closed form: R_l = p + 2 alpha (u_l - mean u)
    u = [(v - min(values)) / (max(values) - min(values)) for v in values]
    ubar = sum(u) / len(u)
    assert a == pytest.approx(min((1 - p) / (2 * (1 - ubar)), p / (2 * ubar), 0.5))


def test_alpha_max_flat_statistic_is_zero():
    assert alpha_max([0.3, 0.3, 0.3], 0.7) == 0.0


# ------------------------------------------------------------------ the decision rule
def losses(mean: float, spread: float, n: int = 8, seed: int = 0) -> list[float]:
    """``n`` window losses averaging exactly ``mean``: a per-window difficulty shared by every candidate plus
    this candidate's own noise, ``+-spread`` in a balanced order drawn from ``seed``."""
    import random

    rng = random.Random(0)
    own = [spread if i % 2 else -spread for i in range(n)]
    random.Random(seed).shuffle(own)
    shared = [rng.uniform(-1, 1) for _ in range(n)]
    return [mean + x - sum(shared) / n + e for x, e in zip(shared, own)]


def score(mean: float, spread: float, seed: int) -> Score:
    return Score.of(losses(mean, spread, seed=seed))


def test_bootstrap_gain_is_paired_and_deterministic():
    base, better = losses(5.0, 0.01, seed=1), losses(4.9, 0.01, seed=2)
    gain, lower = bootstrap_gain(base, better)
    assert gain == pytest.approx(0.1, abs=0.02) and 0 < lower < gain  # the shared difficulty cancels
    assert bootstrap_gain(base, better) == (gain, lower)
    with pytest.raises(ValueError):
        bootstrap_gain(base, better[:3])


def test_decide_keeps_uniform_when_the_margin_is_within_the_noise():
    scores = {(0.0, "median"): score(5.0, 0.2, 1), (0.1, "median"): score(4.98, 0.2, 2)}
    d = decide(scores, (0.0, "median"), ["median"])
    assert d.best == (0.1, "median") and d.gain > 0 and d.lower < 0  # better on average, not beyond the noise
    assert d.chosen == (0.0, "median") and d.to_json()["kept_baseline"]


def test_decide_takes_a_clear_winner():
    scores = {(0.0, "median"): score(5.0, 0.02, 1), (0.1, "median"): score(4.8, 0.02, 2),
              (0.2, "median"): score(4.9, 0.02, 3)}
    d = decide(scores, (0.0, "median"), ["median"])
    assert d.chosen == d.best == (0.1, "median") and d.lower > 0.1


def test_decide_with_a_rejected_candidate():
    ok, bad = score(5.0, 0.02, 1), Score(math.inf, [])
    assert decide({(0.0, "median"): ok, (0.1, "median"): bad}, (0.0, "median"), ["median"]).chosen == (0.0, "median")
    assert decide({(0.0, "median"): bad, (0.1, "median"): ok}, (0.0, "median"), ["median"]).chosen == (0.1, "median")


class SyntheticScores(dict):
    """A candidate cache that holds every candidate: its losses follow ``curve(scorer tag, statistic, alpha)``
    (mean loss) with a per-candidate noise of ``spread``; choose_alpha then prunes and scores nothing."""

    def __init__(self, curve, spread: float):
        super().__init__()
        self.curve, self.spread = curve, spread

    def __contains__(self, key) -> bool:
        return True

    def __getitem__(self, key: str) -> dict:
        tag, stat, alpha = key.split(":")
        return score(self.curve(tag, stat, float(alpha)), self.spread, seed=zlib.crc32(key.encode())).to_json()

    def __setitem__(self, key, value):
        raise AssertionError(f"{key} was scored although it is cached")


def screen_loves_alpha(gain_in_run: float):
    """The screen (Wanda one-shot) gains 0.5 at alpha 0.1; the run's own pruner gains ``gain_in_run``."""
    def curve(tag: str, stat: str, alpha: float) -> float:
        bump = 0.5 if tag == "wanda-oneshot-stats" else gain_in_run
        return 5.0 - bump * (1 - ((alpha - 0.1) / 0.1) ** 2) * (alpha > 0) * (1 if stat == "median" else 0.5)
    return curve


@pytest.mark.parametrize("gain,spread,expected", [(0.01, 0.2, "uniform"), (-0.05, 0.02, "uniform"),
                                                  (0.2, 0.02, "alpha")])
def test_search_keeps_uniform_unless_the_run_itself_gains_beyond_the_noise(tiny, gain, spread, expected):
    model, stats, windows, held = tiny
    cache = SyntheticScores(screen_loves_alpha(gain), spread)
    r = choose_alpha(model, stats, windows, heldout=held, method="sparsegpt", sparsity=0.6, statistic="auto",
                     cache=cache)
    screen = {(c["alpha"], c["statistic"] if c["alpha"] else "") for c in r.curve if c["stage"] == "screen"}
    assert r.cost["evaluations"] == 0 and len(screen) == 8 and r.cost["cached"] == 8 + 2
    screened = min((c for c in r.curve if c["stage"] == "screen"), key=lambda c: c["proxy"])
    assert screened["alpha"] > 0 and screened["statistic"] == "median"  # the screen always prefers DLP
    assert (r.alpha == 0) == (expected == "uniform")
    if expected == "alpha":
        assert (r.alpha, r.statistic) == (screened["alpha"], "median") and r.decision["lower"] > 0


@pytest.mark.parametrize("mean_gain,spread,expected", [(0.01, 0.2, "median"), (0.3, 0.02, "mean")])
def test_statistic_auto_keeps_the_median_unless_the_mean_wins_beyond_the_noise(tiny, mean_gain, spread, expected):
    model, stats, windows, held = tiny
    cache = SyntheticScores(lambda tag, stat, a: 5.0 - (mean_gain if stat == "mean" else 0.0), spread)
    r = choose_alpha(model, stats, windows, heldout=held, sparsity=0.6, statistic="auto", alpha=0.05, cache=cache)
    assert r.alpha == 0.05 and r.statistic == expected and r.decision["best"] == [0.05, "mean"]


# ------------------------------------------------------------------ the proxy and choose_alpha on a tiny model
@pytest.fixture(scope="module")
def tiny():
    from dlp.statistics import collect_statistics

    model = tiny_models.build("llama", layers=3)
    windows = tiny_models.windows(8, 16)
    return model, collect_statistics(model, windows), windows, tiny_models.windows(2, 16, seed=1)


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_choose_alpha_tiny_leaves_model_dense_and_beats_uniform(tiny, tmp_path):
    model, stats, windows, held = tiny
    before = weights(model)
    r = choose_alpha(model, stats, windows, heldout=held, method="wanda", mode="oneshot", sparsity=0.6,
                     statistic="auto")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert r.cost["evaluations"] == 8 and r.cost["block_passes"] == 0  # Wanda oneshot: no forward to prune
    assert not [c for c in r.curve if c["stage"] == "confirm"]  # the screen already pruned as the run will
    assert {c["statistic"] for c in r.curve if c["alpha"] == 0} == {"median", "mean"}
    assert r.proxy <= r.uniform_proxy and all(len(c["losses"]) == 2 for c in r.curve)
    assert 0 <= r.alpha < r.alpha_max[r.statistic]["bound"]
    assert sum(r.ratios) / len(r.ratios) == pytest.approx(0.6)
    json_path, png_path = r.save(tmp_path)
    back = json.loads(json_path.read_text())
    assert back["alpha"] == r.alpha and back["curve"] and back["decision"]["baseline"][0] == 0.0
    assert png_path.stat().st_size > 1000


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_finalists_are_confirmed_with_the_pruner_and_mode_of_the_run(tiny, method):
    model, stats, windows, held = tiny
    before = weights(model)
    r = choose_alpha(model, stats, windows, heldout=held, method=method, mode="sequential", sparsity=0.6, budget=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    screen = {c["pruner"] for c in r.curve if c["stage"] == "screen"}
    confirm = [c for c in r.curve if c["stage"] == "confirm"]
    assert screen == {"wanda-oneshot-stats"} and {c["pruner"] for c in confirm} == {f"{method}-sequential-8w"}
    assert any(c["alpha"] == 0 for c in confirm) and len(confirm) == 2  # uniform always confirmed
    assert r.uniform_proxy == next(c["proxy"] for c in confirm if c["alpha"] == 0)
    assert r.proxy <= r.uniform_proxy and r.cost["evaluations"] == 3 + 2 and r.cost["block_passes"] > 0
    assert (r.alpha, r.statistic) in {(c["alpha"], c["statistic"]) for c in confirm}


def test_cache_hits_cost_nothing_and_are_shared_across_pruners(tiny):
    model, stats, windows, held = tiny
    cache = {}
    first = choose_alpha(model, stats, windows, heldout=held, sparsity=0.6, budget=4, cache=cache)
    assert len(cache) == 4 + 2 and candidate_key(Scorer("wanda", "oneshot"), 0.0, "mean") in cache
    again = choose_alpha(model, stats, windows, heldout=held, sparsity=0.6, budget=4, cache=cache)
    assert again.cost["evaluations"] == 0 and again.cost["cached"] == 6 and again.alpha == first.alpha
    assert again.cost["cached_s"] > 0 and all(c["evaluation"] is None for c in again.curve)
    sgpt = choose_alpha(model, stats, windows, heldout=held, method="sparsegpt", sparsity=0.6, budget=4, cache=cache)
    assert sgpt.cost["evaluations"] == 2  # the Wanda screen is shared; only SparseGPT's finalists are new


class Killed(Exception):
    pass


class DiesAfter(dict):
    """A cache whose owner is killed right after it stored its ``n``-th candidate."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        if len(self) == self.n:
            raise Killed


def test_search_killed_half_way_resumes_without_rescoring(tiny):
    model, stats, windows, held = tiny
    before = weights(model)
    cache = DiesAfter(3)
    with pytest.raises(Killed):
        choose_alpha(model, stats, windows, heldout=held, method="sparsegpt", sparsity=0.6, budget=4, cache=cache)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # restored on the way out
    cache.n = -1
    resumed = choose_alpha(model, stats, windows, heldout=held, method="sparsegpt", sparsity=0.6, budget=4,
                           cache=cache)
    fresh = choose_alpha(model, stats, windows, heldout=held, method="sparsegpt", sparsity=0.6, budget=4)
    assert resumed.cost["cached"] == 3 and resumed.cost["evaluations"] == fresh.cost["evaluations"] - 3
    assert (resumed.alpha, resumed.statistic, resumed.ratios) == (fresh.alpha, fresh.statistic, fresh.ratios)


def test_fixed_alpha_chooses_statistic_and_rejects_out_of_range(tiny):
    model, stats, windows, held = tiny
    r = choose_alpha(model, stats, windows, heldout=held, sparsity=0.6, statistic="auto", alpha=0.05)
    assert r.alpha == 0.05 and {c["statistic"] for c in r.curve} == {"median", "mean"} and r.uniform_proxy is None
    assert {c["stage"] for c in r.curve} == {"confirm"} and r.decision["baseline"] == [0.05, "median"]
    with pytest.raises(DLPError):
        choose_alpha(model, stats, windows, heldout=held, sparsity=0.6, alpha=0.49)
    with pytest.raises(DLPError):
        choose_alpha(model, stats, windows, heldout=held, sparsity=0.6, statistic="max")


def test_rejected_candidate_scores_inf(tiny):
    model, stats, windows, held = tiny
    before = weights(model)
    proxy = Proxy(model, stats, windows, held, pattern="3:7", sparsity=0.6)
    assert proxy(Scorer("wanda", "oneshot"), 0.0, "median").proxy == math.inf  # widths of 64 are not divisible by 7
    proxy.restore()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_proxy_is_the_perplexity_of_the_window_losses(tiny):
    from dlp.perplexity import perplexity

    model, stats, windows, held = tiny
    proxy = Proxy(model, stats, windows, held, pattern="unstructured", sparsity=0.6)
    score = proxy(Scorer("wanda", "sequential", 8), 0.0, "median")
    assert len(score.losses) == 2
    assert score.proxy == pytest.approx(perplexity(model, held.reshape(1, -1), held.shape[1])["ppl"], rel=1e-5)
    proxy.restore()


def test_heldout_windows_follow_the_calibration_draws(smollm):
    from dlp import data

    text = data.load_text("c4")
    calib = data.calibration_windows(smollm[1], text, 4, 64, 0)
    held = heldout_windows(smollm[1], text, 4, 64, 0, 3)
    assert held.shape == (3, 64)
    assert not any((calib == w).all(dim=1).any() for w in held)
    assert torch.equal(data.calibration_windows(smollm[1], text, 7, 64, 0)[4:], held)


# ------------------------------------------------------------------ CLI
def test_cli_prune_alpha_auto_writes_curve_next_to_out(tmp_path, capsys):
    from cli import main

    import transformers as tf

    from dlp.models import resolve_model

    tok = tf.AutoTokenizer.from_pretrained(resolve_model("smollm2-135m").path)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    folder = tmp_path / "tiny"
    tf.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "pruned"
    with pytest.raises(SystemExit) as exc:
        main(["prune", "--model", str(folder), "--calibration", "wikitext2-valid", "--nsamples", "4", "--seqlen", "32",
              "--alpha", "auto", "--statistic", "auto", "--heldout", "2", "--out", str(out)])
    captured = capsys.readouterr()
    assert exc.value.code in (0, None), captured.err
    assert "auto: alpha" in captured.out and "alpha_search.json" in captured.out
    report = tmp_path / "pruned-alpha-search"
    assert (report / "alpha_search.json").exists() and (report / "alpha_search.png").exists()
    summary = json.loads((out / "dlp_report.json").read_text())
    assert summary["allocation"]["alpha_search"]["cost"]["evaluations"] == 8 + 2  # screen, then 2 Wanda sequential


# ------------------------------------------------------------------ real model
@pytest.mark.real
def test_real_smollm_wanda_auto(smollm):
    from dlp import data
    from dlp.statistics import collect_statistics

    model, tok, _ = smollm
    text = data.load_text("c4")
    windows = data.calibration_windows(tok, text, 8, 128, 0)
    held = heldout_windows(tok, text, 8, 128, 0, 2)
    stats = collect_statistics(model, windows)
    probe = model.model.layers[5].mlp.down_proj.weight.detach().clone()
    # Wanda one-shot: the screen prunes as the run will, so it decides (the confirm stage is the tiny tests');
    # a sequential confirm would add two real-model prunes to a suite at its time limit. Budget 2: uniform and
    # one DLP candidate, the same two evaluations as before issue 14
    r = choose_alpha(model, stats, windows, heldout=held, method="wanda", mode="oneshot", sparsity=0.7,
                     statistic="median", budget=2)
    assert torch.equal(model.model.layers[5].mlp.down_proj.weight, probe)  # left dense
    assert 0 <= r.alpha < alpha_max(stats.statistic("median"), 0.7)
    assert any(c["alpha"] == 0 for c in r.curve) and r.proxy <= r.uniform_proxy
    assert r.cost["evaluations"] == 2 and r.cost["block_passes"] == 0 and r.cost["seconds"] > 0  # as on main
    assert r.decision["baseline"] == [0.0, "median"] and len(r.curve[0]["losses"]) == 2
    if r.alpha > 0:  # taken only beyond the noise of the held-out windows
        assert r.decision["lower"] > 0
