"""The one calibration engine: every statistic and every pruner walks the decoder through it.

It captures the inputs of block 0 once (running the model's own embedding and position code, so each
architecture gets exactly the arguments -- rotary embeddings, masks, cache positions -- the current
transformers passes its blocks), then streams the calibration hidden states through the blocks in order,
one block on the compute device at a time, in micro-batches.

Where the weights come from is a *weight source* (:mod:`dlp.weights`): a model in memory, or a meta-device
skeleton whose blocks are read from the checkpoint's safetensors shards one at a time (out of core). The
hidden states live in memory or, past a memory budget, in files (:mod:`dlp.hidden`); with a journal
(:mod:`dlp.resume`) a killed walk resumes at its first unfinished block.

A *visitor* decides what happens at each block: which linears get input collectors (squared-norm sums,
optionally the Hessian ``X^T X``), and what to do after the block's forward (compute statistics, prune).
If the visitor changed the block's weights and the walk is ``sequential``, the block runs once more so
that the next block sees the pruned outputs; otherwise the dense outputs flow on. A *sink* receives each
finished block (a streamed pruner writes it to the output checkpoint there).
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from .decoder import DecoderLayout, find_decoder
from .hidden import HiddenStates, allocate_pair
from .resources import bound_heap
from .resume import BlockJournal
from .weights import ModelWeights, source_parts


log = logging.getLogger("dlp.engine")


def _test_pause(label: str, index: int) -> None:
    """Test seam: ``DLP_ENGINE_PAUSE=<label>:<block>:<seconds>`` sleeps before that block of the walks so
    labelled (``statistics``, ``prune``, ``perplexity``), letting a test kill a run at a known block. Never set
    it in production."""
    value = os.environ.get("DLP_ENGINE_PAUSE")
    if value:
        walk, block, seconds = value.split(":")
        if walk == label and int(block) == index:
            time.sleep(float(seconds))


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


class ResumableVisitor(BlockVisitor, Protocol):
    """A visitor whose per-block results can be saved and restored (needed for a journaled walk)."""

    def block_state(self, index: int) -> tuple[dict[str, torch.Tensor], dict]: ...

    def restore_block(self, index: int, tensors: dict[str, torch.Tensor], meta: dict) -> None: ...


BlockSink = Callable[[int, nn.Module], None]


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
                 batch_size: int | None = None, layout: DecoderLayout | None = None, weights=None,
                 memory_budget: int | None = None, spill_dir=None):
        bound_heap()
        self.model = model
        self.layout = layout or find_decoder(model)
        self.weights = weights if weights is not None else ModelWeights(self.layout)
        self.windows = windows
        self.device = torch.device(device)
        self.batch_size = batch_size or default_batch_size(self.layout, windows.shape)
        self.memory_budget, self.spill_dir = memory_budget, spill_dir
        self.counters = EngineCounters()
        self._kwargs: dict[int, tuple[tuple, dict]] = {}
        self.hidden_shape: tuple[int, ...] | None = None
        self.block_returns_tuple = False  # how this architecture's blocks return their states
        self.dtype = next(iter(model.parameters())).dtype

    @classmethod
    def over(cls, source, windows: torch.Tensor, **options) -> "CalibrationEngine":
        """An engine over an in-memory model or a :class:`dlp.streaming.StreamedModel` (weights streamed)."""
        model, layout, weights = source_parts(source)
        return cls(model, windows, layout=layout, weights=weights, **options)

    # ---------------------------------------------------------------- capture
    def _run_prefix(self, batches, sink) -> None:
        """Run the model up to block 0 for each batch of token ids; ``sink(args, kwargs)`` sees block 0's inputs."""
        model, blocks = self.model, self.layout.blocks
        first = blocks[0]
        use_cache = getattr(model.config, "use_cache", None)
        if use_cache is not None:
            model.config.use_cache = False
        blocks[0] = _Catcher(first, sink)
        try:
            with torch.no_grad(), self.weights.prefix(self.device):
                for batch in batches:
                    try:
                        model(input_ids=batch.to(self.device), use_cache=False)
                    except _StopForward:
                        pass
        finally:
            blocks[0] = first
            if use_cache is not None:
                model.config.use_cache = use_cache

    def _remember(self, args, kwargs) -> torch.Tensor:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        size = hidden.shape[0]
        if size not in self._kwargs:
            kw = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values", "use_cache")}
            self._kwargs[size] = (tuple(args[1:]), kw)
        self.hidden_shape = (self.windows.shape[0], *hidden.shape[1:])
        self.dtype = hidden.dtype
        return hidden

    def capture(self, into: HiddenStates | None = None) -> HiddenStates:
        """Run the model up to block 0 for every window; the block-0 inputs ``[N, L, H]`` go into ``into``
        (allocated here, in memory or spilled, when not given)."""
        start = time.perf_counter()
        target = [into]
        pos = [0]

        def sink(args, kwargs):
            hidden = self._remember(args, kwargs)
            if target[0] is None:
                target[0] = self.buffers(hidden.dtype)[0]
            target[0].write(pos[0], hidden)
            pos[0] += hidden.shape[0]

        self._run_prefix(self.windows.split(self.batch_size), sink)
        self.counters.capture_s += time.perf_counter() - start
        return target[0]

    def capture_arguments(self) -> None:
        """Only the block arguments (rotary tables, masks) for every micro-batch size: what a resumed walk needs."""
        sizes = sorted({len(b) for b in self.windows.split(self.batch_size)})
        firsts = [self.windows[:s] for s in sizes]
        self._run_prefix(firsts, lambda args, kwargs: self._remember(args, kwargs))

    def buffers(self, dtype: torch.dtype | None = None) -> tuple[HiddenStates, HiddenStates]:
        """Two state buffers (in memory, or spilled past the memory budget); a second call returns the same pair."""
        if getattr(self, "_pair", None) is None:
            shape = self.hidden_shape
            self._pair = allocate_pair(shape, dtype or self.dtype, budget=self.memory_budget, spill_dir=self.spill_dir)
        return self._pair

    # ---------------------------------------------------------------- blocks
    def _block_kwargs(self, size: int) -> tuple[tuple, dict]:
        if size not in self._kwargs:
            raise RuntimeError(f"no captured block arguments for a micro-batch of {size}")
        return self._kwargs[size]

    def forward_block(self, index: int, block: nn.Module, src: HiddenStates, dst: HiddenStates) -> None:
        """Run ``block`` on the states in ``src`` in micro-batches, writing its outputs into ``dst``."""
        start = time.perf_counter()
        with torch.no_grad():
            for lo in range(0, src.shape[0], self.batch_size):
                mb = src.read(lo, min(lo + self.batch_size, src.shape[0])).to(self.device)
                rest, kw = self._block_kwargs(mb.shape[0])
                result = block(mb, *rest, **kw)
                self.block_returns_tuple = isinstance(result, (tuple, list))
                dst.write(lo, result[0] if self.block_returns_tuple else result)
        self.counters.block_passes[index] += 1
        self.counters.forward_s += time.perf_counter() - start

    def walk(self, visitor: BlockVisitor, *, sequential: bool = False, blocks: range | None = None,
             sink: BlockSink | None = None, journal: BlockJournal | None = None, label: str = "walk") -> HiddenStates:
        """Stream the calibration set through the blocks, calling ``visitor`` at each (module docstring).
        Returns the buffer holding the last block's outputs. Each block is logged (``dlp.engine``, INFO) as
        ``<label>: block i/n``."""
        indices = blocks if blocks is not None else range(self.layout.num_blocks)
        hidden, spare = self._start(visitor, journal, indices)
        for index in indices:
            if journal is not None and index < journal.next_block:
                continue
            self._announce(label, index)
            self._visit(index, visitor, sequential, hidden, spare, sink)
            if journal is not None:
                tensors, meta = visitor.block_state(index)
                journal.save_block(index, tensors, meta)
                journal.commit(index, spare)
            hidden, spare = spare, hidden
        spare.close()
        return hidden

    def _announce(self, label: str, index: int) -> None:
        _test_pause(label, index)
        n = self.layout.num_blocks
        log.info("%s: block %d/%d", label, index + 1, n, extra={"dlp_block": index, "dlp_blocks": n})

    def _start(self, visitor, journal: BlockJournal | None, indices) -> tuple[HiddenStates, HiddenStates]:
        """The (inputs, spare) buffers of the first block to run: captured, or restored from the journal."""
        first = indices[0] if len(indices) else 0
        if journal is not None and journal.next_block > first:
            self.capture_arguments()
            for index in range(first, journal.next_block):
                visitor.restore_block(index, *journal.load_block(index))
            return journal.buffers(self.hidden_shape, self.dtype)
        self.weights.prefetch(first, self.device)
        if journal is not None:
            self.capture_arguments()
            pair = journal.buffers(self.hidden_shape, self.dtype)
            return self.capture(into=pair[0]), pair[1]
        hidden = self.capture()
        return hidden, self.buffers()[1]

    def _visit(self, index: int, visitor, sequential: bool, hidden: HiddenStates, spare: HiddenStates,
               sink: BlockSink | None) -> None:
        with self.weights.block(index, self.device) as block:
            linears = self.layout.linears(index)
            collectors = visitor.collectors(index, linears)
            handles = _attach(linears, collectors)
            try:
                self.forward_block(index, block, hidden, spare)
            finally:
                for h in handles:
                    h.remove()
            with torch.no_grad():
                changed = visitor.after_forward(index, block, collectors)
            del collectors
            if changed and sequential:
                self.forward_block(index, block, hidden, spare)
            if sink is not None:
                sink(index, block)

    def walk_weights(self, visitor: BlockVisitor, *, sink: BlockSink | None = None,
                     journal: BlockJournal | None = None, label: str = "walk") -> None:
        """Visit every block without calibration data (magnitude, Wanda from stored statistics)."""
        start = journal.next_block if journal is not None else 0
        for index in range(start):
            visitor.restore_block(index, *journal.load_block(index))
        for index in range(start, self.layout.num_blocks):
            self._announce(label, index)
            with torch.no_grad(), self.weights.block(index, self.device) as block:
                visitor.after_forward(index, block, {})
                if sink is not None:
                    sink(index, block)
            if journal is not None:
                journal.save_block(index, *visitor.block_state(index))
                journal.commit(index)


