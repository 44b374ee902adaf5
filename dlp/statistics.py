"""Per-block calibration statistics for DLP and OWL, from ONE dense forward per block.

The artifact (:class:`BlockStatistics`) holds, for every linear, ``norm2[j] = sum x_j^2`` over all
calibration tokens, and per block the pooled Wanda-score statistics: mean, median and the OWL outlier
ratio. None of it depends on the target sparsity p or on alpha, so the pipeline computes it once and
derives every allocation from it. It is saved as safetensors (tensors) + JSON metadata in one file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors.torch import load_file, save_file

from .decoder import DecoderLayout
from .engine import CalibrationEngine, InputCollector
from .resume import BlockJournal
from .weights import source_parts

DEFAULT_OWL_M = 5.0


def wanda_scores(weight: torch.Tensor, norm2: torch.Tensor, nsamples: int) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2``, with the squared norm averaged over calibration windows as the released
    Wanda/DLP code does (a constant factor that cancels in every allocation and mask)."""
    return weight.detach().abs().to(torch.float32) * torch.sqrt(norm2.to(weight.device) / nsamples).reshape(1, -1)


#: rows scored at a time: a 7B block pools ~200M scores, which are never materialised together
ROW_CHUNK = 256
_HALF = 1 << 16


def score_chunks(pairs: list[tuple[torch.Tensor, torch.Tensor]], nsamples: int) -> Iterator[torch.Tensor]:
    """The Wanda scores of several linears (``(weight, norm2)`` pairs), ``ROW_CHUNK`` rows at a time."""
    for weight, norm2 in pairs:
        for lo in range(0, weight.shape[0], ROW_CHUNK):
            yield wanda_scores(weight[lo : lo + ROW_CHUNK], norm2, nsamples).reshape(-1)


def pooled_statistics(chunks: Callable[[], Iterable[torch.Tensor]], owl_m: float = DEFAULT_OWL_M) -> dict[str, float]:
    """Mean, median (lower middle, exactly as ``torch.median``/``kthvalue``) and OWL outlier ratio (%) of the
    pooled scores that ``chunks()`` yields (called twice), without holding them all: scores are non-negative,
    so their float32 bit patterns sort like their values, and the k-th smallest is found exactly from a
    histogram of the high 16 bits (pass 1, with the sum and count) and then of the low 16 bits inside the
    chosen bucket (pass 2, with the outlier count)."""
    count, total = 0, 0.0
    high = torch.zeros(_HALF, dtype=torch.int64)
    for c in chunks():
        count += c.numel()
        total += float(c.sum(dtype=torch.float64))
        high += torch.bincount((c.view(torch.int32) >> 16).to(torch.int64).cpu(), minlength=_HALF)
    mean = total / count
    k = (count + 1) // 2
    cum = high.cumsum(0)
    bucket = int(torch.searchsorted(cum, k))
    k_low = k - (int(cum[bucket - 1]) if bucket > 0 else 0)
    low = torch.zeros(_HALF, dtype=torch.int64)
    outliers = 0
    for c in chunks():
        bits = c.view(torch.int32)
        inside = bits[(bits >> 16) == bucket]
        low += torch.bincount((inside & 0xFFFF).to(torch.int64).cpu(), minlength=_HALF)
        outliers += int((c > mean * owl_m).sum())
    pattern = (bucket << 16) | int(torch.searchsorted(low.cumsum(0), k_low))
    median = float(torch.tensor([pattern], dtype=torch.int32).view(torch.float32))
    return {"mean": mean, "median": median, "owl_outlier_ratio": outliers / count * 100.0}


