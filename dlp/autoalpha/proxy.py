"""The alpha search's proxy: a candidate allocation scored by the pruned model's loss on held-out windows.

A candidate is ``(scorer, alpha, statistic)``: the rates ``R_l = p + 2 alpha (u_l - mean u)`` from the cached
statistics (alpha 0 is uniform, whatever the statistic), pruned in place by the :class:`Scorer` (a pruner, its
mode and the calibration windows it reads), then scored on calibration windows held out from the statistics
(same corpus and sampling, never the evaluation text). The :class:`Score` keeps the mean loss of every held-out
window, so the decision rule can resample the windows to measure the proxy's noise at no extra cost.

The dense weights of the block linears are kept on the CPU and copied back before each candidate and at the
end (:meth:`Proxy.restore`): the model comes back dense.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import MutableMapping

import torch
import torch.nn.functional as F
from torch import nn

from .. import allocation
from ..decoder import find_decoder
from ..errors import DLPError
from ..pruning import prune
from ..statistics import BlockStatistics


class DenseWeights:
    """A CPU copy of every block linear's weight, copied back after a candidate was pruned in place."""

    def __init__(self, model: nn.Module):
        layout = find_decoder(model)
        self.pairs = [(lin.weight, lin.weight.detach().to("cpu", copy=True))
                      for i in range(layout.num_blocks) for lin in layout.linears(i).values()]

    def restore(self) -> None:
        with torch.no_grad():
            for weight, dense in self.pairs:
                weight.copy_(dense)


@dataclass(frozen=True)
class Scorer:
    """How a candidate is pruned before it is scored: ``method`` in ``mode`` on the first ``windows``
    calibration windows; ``windows=None``: no forward (magnitude, or Wanda one-shot from the statistics)."""

    method: str
    mode: str = "oneshot"
    windows: int | None = None

    @property
    def tag(self) -> str:
        """The scorer's part of a candidate key: everything that changes the pruned weights."""
        if self.method == "magnitude":
            return "magnitude"  # needs no data: mode and windows change nothing
        return f"{self.method}-{self.mode}-" + ("stats" if self.windows is None else f"{self.windows}w")

    def __str__(self) -> str:
        return self.tag


def candidate_key(scorer: Scorer, alpha: float, statistic: str) -> str:
    """Cache key of a candidate (within one model, statistics, held-out set, pattern and sparsity);
    alpha 0 is uniform whatever the statistic."""
    return f"{scorer.tag}:uniform:0" if alpha == 0 else f"{scorer.tag}:{statistic}:{alpha:.10g}"


@dataclass
class Score:
    """A candidate's proxy: the perplexity over the held-out windows, ``exp(mean(losses))``, each window's
    mean token loss (empty when the pruner rejected the candidate: proxy +inf), and the seconds it took."""

    proxy: float
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @classmethod
    def of(cls, losses: list[float], seconds: float = 0.0) -> "Score":
        if not losses or not all(math.isfinite(x) for x in losses):
            return cls(math.inf, [], seconds)
        mean = sum(losses) / len(losses)
        return cls(math.exp(mean) if mean < 700 else math.inf, list(losses), seconds)

    def to_json(self) -> dict:
        return {"proxy": self.proxy if math.isfinite(self.proxy) else None, "losses": self.losses,
                "seconds": round(self.seconds, 3)}

    @classmethod
    def from_json(cls, body: dict) -> "Score":
        proxy = body.get("proxy")
        return cls(math.inf if proxy is None else float(proxy), [float(x) for x in body.get("losses") or []],
                   float(body.get("seconds") or 0.0))


