"""Write a sharded safetensors checkpoint tensor by tensor, so the whole model is never held.

The shard layout is planned up front from the tensors' names, dtypes and shapes with Hugging Face's own shard
planner (``huggingface_hub.split_state_dict_into_shards_factory``: tensors in order, a new shard when the next
one would pass ``max_shard_size``, files ``model-0000k-of-0000N.safetensors`` + ``model.safetensors.index.json``;
one ``model.safetensors`` when it fits). Each shard file is created at its final size with its header written
first; a tensor is written at its offset as soon as it is ready. Files that already exist with the same header
are reopened as they are, so a resumed run rewrites only what it had not finished (the caller's journal knows
which). The result loads with ``AutoModelForCausalLM.from_pretrained``.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint_reader import INDEX_NAME, NAMES, SINGLE_NAME, TensorInfo
from .errors import DLPError

DEFAULT_MAX_SHARD_SIZE = "5GB"  # huggingface_hub's default, the usual layout of releases on the hub


@dataclass(frozen=True)
class _Slot:
    file: str
    begin: int  # absolute byte offset of the tensor's data in the file


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def plan_shards(specs: list[TensorInfo], max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> dict[str, list[TensorInfo]]:
    """Shard file name -> its tensors, planned as ``save_pretrained`` would for these tensors in this order."""
    from huggingface_hub import split_state_dict_into_shards_factory

    by_name = {s.name: s for s in specs}
    split = split_state_dict_into_shards_factory(by_name, get_storage_size=lambda s: s.nbytes,
                                                 filename_pattern="model{suffix}.safetensors",
                                                 max_shard_size=max_shard_size)
    return {file: [by_name[n] for n in names] for file, names in split.filename_to_tensors.items()}


def _header(tensors: list[TensorInfo], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """The safetensors header for these tensors (largest element size first, then by name, contiguous data)
    and each tensor's offset relative to the data section."""
    order = sorted(tensors, key=lambda t: (-_element_size(t.dtype), t.name))
    head: dict[str, object] = {"__metadata__": dict(metadata)}
    offsets, pos = {}, 0
    for t in order:
        head[t.name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        offsets[t.name] = pos
        pos += t.nbytes
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw, offsets


class ShardedWriter:
    """Planned shard files, filled tensor by tensor (see the module docstring)."""

    def __init__(self, folder: str | Path, specs: list[TensorInfo], *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                 metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.specs = {s.name: s for s in specs}
        self.plan = plan_shards(specs, max_shard_size)
        if len(self.plan) == 1:  # one file: Hugging Face names it model.safetensors, without an index
            self.plan = {SINGLE_NAME: next(iter(self.plan.values()))}
        self.slots: dict[str, _Slot] = {}
        self._fds: dict[str, int] = {}
        meta = {"format": "pt", **(metadata or {})}
        for file, tensors in self.plan.items():
            header, offsets = _header(tensors, meta)
            self._fds[file] = self._open(self.folder / file, header, sum(t.nbytes for t in tensors))
            for name, rel in offsets.items():
                self.slots[name] = _Slot(file, len(header) + rel)

    @staticmethod
    def _open(path: Path, header: bytes, data_size: int) -> int:
        """Reuse a file that already carries this header (a resumed run), else create it at its full size."""
        if path.is_file() and path.stat().st_size == len(header) + data_size:
            with path.open("rb") as fh:
                if fh.read(len(header)) == header:
                    return os.open(path, os.O_RDWR)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(fd, header, 0)
        os.ftruncate(fd, len(header) + data_size)
        return fd

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor at its planned place; its dtype and shape must be the planned ones."""
        spec = self.specs.get(name)
        if spec is None:
            raise DLPError(f"tensor {name} is not part of the planned checkpoint")
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise DLPError(f"tensor {name} is {tensor.dtype} {tuple(tensor.shape)}, planned {spec.dtype} {spec.shape}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        view, slot = memoryview(data), self.slots[name]
        done = 0
        while done < len(view):
            done += os.pwrite(self._fds[slot.file], view[done:], slot.begin + done)

    def sync(self) -> None:
        """Make everything written so far durable (before a journal records it as done)."""
        for fd in self._fds.values():
            os.fsync(fd)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def finish(self, total_parameters: int | None = None) -> list[str]:
        """Sync, close, and write the index when there are several shards; returns the shard file names."""
        self.sync()
        self.close()
        if len(self.plan) > 1:
            weight_map = {t.name: file for file, tensors in self.plan.items() for t in tensors}
            meta = {"total_size": sum(s.nbytes for s in self.specs.values())}
            if total_parameters is not None:
                meta["total_parameters"] = int(total_parameters)
            index = {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}
            tmp = self.folder / (INDEX_NAME + ".tmp")
            tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, self.folder / INDEX_NAME)
        return list(self.plan)