@dataclass
class BlockStatistics:
    """Calibration statistics of a model (see the module docstring)."""

    norm2: dict[str, torch.Tensor]  # weight name -> [C_in] float32
    blocks: list[dict[str, float]]  # per block: mean, median, owl_outlier_ratio
    nsamples: int
    tokens: int
    owl_m: float = DEFAULT_OWL_M
    meta: dict = field(default_factory=dict)

    def statistic(self, name: str) -> list[float]:
        return [b[name] for b in self.blocks]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        meta = {"blocks": self.blocks, "nsamples": self.nsamples, "tokens": self.tokens, "owl_m": self.owl_m,
                "meta": self.meta, "format": "dlp-block-statistics/1"}
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.detach().cpu().clone() for k, v in self.norm2.items()}, str(tmp),
                  metadata={"dlp": json.dumps(meta)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "BlockStatistics":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads(fh.metadata()["dlp"])
        return cls(norm2=load_file(str(path)), blocks=meta["blocks"], nsamples=meta["nsamples"],
                   tokens=meta["tokens"], owl_m=meta["owl_m"], meta=meta.get("meta", {}))

    def with_owl_m(self, source, owl_m: float) -> "BlockStatistics":
        """The same statistics with OWL outlier ratios for another M, from the weights (an in-memory model or a
        streamed one, one block at a time): no forward pass."""
        if owl_m == self.owl_m:
            return self
        _model, layout, weights = source_parts(source)
        blocks = []
        for i, summary in enumerate(self.blocks):
            with torch.no_grad(), weights.block(i, torch.device("cpu")):
                pairs = [(lin.weight, self.norm2[layout.param_name(i, n)]) for n, lin in layout.linears(i).items()]
                ratio = pooled_statistics(lambda: score_chunks(pairs, self.nsamples), owl_m)["owl_outlier_ratio"]
            blocks.append({**summary, "owl_outlier_ratio": ratio})
        return BlockStatistics(self.norm2, blocks, self.nsamples, self.tokens, owl_m, dict(self.meta))


class StatisticsVisitor:
    """Collects input norms of every linear and summarises each block's pooled Wanda scores."""

    def __init__(self, layout: DecoderLayout, device: torch.device, nsamples: int, owl_m: float,
                 hessian: bool = False):
        self.layout, self.device, self.nsamples, self.owl_m = layout, device, nsamples, owl_m
        self.hessian = hessian
        self.norm2: dict[str, torch.Tensor] = {}
        self.blocks: list[dict[str, float]] = []
        self.tokens = 0

    def collectors(self, index, linears):
        return {n: InputCollector(l.in_features, self.device, self.hessian) for n, l in linears.items()}

    def after_forward(self, index, block, collectors) -> bool:
        pairs = []
        for name, linear in self.layout.linears(index).items():
            c = collectors[name]
            self.norm2[self.layout.param_name(index, name)] = c.norm2.cpu()
            pairs.append((linear.weight, c.norm2))
            self.tokens = c.tokens
        self.blocks.append(pooled_statistics(lambda: score_chunks(pairs, self.nsamples), self.owl_m))
        return False

    def block_state(self, index: int) -> tuple[dict[str, torch.Tensor], dict]:
        names = [self.layout.param_name(index, n) for n in self.layout.linears(index)]
        return {n: self.norm2[n].clone() for n in names}, {"summary": self.blocks[index], "tokens": self.tokens}

    def restore_block(self, index: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if len(self.blocks) != index:
            raise RuntimeError(f"statistics restored out of order: block {index} after {len(self.blocks)} blocks")
        self.norm2.update(tensors)
        self.blocks.append(meta["summary"])
        self.tokens = meta["tokens"]


def collect_statistics(model, windows: torch.Tensor, *, device: str = "cpu", batch_size: int | None = None,
                       owl_m: float = DEFAULT_OWL_M, engine: CalibrationEngine | None = None,
                       journal: BlockJournal | None = None, memory_budget: int | None = None,
                       spill_dir=None) -> BlockStatistics:
    """One dense calibration sweep: block ``l`` runs once on the dense outputs of block ``l-1``. ``model`` is an
    in-memory model or a :class:`dlp.streaming.StreamedModel`; with a ``journal`` a killed sweep resumes at its
    first unfinished block."""
    engine = engine or CalibrationEngine.over(model, windows, device=device, batch_size=batch_size,
                                              memory_budget=memory_budget, spill_dir=spill_dir)
    visitor = StatisticsVisitor(engine.layout, engine.device, windows.shape[0], owl_m)
    engine.walk(visitor, sequential=False, journal=journal, label="statistics").close()
    return BlockStatistics(norm2=visitor.norm2, blocks=visitor.blocks, nsamples=windows.shape[0],
                           tokens=visitor.tokens, owl_m=owl_m,
                           meta={"block_passes": engine.counters.passes_per_block(),
                                 "num_blocks": engine.layout.num_blocks})