def window_losses(model: nn.Module, heldout: torch.Tensor, *, device: str = "cpu",
                  batch_size: int | None = None) -> list[float]:
    """Each held-out window's mean next-token loss: the perplexity protocol (:mod:`dlp.perplexity`, whose
    ``ppl`` is ``exp`` of these losses' mean) with the windows kept apart."""
    windows = heldout.reshape(heldout.shape[0], -1)
    batch_size = batch_size or max(1, 4096 // windows.shape[1])
    home = next(model.parameters()).device
    model.to(device)
    out: list[float] = []
    try:
        with torch.no_grad():
            for lo in range(0, windows.shape[0], batch_size):
                batch = windows[lo : lo + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits.float()
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                       reduction="none").view(batch.shape[0], -1).mean(dim=1)
                out += [float(x) for x in loss]
    finally:
        model.to(home)
    return out


@dataclass
class ProxyCost:
    evaluations: int = 0
    block_passes: float = 0.0  # block forwards over the pruning windows, summed over candidates
    proxy_tokens: int = 0  # tokens the proxy's full-model forwards read
    prune_s: float = 0.0
    proxy_s: float = 0.0
    restore_s: float = 0.0
    cached: int = 0  # candidates served by the cache
    cached_s: float = 0.0  # what they had cost when they were scored

    def to_json(self) -> dict:
        return {"evaluations": self.evaluations, "block_passes": self.block_passes, "proxy_tokens": self.proxy_tokens,
                "prune_s": round(self.prune_s, 3), "proxy_s": round(self.proxy_s, 3),
                "restore_s": round(self.restore_s, 3), "cached": self.cached, "cached_s": round(self.cached_s, 3)}


class Proxy:
    """``proxy(scorer, alpha, statistic) -> Score`` of the model pruned with that candidate.

    ``cache`` (any mutable mapping, e.g. a pipeline's persistent store) maps :func:`candidate_key` to
    :meth:`Score.to_json`; cached candidates cost nothing. A candidate the pruner rejects (e.g. SparseGPT's
    Hessian at an extreme rate) scores +inf. Call :meth:`restore` when done: the model is pruned in place.
    """

    def __init__(self, model: nn.Module, stats: BlockStatistics, windows: torch.Tensor | None,
                 heldout: torch.Tensor, *, pattern: str, sparsity: float, device: str = "cpu",
                 batch_size: int | None = None, cache: MutableMapping[str, dict] | None = None):
        self.model, self.stats, self.windows = model, stats, windows
        self.heldout = heldout.reshape(heldout.shape[0], -1)
        self.pattern, self.sparsity = pattern, sparsity
        self.device, self.batch_size = device, batch_size
        self.cache = cache if cache is not None else {}
        self.dense: DenseWeights | None = None
        self.cost = ProxyCost()
        self.log: list[str] = []  # keys of the candidates evaluated (not cached), in order
        self._dirty = False

    def ratios(self, alpha: float, statistic: str) -> list[float]:
        if alpha == 0:
            return allocation.uniform(len(self.stats.blocks), self.sparsity).ratios
        return allocation.dlp(self.stats, self.sparsity, alpha, statistic).ratios

    def lookup(self, scorer: Scorer, alpha: float, statistic: str) -> Score | None:
        key = candidate_key(scorer, alpha, statistic)
        return Score.from_json(self.cache[key]) if key in self.cache else None

    def __call__(self, scorer: Scorer, alpha: float, statistic: str) -> Score:
        found = self.lookup(scorer, alpha, statistic)
        if found is not None:
            self.cost.cached += 1
            self.cost.cached_s += found.seconds
            return found
        key = candidate_key(scorer, alpha, statistic)
        self.cost.evaluations += 1
        self.log.append(key)
        start = time.perf_counter()
        losses = []
        if self._prune(scorer, self.ratios(alpha, statistic)):
            t = time.perf_counter()
            losses = window_losses(self.model, self.heldout, device=self.device, batch_size=self.batch_size)
            self.cost.proxy_s += time.perf_counter() - t
            self.cost.proxy_tokens += self.heldout.numel()
        score = Score.of(losses, time.perf_counter() - start)
        self.cache[key] = score.to_json()
        return score

    def _prune(self, scorer: Scorer, ratios: list[float]) -> bool:
        """Prune the dense model in place with ``scorer``; False when the pruner rejects the rates."""
        if scorer.windows is not None and self.windows is None:
            raise DLPError(f"{scorer.method} ({scorer.mode}) needs the calibration windows")
        if self.dense is None:
            self.dense = DenseWeights(self.model)
        self.restore()
        self._dirty = True
        windows = None if scorer.windows is None else self.windows[: scorer.windows]
        t = time.perf_counter()
        try:
            report = prune(self.model, ratios, method=scorer.method, pattern=self.pattern, mode=scorer.mode,
                           windows=windows, stats=self.stats if windows is None else None, device=self.device,
                           batch_size=self.batch_size)
        except DLPError:
            return False
        finally:
            self.cost.prune_s += time.perf_counter() - t
        self.cost.block_passes += report.block_passes
        return True

    def restore(self) -> None:
        if self._dirty and self.dense is not None:
            t = time.perf_counter()
            self.dense.restore()
            self.cost.restore_s += time.perf_counter() - t
            self._dirty = False


def heldout_windows(tokenizer, source, nsamples: int, seqlen: int, seed: int, count: int) -> torch.Tensor:
    """``count`` windows drawn right after the ``nsamples`` calibration windows of the same seed: the same
    sampling, disjoint draws (an identical window, if any, is dropped), and the calibration set unchanged."""
    from ..data import calibration_windows

    if count <= 0:
        raise DLPError(f"held-out windows must be a positive count, got {count}")
    drawn = calibration_windows(tokenizer, source, nsamples + count, seqlen, seed)
    calib, rest = drawn[:nsamples], drawn[nsamples:]
    keep = [w for w in rest if not (calib == w).all(dim=1).any()]
    if not keep:
        raise DLPError("every held-out window repeats a calibration window; use a larger calibration text")
    return torch.stack(keep)
