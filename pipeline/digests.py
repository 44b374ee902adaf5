"""sha256 of files, bytes and directory artifacts, and the per-file table a directory's ``_COMPLETE`` marker holds.

A directory artifact's digest is :func:`dir_digest` over its sorted ``(relpath, file sha256)`` pairs: independent
of the backend, of file times and of the order the files were written.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

COMPLETE_MARKER = "_COMPLETE"
CHUNK = 4 * 1024 * 1024
MARKER_FORMAT = 1


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)[0]


def sha256_stream(src: BinaryIO) -> tuple[str, int]:
    """(sha256, bytes read) of a stream, read in chunks."""
    return copy_hashing(src, None)


def copy_hashing(src: BinaryIO, dst: BinaryIO | None) -> tuple[str, int]:
    """Copy src to dst (None: only read) in chunks, hashing on the way: (sha256, bytes copied)."""
    h = hashlib.sha256()
    n = 0
    for chunk in iter(lambda: src.read(CHUNK), b""):
        h.update(chunk)
        if dst is not None:
            dst.write(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def dir_digest(entries: Iterable[tuple[str, str]]) -> str:
    """sha256 of a directory artifact: over the sorted ``(relpath, file_sha256)`` pairs.

    Exactly: ``sha256("".join(f"{relpath}\\0{sha}\\n" for relpath, sha in sorted(entries)))`` with POSIX
    relpaths.
    """
    h = hashlib.sha256()
    for rel, sha in sorted(entries):
        h.update(f"{rel}\0{sha}\n".encode())
    return h.hexdigest()


@dataclass
class DirListing:
    """Per-file table of a directory artifact (what the ``_COMPLETE`` marker holds)."""

    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # relpath -> {"sha256", "size"}

    @property
    def sha256(self) -> str:
        return dir_digest((rel, meta["sha256"]) for rel, meta in self.files.items())

    @property
    def size_bytes(self) -> int:
        return sum(int(meta["size"]) for meta in self.files.values())

    def to_marker(self) -> bytes:
        body = {
            "format": MARKER_FORMAT,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "files": dict(sorted(self.files.items())),
        }
        return json.dumps(body, indent=1, sort_keys=True).encode()

    @classmethod
    def from_marker(cls, data: bytes) -> "DirListing":
        body = json.loads(data)
        return cls(files={str(k): dict(v) for k, v in body.get("files", {}).items()})


def iter_local_files(root: Path) -> Iterator[tuple[str, Path]]:
    """(posix relpath, path) of every regular file under a local folder, sorted, marker excluded."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if rel != COMPLETE_MARKER:
                yield rel, p


def hash_dir(path: str | os.PathLike[str]) -> DirListing:
    """Hash every file of a local folder (marker excluded): its :class:`DirListing`."""
    listing = DirListing()
    for rel, p in iter_local_files(Path(path)):
        listing.files[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return listing
