"""Pruners (magnitude, Wanda, SparseGPT) applied at per-block sparsities, unstructured or N:M.

Modes:
- ``sequential``: block ``l`` is scored on the outputs of the already-pruned blocks before it, as the
  released code does: two forwards per block (scored forward, then the pruned block's outputs).
- ``oneshot``: masks from the dense statistics. Wanda takes its input norms from the statistics
  artifact (no forward at all); SparseGPT builds its Hessians in one dense forward per block.
Magnitude needs no calibration data in either mode.

N:M with a non-uniform allocation: block ``l`` uses ``N_l = round(R_l * M)`` (clamped to 1..M-1) of every
``M`` consecutive inputs -- the per-block ratios become per-block N. The released code silently ignores
the ratios instead. With a uniform allocation N:M is the pattern itself.
"""
from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .engine import CalibrationEngine, InputCollector
from .errors import DLPError
from .statistics import ROW_CHUNK, BlockStatistics, wanda_scores

METHODS = ("magnitude", "wanda", "sparsegpt")
MODES = ("sequential", "oneshot")


@dataclass(frozen=True)
class Pattern:
    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else "unstructured"


def parse_pattern(text: str) -> Pattern:
    text = (text or "unstructured").strip().lower()
    if text == "unstructured":
        return Pattern()
    match = re.fullmatch(r"(\d+):(\d+)", text)
    if not match or not 0 < int(match.group(1)) < int(match.group(2)):
        raise DLPError(f"cannot parse pattern '{text}'; use 'unstructured' or N:M with 0 < N < M, e.g. 2:4 or 4:8")
    return Pattern(int(match.group(1)), int(match.group(2)))


def block_n(pattern: Pattern, ratio: float, uniform: bool) -> int:
    """How many of every M weights block gets pruned (see the module docstring)."""
    if uniform:
        return pattern.n
    return int(min(max(round(ratio * pattern.m), 1), pattern.m - 1))


# ------------------------------------------------------------------ masks
def row_mask(metric: torch.Tensor, ratio: float) -> torch.Tensor:
    """Wanda's per-output-row mask: the ``floor(C_in * ratio)`` smallest entries of each row (stable sort)."""
    k = int(metric.shape[1] * ratio)
    mask = torch.zeros_like(metric, dtype=torch.bool)
    if k > 0:
        idx = torch.sort(metric, dim=-1, stable=True)[1][:, :k]
        mask.scatter_(1, idx, True)
    return mask


def matrix_mask(metric: torch.Tensor, ratio: float) -> torch.Tensor:
    """The ``floor(numel * ratio)`` smallest entries of the whole matrix: everything below the k-th value, then
    entries equal to it in row-major order until the count is exact (no index array of the matrix's size)."""
    k = int(metric.numel() * ratio)
    flat = metric.reshape(-1)
    if k <= 0:
        return torch.zeros_like(metric, dtype=torch.bool)
    threshold = flat.kthvalue(k).values
    mask = flat < threshold
    need = k - int(mask.sum())
    if need > 0:
        mask[(flat == threshold).nonzero().flatten()[:need]] = True
    return mask.view_as(metric)


def nm_mask(metric: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the ``n`` smallest of every ``m`` consecutive inputs of each row."""
    rows, cols = metric.shape
    if cols % m:
        raise DLPError(f"pattern {n}:{m} needs input widths divisible by {m}; a layer has {cols} inputs")
    groups = metric.reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=-1, largest=False)[1]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def sparsegpt_update(weight: torch.Tensor, hessian: torch.Tensor, ratio: float, n: int = 0, m: int = 0,
                     blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh 2023): adaptive mask by ``w^2 / [H^-1]_jj^2`` per column block and
    the OBS update of the remaining weights; float32 Hessian with dampening ``percdamp * mean(diag H)``.
    Returns the new (pruned) weight in float32."""
    W = weight.detach().to(torch.float32).clone()
    H = hessian.to(torch.float32).clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    H += torch.eye(cols, device=H.device, dtype=H.dtype) * damp
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError as exc:
        raise DLPError("SparseGPT: the Hessian is not positive definite even after dampening; use more calibration samples") from exc
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if m == 0:
            mask1 = matrix_mask(W1 ** 2 / d.reshape(1, -1) ** 2, ratio)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if m and i % m == 0:
                tmp = W1[:, i:i + m] ** 2 / d[i:i + m].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, n, dim=1, largest=False)[1], True)
            w = W1[:, i]
            q = w.clone()
            q[mask1[:, i]] = 0
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


