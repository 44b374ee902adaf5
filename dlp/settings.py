"""Process-wide settings read from the environment (one place, so users can point them elsewhere).

- ``DLP_DATA_DIR``: offline mirror of the standard datasets, laid out like the project's shared data
  folder (``c4/c4_sample.jsonl``, ``wikitext-2-raw/wiki.test.raw``, ``wikitext-2/valid.txt``, ``evalsets/``).
- ``DLP_CACHE_DIR``: where converted model checkpoints (GGUF -> safetensors) are kept.
"""
from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path | None:
    """The offline dataset mirror, or None when unset (then hub datasets are read from the hub)."""
    value = os.environ.get("DLP_DATA_DIR", "").strip()
    return Path(value).expanduser().resolve() if value else None


def cache_dir() -> Path:
    """Where converted checkpoints live (default ``~/.cache/dlp``)."""
    value = os.environ.get("DLP_CACHE_DIR", "").strip()
    path = Path(value).expanduser() if value else Path.home() / ".cache" / "dlp"
    return path.resolve()
