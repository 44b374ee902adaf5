"""Calibration sampling is a pure function of (text, tokenizer, nsamples, seqlen, seed).

It once reseeded Python's module-level ``random`` and drew from it while tokenizing documents one by one, so
any other thread drawing from that generator in between (Prefect's events client does, on its event-loop
thread) changed the windows: a pipeline run resumed in the full test suite then chose another alpha than a
fresh run. These tests stand in for that thread with a tokenizer that draws from ``random`` on every call."""

from __future__ import annotations

import random

import pytest
import torch

from dlp import data


class _NoisyTokenizer:
    """The real tokenizer, plus a draw from the module-level ``random`` at every call (another thread's)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        random.random()
        return self.tokenizer(*args, **kwargs)


@pytest.mark.parametrize("source", ["c4", "wikitext2-valid"])  # documents (one tokenizer call each), rows
def test_windows_ignore_other_users_of_the_global_random(smollm, source):
    tok = smollm[1]
    text = data.load_text(source)
    quiet = data.calibration_windows(tok, text, 8, 64, 0)
    noisy_tok = _NoisyTokenizer(tok)
    noisy = data.calibration_windows(noisy_tok, text, 8, 64, 0)
    assert noisy_tok.calls >= 1 and torch.equal(quiet, noisy)
    assert not torch.equal(quiet, data.calibration_windows(tok, text, 8, 64, 1))  # the seed still matters


def test_sampling_leaves_the_callers_random_state_alone(smollm):
    random.seed(1234)
    before = random.getstate()
    data.calibration_windows(smollm[1], data.load_text("c4"), 4, 64, 0)
    assert random.getstate() == before