# ------------------------------------------------------------------ report
@dataclass
class PruneReport:
    method: str
    mode: str
    pattern: str
    target: list[float]
    achieved: list[float] = field(default_factory=list)
    per_linear: dict[str, float] = field(default_factory=dict)
    pruned: int = 0
    total: int = 0
    block_passes: float = 0.0
    seconds: float = 0.0

    @property
    def overall(self) -> float:
        return self.pruned / max(self.total, 1)

    def to_json(self) -> dict:
        return {"method": self.method, "mode": self.mode, "pattern": self.pattern, "target_sparsity": self.target,
                "achieved_sparsity": self.overall, "achieved_per_block": self.achieved, "per_linear": self.per_linear,
                "pruned_weights": self.pruned, "prunable_weights": self.total, "block_passes": self.block_passes,
                "seconds": self.seconds}


def _score_and_mask(W: torch.Tensor, method: str, ratio: float, pattern: Pattern, n: int,
                    norm2: torch.Tensor | None, nsamples: int) -> int:
    """Zero the pruned weights of one linear in place (magnitude or Wanda); returns how many were zeroed."""
    if method == "magnitude" and not pattern.structured:
        zero = matrix_mask(W.abs().to(torch.float32), ratio)
        W[zero] = 0
        return int(zero.sum())
    count = 0
    for lo in range(0, W.shape[0], ROW_CHUNK):
        rows = W[lo : lo + ROW_CHUNK]
        metric = rows.abs().to(torch.float32) if method == "magnitude" else wanda_scores(rows, norm2, nsamples)
        zero = nm_mask(metric, n, pattern.m) if pattern.structured else row_mask(metric, ratio)
        rows[zero] = 0
        count += int(zero.sum())
    return count


