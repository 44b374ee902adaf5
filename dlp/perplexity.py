"""WikiText-2 perplexity with the papers' protocol.

Non-overlapping windows of ``seqlen`` tokens from the start of the tokenized stream; each window's mean
shifted-token NLL (the HF causal-LM loss over its ``seqlen - 1`` predictions) counts ``seqlen`` times;
``ppl = exp(sum / (windows * seqlen))``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import DLPError


def perplexity(model, ids: torch.Tensor, seqlen: int, *, max_windows: int | None = None, device: str = "cpu",
               batch_size: int | None = None, progress=None) -> dict:
    """Perplexity of ``model`` on token stream ``ids`` (``[1, n]``); returns ppl, windows and tokens."""
    if seqlen <= 1:
        raise DLPError(f"seqlen must be an integer above 1, got {seqlen}")
    if max_windows is not None and max_windows <= 0:
        raise DLPError(f"max-windows must be a positive integer, got {max_windows}")
    ids = ids.reshape(1, -1)
    windows = ids.shape[1] // seqlen
    if windows == 0:
        raise DLPError(f"the evaluation text has {ids.shape[1]} tokens, fewer than seqlen={seqlen}; lower --seqlen")
    if max_windows is not None:
        windows = min(windows, max_windows)
    batch_size = batch_size or max(1, 4096 // seqlen)
    chunks = ids[:, : windows * seqlen].reshape(windows, seqlen)
    home = next(model.parameters()).device
    model.to(device)
    total = 0.0
    try:
        with torch.no_grad():
            for lo in range(0, windows, batch_size):
                batch = chunks[lo : lo + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits.float()
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                       reduction="none").view(batch.shape[0], -1).mean(dim=1)
                total += float(loss.sum()) * seqlen
                if progress is not None:
                    progress(batch.shape[0])
    finally:
        model.to(home)
    return {"ppl": math.exp(total / (windows * seqlen)), "windows": windows, "seqlen": seqlen, "tokens": windows * seqlen}
