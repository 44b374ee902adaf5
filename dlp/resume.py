"""Block-level resume: a walk killed at block k restarts at block k, not at block 0.

A resumable walk keeps a state folder: the two calibration-state buffers (``a.bin``, ``b.bin``), each finished
block's visitor results (``block-00012.safetensors``: tensors plus JSON), and ``journal.json`` naming the last
finished block and the buffer that holds the states entering the next one. A block is committed in order --
its output weights synced by the caller, its results written, the states synced, then the journal replaced
atomically -- so after a kill the journal never names work that is not on disk. The journal carries the run's
key: a folder left by a different run (other model, windows, settings) is cleared instead of resumed.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .hidden import HiddenStates

JOURNAL = "journal.json"


class BlockJournal:
    """The state folder of one resumable walk (see the module docstring)."""

    def __init__(self, folder: str | Path, key: str):
        self.folder = Path(folder)
        self.key = key
        state = self._read()
        if state is None or state.get("key") != key:
            if self.folder.exists():
                shutil.rmtree(self.folder)
            state = {"key": key, "done": -1, "hidden": "a"}
        self.folder.mkdir(parents=True, exist_ok=True)
        self.done: int = int(state["done"])
        self.current: str = state["hidden"]

    def _read(self) -> dict | None:
        try:
            return json.loads((self.folder / JOURNAL).read_text())
        except (OSError, ValueError):
            return None

    @property
    def next_block(self) -> int:
        return self.done + 1

    def buffers(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[HiddenStates, HiddenStates]:
        """(states entering the next block, spare); the first is kept as it is on disk when resuming."""
        spare = "b" if self.current == "a" else "a"
        current = HiddenStates(shape, dtype, self.folder / f"{self.current}.bin", keep=self.done >= 0)
        return current, HiddenStates(shape, dtype, self.folder / f"{spare}.bin", keep=True)

    def save_block(self, index: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        path = self.folder / f"block-{index:05d}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"dlp": json.dumps(meta)})
        os.replace(tmp, path)

    def load_block(self, index: int) -> tuple[dict[str, torch.Tensor], dict]:
        path = self.folder / f"block-{index:05d}.safetensors"
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads(fh.metadata()["dlp"])
            return {k: fh.get_tensor(k) for k in fh.keys()}, meta

    def commit(self, index: int, holder: HiddenStates | None = None) -> None:
        """Record block ``index`` as finished, its outputs in ``holder`` (already written; None for a walk
        without calibration states)."""
        name = self.current
        if holder is not None:
            holder.sync()
            name = "a" if holder.path is not None and holder.path.name == "a.bin" else "b"
        tmp = self.folder / (JOURNAL + ".tmp")
        with tmp.open("w") as fh:
            json.dump({"key": self.key, "done": index, "hidden": name}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.folder / JOURNAL)
        self.done, self.current = index, name

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
