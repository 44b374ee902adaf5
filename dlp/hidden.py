"""The calibration hidden states ``[N, L, H]`` that flow between blocks: in memory, or spilled to disk.

States keep the model's dtype. When the two buffers the engine needs (a block's inputs and its outputs) would
pass the memory budget they live in files instead, read and written one micro-batch at a time with
``pread``/``pwrite`` -- the page cache holds them, the process does not. The bytes are the same either way, so
a spilled run gives the same results as one in memory. A resumable walk always keeps them in its state folder.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .resources import default_budget


class HiddenStates:
    """One ``[N, L, H]`` buffer of calibration states (see the module docstring)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, path: str | Path | None = None, *, keep: bool = False,
                 temporary: bool = False):
        self.shape, self.dtype, self.temporary = tuple(shape), dtype, temporary
        self.row_bytes = torch.empty((), dtype=dtype).element_size()
        for d in self.shape[1:]:
            self.row_bytes *= d
        self.path = Path(path) if path is not None else None
        self.tensor: torch.Tensor | None = None
        self._fd: int | None = None
        if self.path is None:
            self.tensor = torch.empty(self.shape, dtype=dtype)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            exists = keep and self.path.is_file() and self.path.stat().st_size == self.nbytes
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not exists:
                os.ftruncate(self._fd, self.nbytes)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    @property
    def spilled(self) -> bool:
        return self.path is not None

    def read(self, lo: int, hi: int) -> torch.Tensor:
        """Rows ``lo:hi`` (a view in memory; a fresh tensor from the file)."""
        if self.tensor is not None:
            return self.tensor[lo:hi]
        out = torch.empty((hi - lo, *self.shape[1:]), dtype=self.dtype)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        done, offset = 0, lo * self.row_bytes
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n <= 0:
                raise OSError(f"short read from {self.path}")
            done += n
        return out

    def write(self, lo: int, rows: torch.Tensor) -> None:
        rows = rows.detach().to("cpu", self.dtype)
        if self.tensor is not None:
            self.tensor[lo : lo + rows.shape[0]] = rows
            return
        view = memoryview(rows.contiguous().reshape(-1).view(torch.uint8).numpy())
        done, offset = 0, lo * self.row_bytes
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)

    def sync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        """Close the file; a temporary spill file is deleted."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            if self.temporary:
                self.path.unlink(missing_ok=True)
                try:
                    self.path.parent.rmdir()
                except OSError:
                    pass

    def all(self) -> torch.Tensor:
        """Every row as one tensor (for small outputs, e.g. tests)."""
        return self.tensor if self.tensor is not None else self.read(0, self.shape[0])


def allocate_pair(shape: tuple[int, ...], dtype: torch.dtype, *, budget: int | None = None,
                  spill_dir: str | Path | None = None) -> tuple[HiddenStates, HiddenStates]:
    """The engine's two buffers, in memory when both fit ``budget`` bytes, else spilled into ``spill_dir``."""
    probe = HiddenStates((0, *shape[1:]), dtype)
    need = 2 * shape[0] * probe.row_bytes
    if need <= (default_budget() if budget is None else budget):
        return HiddenStates(shape, dtype), HiddenStates(shape, dtype)
    import tempfile

    if spill_dir is not None:
        Path(spill_dir).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="dlp-spill-", dir=spill_dir))
    return (HiddenStates(shape, dtype, folder / "a.bin", temporary=True),
            HiddenStates(shape, dtype, folder / "b.bin", temporary=True))
