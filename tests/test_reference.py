"""Against the authors' released code, run on the bundled SmolLM2-135M (../shared/reference).

Statistic mean, alpha 0.15, p 0.7, calibration 32 x 512 from wikitext-2/valid.txt with seed 0, Wanda + DLP.
Block 0 sees the dense calibration inputs in any faithful implementation, and each block's achieved sparsity
depends only on its ratio and shapes, so the masks and sparsities are checked on a one-shot prune from the
statistics (seconds); the sequential prune's whole-model perplexities (minutes on 2 cores) are reproduced by
``benchmarks/bench_reference.py`` (figures in docs/RESULTS.md)."""
import json

import numpy as np
import pytest

from dlp import allocation
from dlp.decoder import find_decoder
from dlp.pruning import prune

from .conftest import REFERENCE_DIR

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def reference():
    return json.loads((REFERENCE_DIR / "smollm2-135m.json").read_text())


@pytest.fixture(scope="module")
def pruned_model(smollm, ref_stats):
    """Wanda + DLP (mean) one-shot from the reference statistics: block 0's inputs are the dense ones, as in the
    released code's sequential pass, and the per-row keep counts follow from the ratios alone."""
    from dlp.models import load_model

    model, tok, _ = load_model(smollm[2])
    rates = allocation.dlp(ref_stats, 0.7, 0.15, "mean")
    report = prune(model, rates.ratios, method="wanda", mode="oneshot", stats=ref_stats)
    return model, report


def test_token_counts(test_ids, ref_windows):
    assert test_ids.shape[1] == 304838  # the data README's figure for this tokenizer
    assert tuple(ref_windows.shape) == (32, 512)


def test_block_statistic_and_sparsities_match(reference, ref_stats):
    ours = allocation.dlp(ref_stats, 0.7, 0.15, "mean").ratios
    theirs = reference["dlp"]["sparsity"]
    assert len(ours) == len(theirs) == 30
    worst = max(abs(a - b) for a, b in zip(ours, theirs))
    rel = max(abs(a / b - 1) for a, b in zip(ref_stats.statistic("mean"), reference["dlp"]["block_statistic_mean"]))
    print(f"\nper-block sparsity: max |ours - reference| = {worst:.2e}; block statistic: max relative difference {rel:.2e}")
    assert worst < 1e-4
    # the statistic itself, same normalisation as the released code
    np.testing.assert_allclose(ref_stats.statistic("mean"), reference["dlp"]["block_statistic_mean"], rtol=1e-3)


def test_block0_masks(pruned_model):
    from benchmarks.bench_reference import block0_agreement

    model, _ = pruned_model
    agree, total = block0_agreement(model, REFERENCE_DIR)
    assert total == sum(lin.weight.numel() for lin in find_decoder(model).linears(0).values())  # all 7 linears
    print(f"\nblock-0 masks: {agree:.6f} of {total} positions agree with the reference")
    assert agree >= 0.999


def test_achieved_sparsity(reference, pruned_model):
    _, report = pruned_model
    assert report.overall == pytest.approx(reference["pruning"]["achieved_sparsity"], abs=2e-4)
    assert max(abs(a - b) for a, b in zip(report.achieved, reference["pruning"]["achieved_per_block"])) < 2e-3
