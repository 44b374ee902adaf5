"""Pruners on tiny random models: exact counts, patterns, modes and forward-pass counts."""
import pytest
import torch

from dlp.decoder import find_decoder
from dlp.errors import DLPError
from dlp.pruning import matrix_mask, nm_mask, parse_pattern, prune, row_mask, sparsegpt_update
from dlp.statistics import collect_statistics

from .tiny_models import build, windows


def test_row_mask_counts_per_row():
    m = torch.rand(8, 50)
    mask = row_mask(m, 0.7)
    assert (mask.sum(1) == 35).all()
    # the pruned entries are the smallest of their row
    kept_min = torch.where(mask, torch.inf, m).min(1).values
    pruned_max = torch.where(mask, m, -torch.inf).max(1).values
    assert (pruned_max <= kept_min).all()


def test_matrix_mask_exact_count_with_ties():
    m = torch.ones(10, 10)
    assert int(matrix_mask(m, 0.37).sum()) == 37  # a <= threshold would prune all 100


def test_nm_mask():
    m = torch.rand(6, 16)
    mask = nm_mask(m, 2, 4)
    assert (mask.view(6, 4, 4).sum(-1) == 2).all()


@pytest.mark.parametrize("text,ok", [("2:4", (2, 4)), ("4:8", (4, 8)), ("unstructured", (0, 0)),
                                     ("4:2", None), ("2-4", None), ("a:b", None), ("0:4", None)])
def test_parse_pattern(text, ok):
    if ok is None:
        with pytest.raises(DLPError, match="cannot parse pattern"):
            parse_pattern(text)
    else:
        p = parse_pattern(text)
        assert (p.n, p.m) == ok


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("mode", ["sequential", "oneshot"])
def test_per_block_sparsity_is_achieved(method, mode):
    model = build("llama", layers=3)
    ratios = [0.5, 0.6, 0.7]
    report = prune(model, ratios, method=method, mode=mode, windows=windows(4, 16))
    for target, got in zip(ratios, report.achieved):
        assert got == pytest.approx(target, abs=0.02)
    layout = find_decoder(model)
    for i, r in enumerate(ratios):  # the weights really are zero
        zeros = sum(int((l.weight == 0).sum()) for l in layout.linears(i).values())
        total = sum(l.weight.numel() for l in layout.linears(i).values())
        assert zeros / total == pytest.approx(r, abs=0.02)


def test_block_passes_per_mode():
    ids = windows(4, 16)
    seq = prune(build("llama"), [0.5] * 3, method="wanda", mode="sequential", windows=ids)
    one = prune(build("llama"), [0.5] * 3, method="sparsegpt", mode="oneshot", windows=ids)
    model = build("llama")
    stats = collect_statistics(model, ids)
    from_stats = prune(model, [0.5] * 3, method="wanda", mode="oneshot", stats=stats)
    assert seq.block_passes == 2 and one.block_passes == 1 and from_stats.block_passes == 0


def test_oneshot_wanda_from_statistics_equals_a_dense_walk():
    """Masks from the cached statistics equal masks from a one-shot walk (dense propagation)."""
    ids = windows(4, 16)
    a, b = build("llama"), build("llama")
    stats = collect_statistics(a, ids)
    prune(a, [0.6] * 3, method="wanda", mode="oneshot", stats=stats)
    prune(b, [0.6] * 3, method="wanda", mode="oneshot", windows=ids)  # no stats: walks once
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa == 0, pb == 0), na


def test_sequential_differs_from_oneshot_after_block_0():
    ids = windows(4, 16)
    a, b = build("llama"), build("llama")
    prune(a, [0.7] * 3, method="wanda", mode="sequential", windows=ids)
    prune(b, [0.7] * 3, method="wanda", mode="oneshot", windows=ids)
    la, lb = find_decoder(a), find_decoder(b)
    same0 = all(torch.equal(x.weight == 0, y.weight == 0) for x, y in zip(la.linears(0).values(), lb.linears(0).values()))
    same2 = all(torch.equal(x.weight == 0, y.weight == 0) for x, y in zip(la.linears(2).values(), lb.linears(2).values()))
    assert same0 and not same2


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_nm_pattern_uniform_and_per_block(method):
    model = build("llama")
    prune(model, [0.5] * 3, method=method, pattern="2:4", mode="sequential", windows=windows(4, 16))
    for lin in find_decoder(model).linears(1).values():
        z = (lin.weight == 0).view(lin.weight.shape[0], -1, 4).sum(-1)
        assert (z >= 2).all()
    model = build("llama")
    report = prune(model, [0.4, 0.5, 0.8], method=method, pattern="4:8", mode="sequential", windows=windows(4, 16))
    # per-block N = round(R * M): 3, 4, 6 of every 8
    assert report.achieved == pytest.approx([3 / 8, 4 / 8, 6 / 8], abs=0.01)


def test_sparsegpt_beats_magnitude_on_reconstruction():
    torch.manual_seed(0)
    X = torch.randn(512, 8) @ torch.randn(8, 32) + 0.1 * torch.randn(512, 32)  # strongly correlated inputs
    W = torch.randn(16, 32)
    H = X.t() @ X
    new = sparsegpt_update(W, H, 0.5)
    mag = W * ~matrix_mask(W.abs(), 0.5)
    err_sgpt = ((X @ (new - W).t()) ** 2).sum()
    err_mag = ((X @ (mag - W).t()) ** 2).sum()
    assert (new == 0).float().mean() == pytest.approx(0.5, abs=0.01)
    assert err_sgpt < 0.5 * err_mag


def test_bad_inputs():
    model = build("llama")
    with pytest.raises(DLPError, match="3 blocks"):
        prune(model, [0.5, 0.5], method="wanda", windows=windows())
    with pytest.raises(DLPError, match="outside"):
        prune(model, [0.5, 1.0, 0.5], method="wanda", windows=windows())
    with pytest.raises(DLPError, match="unknown pruning method"):
        prune(model, [0.5] * 3, method="random", windows=windows())
    with pytest.raises(DLPError, match="needs calibration windows"):
        prune(model, [0.5] * 3, method="sparsegpt")
