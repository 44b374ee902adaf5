"""Resources of the out-of-core engine: the calibration-state budget, the allocator's behaviour, free disk.

glibc's malloc serves a large block from ``mmap`` (returned to the system when freed) only until the first such
block is freed; after that it raises its threshold and serves blocks of that size from the heap, which it rarely
gives back. A block-by-block walk frees and reallocates activations of the same few sizes thousands of times, so
the process grew by about 50 MB per decoder block on SmolLM2-135M (2.0 GB after 30 blocks for a 0.5 GB model)
although nothing was alive. :func:`bound_heap` fixes the threshold at 1 MiB (``mallopt(M_MMAP_THRESHOLD)``), so
large buffers always go back to the system: the same walk then stays at 0.5 GB. It is process-wide, idempotent,
a no-op off glibc, and ``DLP_MALLOC_DEFAULT=1`` turns it off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

import psutil

#: share of the currently available memory the calibration states may use before they spill to disk
BUDGET_SHARE = 0.5
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 1 << 20
_bounded = False


def default_budget() -> int:
    """Bytes the calibration states may hold in memory: half of what the machine has available now."""
    return int(psutil.virtual_memory().available * BUDGET_SHARE)


def bound_heap() -> bool:
    """Serve every allocation of 1 MiB or more from mmap (see the module docstring); True when applied."""
    global _bounded
    if _bounded or os.environ.get("DLP_MALLOC_DEFAULT") == "1":
        return _bounded
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        _bounded = bool(libc is not None and hasattr(libc, "mallopt") and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except OSError:
        _bounded = False
    return _bounded


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int, what: str = "size") -> int:
    """``"8GB"``, ``"512MiB"``, ``"1.5GB"`` or a byte count -> bytes; one-line error otherwise."""
    import re

    from .errors import DLPError

    if isinstance(text, int):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        if not match or match.group(2).upper() not in _UNITS:
            raise DLPError(f"{what} must be a size such as 8GB, 512MiB or a byte count, got '{text}'")
        value, unit = float(match.group(1)), match.group(2).upper()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise DLPError(f"{what} must be positive, got '{text}'")
    return size


def check_free_disk(folder, need: int, what: str) -> None:
    """One-line error unless ``folder``'s file system has ``need`` bytes free for ``what``."""
    import shutil
    from pathlib import Path

    from .errors import DLPError

    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    free = shutil.disk_usage(path).free
    if free < need:
        raise DLPError(f"{path} has {human_size(free)} free but {what} need {human_size(need)}; free disk space "
                       f"or write elsewhere")


def human_size(nbytes: float) -> str:
    """``1.5 GB``, ``320 MB``, ``12 KB`` (decimal units, as disks are sold)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"
