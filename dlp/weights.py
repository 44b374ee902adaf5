"""Where the calibration engine gets each block's weights: a model in memory, or streamed from its checkpoint.

Both sources give the engine the same three things -- the model's *prefix* (everything the forward runs before
block 0: embeddings, learned positions, rotary tables), one *block* at a time, and the *head* (final norm and
output projection) -- on the compute device, for the duration of a ``with``. The engine code is therefore the
same for both, which is why a streamed run and an in-memory run give identical results.

:class:`StreamedWeights` keeps the model as a skeleton on the meta device (no memory) and reads a block's tensors
from the safetensors shards when the engine asks for it, then returns the block to meta. The next block's tensors
are read on a background thread while the current one computes (``prefetch``), into pinned memory when the
compute device is CUDA. Checkpoint names map to module names through transformers' own rename rules for the
architecture (e.g. GPT-NeoX's ``embed_out`` -> ``lm_head``); tied embeddings are loaded once.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .checkpoint_reader import CheckpointReader
from .decoder import DecoderLayout, module_device
from .errors import DLPError


class ModelWeights:
    """A model already in memory: the prefix, blocks and head move to the compute device only if needed."""

    streamed = False

    def __init__(self, layout: DecoderLayout):
        self.layout = layout

    @contextmanager
    def prefix(self, device: torch.device) -> Iterator[None]:
        with self._non_blocks(device):
            yield

    head = prefix  # in memory, the head is part of the non-block modules

    @contextmanager
    def block(self, index: int, device: torch.device) -> Iterator[nn.Module]:
        block = self.layout.blocks[index]
        home = module_device(block)
        if home != device:
            block.to(device)
        try:
            yield block
        finally:
            if home != device:
                block.to(home)

    def prefetch(self, index: int, device: torch.device) -> None:
        return None

    @contextmanager
    def _non_blocks(self, device: torch.device) -> Iterator[None]:
        model, home = self.layout.model, module_device(self.layout.model)
        if home == device:
            yield
            return
        parent_path, _, attr = self.layout.blocks_path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        blocks = getattr(parent, attr)
        setattr(parent, attr, nn.ModuleList())
        try:
            model.to(device)
            yield
        finally:
            model.to(home)
            setattr(parent, attr, blocks)


def checkpoint_names(model: nn.Module, reader: CheckpointReader) -> dict[str, str]:
    """Module state-dict name -> checkpoint tensor name, through transformers' rename rules for this model."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)
    names: dict[str, str] = {}
    for key in reader.tensors:
        target, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if pattern is not None:
            raise DLPError(f"{type(model).__name__} checkpoints need tensor conversion on load ({key}); streaming "
                           f"cannot prune this architecture block by block")
        names[target] = key
    return names