#: default micro-batch: about 8k tokens, fewer when the widest linear output would pass ACTIVATION_BYTES
BATCH_TOKENS = 8192
ACTIVATION_BYTES = 16 * 2**20


def default_batch_size(layout: DecoderLayout, shape: tuple[int, ...]) -> int:
    """Windows per micro-batch: ~8k tokens, capped so one float32 activation of the block's widest linear
    stays under 16 MiB (a 7B MLP gets 1 window of 256 or 2048, SmolLM2 5 of 512). The forward's transients
    (MLP intermediates, attention scores) scale with the batch and set the peak over a streamed block: with a
    64 MiB cap a 4 GB LLaMA-2-7B-shaped model (8 x 256) peaked at 1019 MiB RSS, at 16 MiB 887 MiB; with 32 MiB
    SmolLM2's statistics peaked at 877 MiB, at 16 MiB 623 MiB (benchmarks/bench_outofcore.py). The price:
    SmolLM2's perplexity ran ~10 % slower than at 16 windows per batch (measured under load)."""
    n, seqlen = shape
    widest = max((lin.out_features for lin in layout.linears(0).values()), default=1)
    tokens = min(BATCH_TOKENS, max(seqlen, ACTIVATION_BYTES // (4 * widest)))
    return max(1, min(n, tokens // max(seqlen, 1)))


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