class _Pruner:
    """Prunes block by block; serves as the engine's visitor (with or without calibration data)."""

    def __init__(self, layout, method: str, ratios: list[float], pattern: Pattern, report: PruneReport,
                 norm2: dict[str, torch.Tensor] | None, nsamples: int, device: torch.device):
        self.layout, self.method, self.ratios, self.pattern = layout, method, ratios, pattern
        self.report, self.norm2, self.nsamples, self.device = report, norm2, nsamples, device
        self.uniform = max(ratios) - min(ratios) < 1e-12
        self.zeros: dict[str, int] = {}

    def collectors(self, index, linears):
        if self.method == "magnitude":
            return {}
        hessian = self.method == "sparsegpt"
        return {n: InputCollector(l.in_features, self.device, hessian) for n, l in linears.items()}

    def after_forward(self, index, block, collectors) -> bool:
        self.prune_block(index, collectors)
        return True

    def prune_block(self, index: int, collectors: dict[str, InputCollector] | None = None) -> None:
        ratio = self.ratios[index]
        n = block_n(self.pattern, ratio, self.uniform) if self.pattern.structured else 0
        pruned = total = 0
        for name, linear in self.layout.linears(index).items():
            W = linear.weight.data
            pname = self.layout.param_name(index, name)
            if self.method == "sparsegpt":
                H = collectors[name].hessian * (2.0 / self.nsamples)
                W.copy_(sparsegpt_update(W, H, ratio, n, self.pattern.m).to(W.dtype))
                z = int((W == 0).sum())
            else:
                norm2 = None
                if self.method == "wanda":
                    norm2 = collectors[name].norm2 if collectors else self.norm2[pname]
                z = _score_and_mask(W, self.method, ratio, self.pattern, n, norm2, self.nsamples)
            self.report.per_linear[pname] = z / W.numel()
            self.zeros[pname] = z
            pruned += z
            total += W.numel()
        self.report.achieved.append(pruned / total)
        self.report.pruned += pruned
        self.report.total += total

    def block_state(self, index: int) -> tuple[dict[str, torch.Tensor], dict]:
        names = [self.layout.param_name(index, n) for n in self.layout.linears(index)]
        return {}, {"achieved": self.report.achieved[index], "zeros": {n: self.zeros[n] for n in names}}

    def restore_block(self, index: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if len(self.report.achieved) != index:
            raise RuntimeError(f"prune report restored out of order: block {index} after {len(self.report.achieved)}")
        self.report.achieved.append(meta["achieved"])
        for name, linear in self.layout.linears(index).items():
            pname, numel = self.layout.param_name(index, name), linear.weight.numel()
            z = int(meta["zeros"][pname])
            self.zeros[pname] = z
            self.report.per_linear[pname] = z / numel
            self.report.pruned += z
            self.report.total += numel


def _check_prune_args(method: str, mode: str, ratios: list[float], num_blocks: int) -> None:
    if method not in METHODS:
        raise DLPError(f"unknown pruning method '{method}'; use one of: {', '.join(METHODS)}")
    if mode not in MODES:
        raise DLPError(f"unknown mode '{mode}'; use one of: {', '.join(MODES)}")
    if len(ratios) != num_blocks:
        raise DLPError(f"{len(ratios)} block sparsities given for a model with {num_blocks} blocks")
    for i, r in enumerate(ratios):
        if not 0.0 < r < 1.0:
            raise DLPError(f"block {i} sparsity {r} is outside (0, 1)")


def prune(model, ratios: list[float], *, method: str = "wanda", pattern: str | Pattern = "unstructured",
          mode: str = "sequential", windows: torch.Tensor | None = None, stats: BlockStatistics | None = None,
          device: str = "cpu", batch_size: int | None = None, sink=None, journal=None,
          memory_budget: int | None = None, spill_dir=None) -> PruneReport:
    """Prune at per-block sparsities ``ratios`` (see the module docstring for modes). ``model`` is an in-memory
    model (pruned in place) or a :class:`dlp.streaming.StreamedModel`, whose pruned blocks reach ``sink`` one
    at a time (:class:`dlp.checkpoint.CheckpointSink`); with a ``journal`` a killed run resumes at its first
    unfinished block."""
    from .weights import source_parts

    pattern = parse_pattern(pattern) if isinstance(pattern, str) else pattern
    _net, layout, _weights = source_parts(model)
    _check_prune_args(method, mode, list(ratios), layout.num_blocks)
    report = PruneReport(method, mode, str(pattern), list(ratios))
    start = time.perf_counter()
    needs_data = method != "magnitude" and not (method == "wanda" and mode == "oneshot" and stats is not None)
    if needs_data and windows is None:
        raise DLPError(f"{method} ({mode}) needs calibration windows")
    data = windows if needs_data else torch.zeros((1, 2), dtype=torch.long)
    engine = CalibrationEngine.over(model, data, device=device, batch_size=batch_size, memory_budget=memory_budget,
                                    spill_dir=spill_dir)
    norm2 = stats.norm2 if stats is not None and not needs_data else None
    nsamples = windows.shape[0] if needs_data else (stats.nsamples if stats is not None else 1)
    pruner = _Pruner(layout, method, list(ratios), pattern, report, norm2, nsamples, engine.device)
    if needs_data:
        engine.walk(pruner, sequential=(mode == "sequential"), sink=sink, journal=journal, label="prune").close()
        report.block_passes = engine.counters.passes_per_block()
    else:
        engine.walk_weights(pruner, sink=sink, journal=journal, label="prune")
    report.seconds = time.perf_counter() - start
    return report


def measured_sparsity(model) -> list[float]:
    """Share of exactly-zero weights in each block's linears (in memory, or streamed one block at a time)."""
    from .weights import source_parts

    _net, layout, weights = source_parts(model)
    out = []
    for i in range(layout.num_blocks):
        z = t = 0
        with weights.block(i, torch.device("cpu")):
            for lin in layout.linears(i).values():
                z += int((lin.weight == 0).sum())
                t += lin.weight.numel()
        out.append(z / t)
    return out


def state_folder(out: str | Path) -> Path:
    """Where a resumable run writing ``out`` keeps its journal (beside ``out``; removed when the run ends)."""
    out = Path(out)
    return out.parent / f".{out.name}.state"


def prune_checkpoint(streamed, out: str | Path, ratios: list[float], *, run_key: str | None = None,
                     max_shard_size: int | str | None = None, report_extra: dict | None = None,
                     **options) -> PruneReport:
    """Prune a :class:`dlp.streaming.StreamedModel` into a sharded Hugging Face checkpoint at ``out``, one block
    at a time (the whole model is never held). With ``run_key`` the run is resumable: a run killed at block k and
    started again with the same key continues at block k and ends bit-identical to an uninterrupted one.
    ``options`` are :func:`prune`'s (method, pattern, mode, windows, stats, device, ...)."""
    from .checkpoint import CheckpointSink, partial_folder
    from .checkpoint_writer import DEFAULT_MAX_SHARD_SIZE
    from .resume import BlockJournal

    journal = BlockJournal(state_folder(out) / "prune", run_key) if run_key else None
    partial = partial_folder(out)
    if journal is None or journal.next_block == 0:
        shutil.rmtree(partial, ignore_errors=True)
    sink = CheckpointSink(streamed, partial, max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE,
                          durable=journal is not None)
    try:
        report = prune(streamed, ratios, sink=sink, journal=journal, **options)
    except BaseException:
        sink.abandon()
        raise
    sink.finish(out, {**report.to_json(), **(report_extra or {})})
    shutil.rmtree(state_folder(out), ignore_errors=True)
    return report
