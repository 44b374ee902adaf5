"""Read a safetensors checkpoint one tensor at a time, without loading the model.

A checkpoint folder holds either one ``model.safetensors`` or shards listed by ``model.safetensors.index.json``
(Hugging Face's layout). :class:`CheckpointReader` validates the whole layout up front from the shard headers
alone (a few KB per shard): an index naming a missing file, a shard missing from the folder, a truncated or
corrupt shard, or a tensor the index promises but no shard holds, each stops with one line naming the file --
before any expensive stage. Tensors are then read one at a time straight into their own memory with ``pread``
at the offsets the header gives: memory-mapping the shard (``safe_open``) would count every page read toward the
process's memory a second time, beside the tensor copied out of it (a 7B embedding: 0.8 GB instead of 0.4 GB).
"""
from __future__ import annotations

import json
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .errors import DLPError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
#: safetensors dtype names -> torch dtypes (the ones model checkpoints use)
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, from the shard header."""

    name: str
    file: str  # shard file name inside the folder
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0  # absolute byte offset of the data in the file

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of one safetensors file, checked against the file's size (one line on any fault), and
    where its data section starts."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise DLPError(f"checkpoint shard {path} is truncated (no safetensors header); re-download or re-save it")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise DLPError(f"checkpoint shard {path} is truncated or not safetensors (header of {n} bytes); "
                               f"re-download or re-save it")
            header = json.loads(fh.read(n))
    except OSError as exc:
        raise DLPError(f"cannot read checkpoint shard {path} ({exc.strerror or exc}); check the file") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DLPError(f"checkpoint shard {path} has a corrupt safetensors header; re-download or re-save it") from exc
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise DLPError(f"checkpoint shard {path} is truncated ({size} bytes, its header needs {8 + n + end}); "
                       f"re-download or re-save it")
    return header, 8 + n


def _shard_files(folder: Path) -> dict[str, str]:
    """Tensor name -> shard file, from the index when there is one (its files must all be there)."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DLPError(f"{index} is not a valid safetensors index (no weight_map); re-save the checkpoint") from exc
        for file in sorted(set(weight_map.values())):
            if not (folder / file).is_file():
                raise DLPError(f"{index} names shard {file}, which is not in {folder}; download the missing shard")
        return dict(weight_map)
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise DLPError(f"{folder} has no .safetensors weights; DLP never loads pickle weights, convert them first")
    if len(files) > 1 and SINGLE_NAME not in files:
        raise DLPError(f"{folder} has {len(files)} safetensors files but no {INDEX_NAME}; add the index or merge them")
    return {}  # filled from the single file's header


class CheckpointReader:
    """Tensor-by-tensor access to a validated safetensors checkpoint folder (see the module docstring)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        weight_map = _shard_files(self.folder)
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_NAME if (self.folder / SINGLE_NAME).is_file()
                                                                    else next(self.folder.glob("*.safetensors")).name]
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, dict] = {}
        for file in files:
            header, start = read_header(self.folder / file)
            self.metadata[file] = header.get("__metadata__") or {}
            for name, spec in header.items():
                if name == "__metadata__":
                    continue
                if spec["dtype"] not in DTYPES:
                    raise DLPError(f"tensor {name} in {self.folder / file} has dtype {spec['dtype']}, which DLP cannot read")
                self.tensors[name] = TensorInfo(name, file, DTYPES[spec["dtype"]], tuple(int(d) for d in spec["shape"]),
                                                start + int(spec["data_offsets"][0]))
        missing = sorted(k for k, f in weight_map.items() if k not in self.tensors)
        if missing:
            raise DLPError(f"{self.folder / INDEX_NAME} lists {len(missing)} tensors that no shard holds (e.g. "
                           f"{missing[0]} in {weight_map[missing[0]]}); the shard is stale or corrupt, re-download it")

    @property
    def files(self) -> list[str]:
        return sorted({t.file for t in self.tensors.values()})

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise DLPError(f"checkpoint {self.folder} has no tensor {name}; the checkpoint does not match its config") from None

    @contextmanager
    def session(self) -> Iterator["ReadSession"]:
        """Open shards lazily for a group of reads (one block); every mapping is closed on exit."""
        s = ReadSession(self)
        try:
            yield s
        finally:
            s.close()

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read in its stored dtype (opens and closes its shard)."""
        with self.session() as s:
            return s.get(name)


class ReadSession:
    """Open shard files of one :meth:`CheckpointReader.session`."""

    def __init__(self, reader: CheckpointReader):
        self.reader = reader
        self._open: dict[str, int] = {}

    def get(self, name: str) -> torch.Tensor:
        info = self.reader.info(name)
        fd = self._open.get(info.file)
        if fd is None:
            fd = self._open[info.file] = os.open(self.reader.folder / info.file, os.O_RDONLY)
        out = torch.empty(info.shape, dtype=info.dtype)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], info.offset + done)
            if n <= 0:
                raise DLPError(f"checkpoint shard {self.reader.folder / info.file} ended inside tensor {name}; "
                               f"re-download it")
            done += n
        return out

    def close(self) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()
