"""The one calibration engine: every statistic and every pruner walks the decoder through it.

It captures the inputs of block 0 once (running the model's own embedding and position code, so each
architecture gets exactly the arguments -- rotary embeddings, masks, cache positions -- the current
transformers passes its blocks), then streams the calibration hidden states through the blocks in order,
one block on the compute device at a time, in micro-batches.

A *visitor* decides what happens at each block: which linears get input collectors (squared-norm sums,
optionally the Hessian ``X^T X``), and what to do after the block's forward (compute statistics, prune).
If the visitor changed the block's weights and the walk is ``sequential``, the block runs once more so
that the next block sees the pruned outputs; otherwise the dense outputs flow on.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from .decoder import DecoderLayout, find_decoder, module_device


class _StopForward(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for block 0 while the model runs: records the block's inputs, then stops the forward."""

    def __init__(self, block: nn.Module, sink: Callable):
        super().__init__()
        self.block = block
        self._sink = sink

    def __getattr__(self, name):  # models read attributes of their blocks (e.g. ``attention_type``)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.block, name)

    def forward(self, *args, **kwargs):
        self._sink(args, kwargs)
        raise _StopForward


class InputCollector:
    """Accumulates a linear's calibration inputs: ``norm2[j] = sum x_j^2`` and optionally ``H = X^T X``."""

    def __init__(self, in_features: int, device: torch.device, hessian: bool = False):
        self.norm2 = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if hessian else None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        self.norm2 += (x * x).sum(dim=0)
        if self.hessian is not None:
            self.hessian.addmm_(x.t(), x)
        self.tokens += x.shape[0]


class BlockVisitor(Protocol):
    def collectors(self, index: int, linears: dict[str, nn.Linear]) -> dict[str, InputCollector]: ...

    def after_forward(self, index: int, block: nn.Module, collectors: dict[str, InputCollector]) -> bool:
        """Called after the block's hooked forward; return True if the block's weights changed."""
        ...


@dataclass
class EngineCounters:
    """Instrumentation: block forward passes over the whole calibration set, and seconds spent."""

    block_passes: Counter = field(default_factory=Counter)
    capture_s: float = 0.0
    forward_s: float = 0.0

    def passes_per_block(self) -> float:
        return sum(self.block_passes.values()) / max(len(self.block_passes), 1)