class StreamedWeights:
    """A meta-device skeleton whose tensors are read from the checkpoint on demand (module docstring)."""

    streamed = True

    def __init__(self, layout: DecoderLayout, reader: CheckpointReader, dtype: torch.dtype, *, prefetch: bool = True):
        self.layout, self.reader, self.dtype = layout, reader, dtype
        model = layout.model
        self.names = checkpoint_names(model, reader)
        self.tensors = dict(model.named_parameters(remove_duplicate=True))
        self.tensors.update({n: b for n, b in model.named_buffers() if n in self.names})
        missing = [n for n, p in self.tensors.items() if p.device.type == "meta" and n not in self.names]
        if missing:
            raise DLPError(f"checkpoint {reader.folder} has no tensor for {missing[0]} ({len(missing)} missing); "
                           f"the weights do not match config.json")
        blocks = layout.blocks_path + "."
        head_module = model.get_output_embeddings()
        head_ids = {id(p) for p in head_module.parameters()} if head_module is not None else set()
        self.embedding_ids = {id(p) for p in model.get_input_embeddings().parameters()}
        self.head_names = [n for n, p in self.tensors.items() if id(p) in head_ids and id(p) not in self.embedding_ids]
        self.prefix_names = [n for n in self.tensors if not n.startswith(blocks) and n not in self.head_names]
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dlp-prefetch") if prefetch else None
        self._pending: dict[int, Future] = {}

    # ------------------------------------------------------------------ reading
    def block_names(self, index: int) -> list[str]:
        start = f"{self.layout.blocks_path}.{index}."
        return [n for n in self.tensors if n.startswith(start)]

    def read(self, names: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The named tensors from the checkpoint, cast to the compute dtype (floating ones), on the host
        (pinned when the compute device is CUDA)."""
        out = {}
        with self.reader.session() as s:
            for name in names:
                t = s.get(self.names[name])
                if t.is_floating_point() and t.dtype != self.dtype:
                    t = t.to(self.dtype)
                out[name] = t.pin_memory() if device.type == "cuda" else t
        return out

    def prefetch(self, index: int, device: torch.device) -> None:
        """Start reading block ``index`` in the background: always toward a CUDA device (the copy overlaps the
        GPU's work), on the CPU only when asked (it holds one more block in memory)."""
        if self._pool is None and device.type == "cuda":
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dlp-prefetch")
        if self._pool is not None and 0 <= index < self.layout.num_blocks and index not in self._pending:
            self._pending[index] = self._pool.submit(self.read, self.block_names(index), device)

    def _place(self, values: dict[str, torch.Tensor], device: torch.device) -> None:
        for name, value in values.items():
            target = self.tensors[name]
            new = nn.Parameter(value.to(device, non_blocking=True), requires_grad=False) \
                if isinstance(target, nn.Parameter) else value.to(device)
            if isinstance(target, nn.Parameter):
                torch.utils.swap_tensors(target, new)
            else:
                self._set_buffer(name, new)

    def _set_buffer(self, name: str, value: torch.Tensor) -> None:
        owner, _, attr = name.rpartition(".")
        module = self.layout.model.get_submodule(owner) if owner else self.layout.model
        module._buffers[attr] = value
        self.tensors[name] = value

    def _release(self, names: list[str]) -> None:
        for name in names:
            target = self.tensors[name]
            if isinstance(target, nn.Parameter) and target.device.type != "meta":
                empty = nn.Parameter(torch.empty(target.shape, dtype=target.dtype, device="meta"), requires_grad=False)
                torch.utils.swap_tensors(target, empty)

    # ------------------------------------------------------------------ the engine's view
    @contextmanager
    def _loaded(self, names: list[str], device: torch.device, values: dict[str, torch.Tensor] | None = None):
        self._place(values if values is not None else self.read(names, device), device)
        try:
            yield
        finally:
            self._release(names)

    @contextmanager
    def prefix(self, device: torch.device) -> Iterator[None]:
        with self._loaded(self.prefix_names, device), self._all_buffers(device):
            yield

    @contextmanager
    def head(self, device: torch.device) -> Iterator[None]:
        """Everything after the blocks (final norm, output projection); the input embedding only when it is
        the (tied) output projection -- the head runs on ``inputs_embeds``, never on token ids."""
        names = self.prefix_names if not self.head_names else \
            [n for n in self.prefix_names if id(self.tensors[n]) not in self.embedding_ids]
        with self._loaded(names + self.head_names, device), self._all_buffers(device):
            yield

    @contextmanager
    def block(self, index: int, device: torch.device) -> Iterator[nn.Module]:
        pending = self._pending.pop(index, None)
        values = pending.result() if pending is not None else None
        self.prefetch(index + 1, device)
        with self._loaded(self.block_names(index), device, values), self._module_buffers(self.layout.blocks[index], device):
            yield self.layout.blocks[index]

    @contextmanager
    def _all_buffers(self, device: torch.device) -> Iterator[None]:
        with self._module_buffers(self.layout.model, device, skip=self.layout.blocks):
            yield

    @contextmanager
    def _module_buffers(self, root: nn.Module, device: torch.device, skip: nn.Module | None = None):
        moved = []
        skipped = set(id(m) for m in skip.modules()) if skip is not None else set()
        for module in root.modules():
            if id(module) in skipped:
                continue
            for attr, buf in list(module._buffers.items()):
                if buf is not None and buf.device != device and buf.device.type != "meta":
                    moved.append((module, attr, buf.device))
                    module._buffers[attr] = buf.to(device)
        try:
            yield
        finally:
            for module, attr, home in moved:
                module._buffers[attr] = module._buffers[attr].to(home)

    def close(self) -> None:
        if self._pool is not None:
            for f in self._pending.values():
                f.cancel()
            self._pending.clear()
            self._pool.shutdown(wait=True)


def source_parts(source) -> tuple[nn.Module, DecoderLayout, "ModelWeights | StreamedWeights"]:
    """(model, layout, weight source) of an in-memory model or a :class:`dlp.streaming.StreamedModel`."""
    if isinstance(source, nn.Module):
        from .decoder import find_decoder

        layout = find_decoder(source)
        return source, layout, ModelWeights(layout)
    return source.model, source.layout, source.weights
