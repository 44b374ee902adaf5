"""Training state of a recovery run, saved every K steps so a killed run resumes where it stopped.

The library writes one state as a local folder (:func:`write_state`) and hands it to a :class:`StateSaver`,
which keeps it somewhere durable; :class:`FolderSaver` keeps states in a local folder, and the pipeline maps
the same interface onto its artifact store. A state holds everything the next step depends on:

- ``adapter.safetensors``: the trainable (LoRA) parameters, by name;
- ``optimizer.pt``: the AdamW state dict (tensors, ints and floats only: read back with ``weights_only``);
- ``rng.pt``: the torch CPU generator state (LoRA dropout draws from it);
- ``state.json``: the step reached (= the data position: step x batch windows read), the loss curve so far,
  Python's ``random`` state, and the run key (model, settings, windows), which must match on resume.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file

from .errors import DLPError

STATE_FILES = ("adapter.safetensors", "optimizer.pt", "rng.pt", "state.json")


@dataclass
class TrainingState:
    step: int
    losses: list[float]


class StateSaver(Protocol):
    """Where training states go. ``save`` gets a complete state folder written by the library (it may move or
    copy it); ``latest`` returns a local folder holding the newest state it kept, or None."""

    def save(self, step: int, folder: Path) -> None: ...

    def latest(self) -> Path | None: ...


class FolderSaver:
    """Keeps the newest ``keep`` states under ``root/step-NNNNNNNN``; ``root/latest.json`` names the newest and
    is replaced atomically after its folder is complete, so a kill at any moment leaves a readable state."""

    def __init__(self, root: str | Path, keep: int = 1):
        self.root, self.keep = Path(root), max(1, keep)

    def save(self, step: int, folder: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step-{step:08d}"
        tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.root))
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = self.root / f".latest-{os.getpid()}.json"
        pointer.write_text(json.dumps({"step": step, "folder": final.name}))
        os.replace(pointer, self.root / "latest.json")
        for old in sorted(self.root.glob("step-*"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".incoming-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def latest(self) -> Path | None:
        try:
            name = json.loads((self.root / "latest.json").read_text())["folder"]
        except (OSError, ValueError, KeyError):
            return None
        folder = self.root / name
        return folder if all((folder / f).exists() for f in STATE_FILES) else None


def write_state(folder: Path, model, optimizer, state: TrainingState, key: str) -> None:
    """Write the state after ``state.step`` optimizer steps into ``folder``."""
    params = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(params, str(folder / "adapter.safetensors"))
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(torch.get_rng_state(), folder / "rng.pt")
    meta = {"step": state.step, "losses": state.losses, "key": key, "python_random": _py_state()}
    (folder / "state.json").write_text(json.dumps(meta))


def read_state(folder: Path, model, optimizer, key: str) -> TrainingState:
    """Load a state written by :func:`write_state` into ``model`` and ``optimizer`` and the RNGs."""
    meta = json.loads((folder / "state.json").read_text())
    if meta.get("key") != key:
        raise DLPError(f"the training state in {folder} belongs to another model, settings or training text; "
                       f"delete it or choose another state folder")
    params = dict(model.named_parameters())
    for name, tensor in load_file(str(folder / "adapter.safetensors")).items():
        params[name].data.copy_(tensor)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    torch.set_rng_state(torch.load(folder / "rng.pt", weights_only=True))
    version, internal, gauss = meta["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return TrainingState(step=int(meta["step"]), losses=[float(x) for x in meta["losses"]])


def _py_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def save_with(saver: StateSaver, model, optimizer, state: TrainingState, key: str) -> None:
    """Write the state to a temporary folder and hand it to ``saver``."""
    with tempfile.TemporaryDirectory(prefix="dlp-recovery-state-") as tmp:
        write_state(Path(tmp), model, optimizer, state, key)
        saver.save(state.step, Path(tmp))