class CalibrationEngine:
    """Streams calibration windows ``[N, L]`` through the decoder blocks (see the module docstring)."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, *, device: str | torch.device = "cpu",
                 batch_size: int | None = None, layout: DecoderLayout | None = None):
        self.model = model
        self.layout = layout or find_decoder(model)
        self.windows = windows
        self.device = torch.device(device)
        n, seqlen = windows.shape
        # micro-batch: keep a block's activations modest (about 8k tokens at a time by default)
        self.batch_size = batch_size or max(1, min(n, 8192 // max(seqlen, 1)))
        self.counters = EngineCounters()
        self._kwargs: dict[int, tuple[tuple, dict]] = {}

    # ---------------------------------------------------------------- capture
    def capture(self) -> torch.Tensor:
        """Run the model up to block 0 for every window; return the block-0 inputs ``[N, L, H]``."""
        start = time.perf_counter()
        model, blocks = self.model, self.layout.blocks
        home = module_device(model)
        first = blocks[0]
        captured: list[torch.Tensor] = []

        def sink(args, kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            captured.append(hidden.detach())
            size = hidden.shape[0]
            if size not in self._kwargs:
                rest = tuple(args[1:])
                kw = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values", "use_cache")}
                self._kwargs[size] = (rest, kw)

        use_cache = getattr(model.config, "use_cache", None)
        if use_cache is not None:
            model.config.use_cache = False
        blocks[0] = _Catcher(first, sink)
        moved = self._move_non_blocks(self.device) if self.device != home else False
        try:
            with torch.no_grad():
                for batch in self.windows.split(self.batch_size):
                    try:
                        model(input_ids=batch.to(self.device), use_cache=False)
                    except _StopForward:
                        pass
        finally:
            blocks[0] = first
            if moved:
                self._move_non_blocks(home)
            if use_cache is not None:
                model.config.use_cache = use_cache
        self.counters.capture_s += time.perf_counter() - start
        return torch.cat(captured, dim=0)

    def _move_non_blocks(self, device: torch.device) -> bool:
        """Move everything but the decoder blocks (embeddings, rotary tables, final norm) to ``device``."""
        parent_path, _, attr = self.layout.blocks_path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        blocks = getattr(parent, attr)
        setattr(parent, attr, nn.ModuleList())
        try:
            self.model.to(device)
        finally:
            setattr(parent, attr, blocks)
        return True

    # ---------------------------------------------------------------- blocks
    def _block_kwargs(self, size: int) -> tuple[tuple, dict]:
        if size not in self._kwargs:
            raise RuntimeError(f"no captured block arguments for a micro-batch of {size}")
        return self._kwargs[size]

    def forward_block(self, index: int, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Run block ``index`` on ``hidden`` in micro-batches; write into ``out`` (may alias nothing)."""
        block = self.layout.blocks[index]
        start = time.perf_counter()
        out = torch.empty_like(hidden) if out is None else out
        with torch.no_grad():
            for lo in range(0, hidden.shape[0], self.batch_size):
                mb = hidden[lo : lo + self.batch_size]
                rest, kw = self._block_kwargs(mb.shape[0])
                result = block(mb, *rest, **kw)
                out[lo : lo + mb.shape[0]] = result[0] if isinstance(result, (tuple, list)) else result
        self.counters.block_passes[index] += 1
        self.counters.forward_s += time.perf_counter() - start
        return out

    def walk(self, visitor: BlockVisitor, *, sequential: bool = False, blocks: range | None = None) -> None:
        """Stream the calibration set through the blocks, calling ``visitor`` at each (module docstring)."""
        hidden = self.capture()
        spare = torch.empty_like(hidden)
        indices = blocks if blocks is not None else range(self.layout.num_blocks)
        for index in indices:
            block = self.layout.blocks[index]
            home = module_device(block)
            if home != self.device:
                block.to(self.device)
            try:
                linears = self.layout.linears(index)
                collectors = visitor.collectors(index, linears)
                handles = _attach(linears, collectors)
                try:
                    self.forward_block(index, hidden, out=spare)
                finally:
                    for h in handles:
                        h.remove()
                changed = visitor.after_forward(index, block, collectors)
                del collectors
                if changed and sequential:
                    self.forward_block(index, hidden, out=spare)
            finally:
                if home != self.device:
                    block.to(home)
            hidden, spare = spare, hidden


def _attach(linears: dict[str, nn.Linear], collectors: dict[str, InputCollector]):
    """Pre-hooks feeding each linear's input to its collector.

    Linears that read the very same tensor (q/k/v, gate/up) are detected by identity: the input is
    accumulated once, and after the forward the followers' collectors are replaced by the leader's
    (``_Hooks.remove`` does that), so a shared Hessian is built once.
    """
    hooks = _Hooks(collectors)
    for name, linear in linears.items():
        if name in collectors:
            hooks.handles.append(linear.register_forward_pre_hook(hooks.make(name)))
    return [hooks]


class _Hooks:
    def __init__(self, collectors: dict[str, InputCollector]):
        self.collectors = collectors
        self.handles: list = []
        self.aliases: dict[str, str] = {}
        self._last: torch.Tensor | None = None
        self._last_name: str | None = None

    def make(self, name: str):
        def hook(_module, args):
            x = args[0]
            if x is self._last:
                self.aliases.setdefault(name, self.aliases.get(self._last_name, self._last_name))
                return
            self.collectors[name].add(x)
            self._last, self._last_name = x, name

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self._last = None
        for follower, leader in self.aliases.items():
            self.collectors[follower] = self.collectors[leader]
