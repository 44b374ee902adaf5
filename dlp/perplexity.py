"""WikiText-2 perplexity with the papers' protocol, block by block.

Non-overlapping windows of ``seqlen`` tokens from the start of the tokenized stream; each window's mean
shifted-token NLL (the HF causal-LM loss over its ``seqlen - 1`` predictions) counts ``seqlen`` times;
``ppl = exp(sum / (windows * seqlen))``.

The windows go through the one calibration engine (:mod:`dlp.engine`), so a model in memory and a model
streamed from its checkpoint are evaluated by the same code, one block at a time; then the model's own head
(final norm, output projection, whatever the architecture runs after its blocks) scores the final states a
few hundred tokens at a time -- the logits of a whole window are never held.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .engine import CalibrationEngine
from .errors import DLPError

#: logits elements scored at once (tokens x vocabulary): bounds the head's memory (2^22 floats = 16 MiB; at 2^24 the
#: logits and their log-softmax added ~100 MiB to the peak of `dlp ppl` on SmolLM2)
HEAD_ELEMENTS = 1 << 22


class _NoVisitor:
    """A plain forward: no collectors, no changes."""

    def collectors(self, index, linears):
        return {}

    def after_forward(self, index, block, collectors) -> bool:
        return False


class _Replay(nn.Module):
    """Stands in for the whole decoder: returns the final states of the tokens being scored."""

    def __init__(self, states: torch.Tensor, as_tuple: bool):
        super().__init__()
        self.states, self.as_tuple = states, as_tuple

    def forward(self, *args, **kwargs):
        return (self.states,) if self.as_tuple else self.states


def _check(ids: torch.Tensor, seqlen: int, max_windows: int | None) -> torch.Tensor:
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
    return ids[:, : windows * seqlen].reshape(windows, seqlen)


def perplexity(model, ids: torch.Tensor, seqlen: int, *, max_windows: int | None = None, device: str = "cpu",
               batch_size: int | None = None, progress=None, memory_budget: int | None = None, spill_dir=None) -> dict:
    """Perplexity of ``model`` (in memory, or a :class:`dlp.streaming.StreamedModel`) on token stream ``ids``
    (``[1, n]``); returns ppl, windows and tokens. ``progress(n)`` is called as windows are scored."""
    chunks = _check(ids, seqlen, max_windows)
    engine = CalibrationEngine.over(model, chunks, device=device, batch_size=batch_size, memory_budget=memory_budget,
                                    spill_dir=spill_dir)
    final = engine.walk(_NoVisitor(), label="perplexity")
    try:
        nll = _head_nll(engine, final, chunks, progress)
    finally:
        final.close()
    mean = sum(n / (seqlen - 1) for n in nll) / len(nll)
    return {"ppl": math.exp(mean), "windows": len(nll), "seqlen": seqlen, "tokens": len(nll) * seqlen}


def _head_nll(engine: CalibrationEngine, final, chunks: torch.Tensor, progress) -> list[float]:
    """Summed next-token NLL of each window from its final states, through the model's own head."""
    model, layout, device = engine.model, engine.layout, engine.device
    parent_path, _, attr = layout.blocks_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    blocks = getattr(parent, attr)
    embed_dim = model.get_input_embeddings().weight.shape[1]
    vocab = model.get_output_embeddings().weight.shape[0]
    step = max(1, HEAD_ELEMENTS // vocab)
    out: list[float] = []
    try:
        with torch.no_grad(), engine.weights.head(device):
            for w in range(chunks.shape[0]):
                states = final.read(w, w + 1).to(device)
                total = 0.0
                for lo in range(0, chunks.shape[1] - 1, step):
                    hi = min(lo + step, chunks.shape[1] - 1)
                    setattr(parent, attr, nn.ModuleList([_Replay(states[:, lo:hi], engine.block_returns_tuple)]))
                    embeds = torch.zeros((1, hi - lo, embed_dim), dtype=engine.dtype, device=device)
                    logits = model(inputs_embeds=embeds, use_cache=False).logits[0].float()
                    target = chunks[w, lo + 1 : hi + 1].to(device)
                    total += float(F.cross_entropy(logits, target, reduction="sum"))
                out.append(total)
                if progress is not None:
                    progress(1)
    finally:
        setattr(parent, attr, blocks)
    return out
