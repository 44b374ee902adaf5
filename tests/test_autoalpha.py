"""--alpha auto: the pure search on synthetic curves, the alpha_max bound, the proxy on a tiny model, the
CLI, and one small end-to-end run on the real SmolLM2-135M."""
import json
import math

import pytest
import torch

from dlp import allocation
from dlp.autoalpha import Proxy, alpha_max, candidate_key, choose_alpha, heldout_windows, search
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
    r = choose_alpha(model, stats, windows, heldout=held, method="wanda", sparsity=0.6, statistic="auto")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert r.cost["evaluations"] == 8 and r.cost["block_passes"] == 0  # Wanda oneshot: no forward to prune
    assert {c["statistic"] for c in r.curve if c["alpha"] == 0} == {"median", "mean"}
    assert r.proxy <= r.uniform_proxy
    assert 0 <= r.alpha < r.alpha_max[r.statistic]["bound"]
    assert sum(r.ratios) / len(r.ratios) == pytest.approx(0.6)
    json_path, png_path = r.save(tmp_path)
    back = json.loads(json_path.read_text())
    assert back["alpha"] == r.alpha and back["curve"] and png_path.stat().st_size > 1000


def test_sparsegpt_is_screened_with_wanda_then_confirmed(tiny):
    model, stats, windows, held = tiny
    before = weights(model)
    r = choose_alpha(model, stats, windows, heldout=held, method="sparsegpt", sparsity=0.6, budget=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    confirm = [c for c in r.curve if c["stage"] == "confirm"]
    assert {c["pruner"] for c in confirm} == {"sparsegpt"} and any(c["alpha"] == 0 for c in confirm)
    assert r.proxy == min(c["proxy"] for c in confirm) and r.proxy <= r.uniform_proxy
    assert r.cost["evaluations"] == 3 + len(confirm) and r.settings["prune_windows"] == 2


def test_cache_hits_cost_nothing(tiny):
    model, stats, windows, held = tiny
    cache = {}
    first = choose_alpha(model, stats, windows, heldout=held, sparsity=0.6, budget=4, cache=cache)
    assert len(cache) == 4 and candidate_key("wanda", 0.0, "mean") in cache
    again = choose_alpha(model, stats, windows, heldout=held, sparsity=0.6, budget=4, cache=cache)
    assert again.cost["evaluations"] == 0 and again.alpha == first.alpha
    assert all(c["evaluation"] is None for c in again.curve)


def test_fixed_alpha_chooses_statistic_and_rejects_out_of_range(tiny):
    model, stats, windows, held = tiny
    r = choose_alpha(model, stats, windows, heldout=held, sparsity=0.6, statistic="auto", alpha=0.05)
    assert r.alpha == 0.05 and {c["statistic"] for c in r.curve} == {"median", "mean"} and r.uniform_proxy is None
    with pytest.raises(DLPError):
        choose_alpha(model, stats, windows, heldout=held, sparsity=0.6, alpha=0.49)
    with pytest.raises(DLPError):
        choose_alpha(model, stats, windows, heldout=held, sparsity=0.6, statistic="max")


def test_rejected_candidate_scores_inf(tiny):
    model, stats, windows, held = tiny
    before = weights(model)
    proxy = Proxy(model, stats, windows, held, pattern="3:7", mode="oneshot", sparsity=0.6)
    assert proxy("wanda", 0.0, "median") == math.inf  # widths of 64 are not divisible by 7: the pruner refuses
    proxy.restore()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


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
    assert summary["allocation"]["alpha_search"]["cost"]["evaluations"] == 8


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
    r = choose_alpha(model, stats, windows, heldout=held, method="wanda", sparsity=0.7, statistic="median", budget=2)
    assert torch.equal(model.model.layers[5].mlp.down_proj.weight, probe)  # left dense
    assert 0 <= r.alpha < alpha_max(stats.statistic("median"), 0.7)
    assert any(c["alpha"] == 0 for c in r.curve) and r.proxy <= r.uniform_proxy
    assert r.cost["evaluations"] == 2 and r.cost["seconds"] > 0
