"""Artifact store for the pipeline: one class over fsspec, for a local folder or an S3 prefix (through s3fs).

Choose the place by URI with :func:`open_store`:

- ``None``                 -> ``<workdir>/artifacts`` on local disk
- ``/abs/path``, ``rel/path`` or ``file:///abs/path`` -> :class:`pipeline.local.LocalStore`
- ``s3://bucket/prefix``   -> :class:`pipeline.s3.S3Store` (endpoint from the ``endpoint_url`` argument, else
  ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``; region and credentials from the standard AWS chain)

Keys are ``/``-separated relative paths (``"stats/3f2a.../stat.json"``). An artifact is either a *file*
(one object) or a *directory* (many objects under ``key/`` plus a ``key/_COMPLETE`` marker).

The protocol, the same on both places (a reader never sees a half-written artifact as present):

- one object is written whole: a local file goes to a temp name in its folder and is then renamed; an S3
  object is one PUT, or a multipart upload completed at its end, so it appears whole or not at all;
- a directory: its old marker is removed first, the files are written under their final keys, files of an
  earlier version are removed, and the marker (the per-file table) is written LAST. A prefix without its
  marker reads as absent; a failed write removes what it wrote;
- sha256 is computed while copying (local) or in a pass just before the upload (S3, where it is kept as the
  object's ``sha256`` metadata); a directory's sha is :func:`pipeline.digests.dir_digest`; downloads are checked
  file by file against the marker;
- listings are never cached: another process may have written since (s3fs would otherwise serve a stale one);
- errors: a missing key is :class:`ArtifactMissing`; any other failure on S3 is a :class:`StorageError` (the
  pipeline retries those); a local disk error stays the ``OSError`` it is.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Literal
from urllib.parse import unquote, urlparse

from pipeline.digests import (
    COMPLETE_MARKER,
    DirListing,
    copy_hashing,
    dir_digest,
    hash_dir,
    iter_local_files,
    sha256_bytes,
    sha256_file,
    sha256_stream,
)

log = logging.getLogger(__name__)

__all__ = [
    "COMPLETE_MARKER", "ArtifactMissing", "ArtifactStore", "CorruptArtifact", "DirListing", "PutResult",
    "StorageError", "dir_digest", "hash_dir", "normalize_key", "open_store", "sha256_bytes", "sha256_file",
]


class StorageError(RuntimeError):
    """Any artifact-store failure (one-line message)."""


class ArtifactMissing(StorageError, FileNotFoundError):
    """The key is absent, or is a directory prefix without its ``_COMPLETE`` marker."""


class CorruptArtifact(StorageError):
    """Bytes read back do not match the recorded sha256."""


@dataclass(frozen=True)
class PutResult:
    """What a write produced: enough to build a :class:`pipeline.manifest.Manifest`."""

    key: str
    uri: str
    kind: Literal["file", "dir"]
    sha256: str
    size_bytes: int
    files: int = 1

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def normalize_key(key: str) -> str:
    """Validate and normalise a store key ('a/b/c'); rejects '..', '.', empty and absolute keys."""
    if not isinstance(key, str):
        raise StorageError(f"artifact key must be a string, got {type(key).__name__}")
    parts = [p for p in key.replace("\\", "/").strip("/").split("/") if p != ""]
    if not parts or any(p in (".", "..") for p in parts):
        raise StorageError(f"invalid artifact key {key!r}: use a relative 'a/b/c' path without '..'")
    return "/".join(parts)


def tmp_sibling(target: Path, tag: str = "tmp") -> Path:
    return target.parent / f".{target.name}.{tag}-{uuid.uuid4().hex[:12]}"


def _is_tmp(rel: str) -> bool:
    return any(p.startswith(".") and (".tmp-" in p or ".old-" in p) for p in rel.split("/"))


def _swap_dir_into_place(tmp: Path, target: Path) -> None:
    """Rename a finished local temp folder onto target (replacing what is there)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_file() or target.is_symlink():
        target.unlink()
    if not target.exists():
        os.rename(tmp, target)
        return
    old = tmp_sibling(target, "old")
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


class ArtifactStore:
    """One store over an fsspec filesystem ``fs`` rooted at its path ``base``; see the module docstring.

    The two places differ only in how one object is written whole (:meth:`_put_one`) and where a file's
    recorded sha256 lives (:meth:`_recorded_sha`)."""

    remote = True

    def __init__(self, fs: Any, base: str, root_uri: str, where: str = ""):
        self.fs, self.base, self.root_uri, self._where = fs, base.rstrip("/"), root_uri.rstrip("/"), where

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root_uri!r})"

    # --- addressing
    def path(self, key: str) -> str:
        """The key's path on ``fs``."""
        return f"{self.base}/{normalize_key(key)}"

    def uri(self, key: str) -> str:
        """Absolute URI of a key (``file:///...`` or ``s3://bucket/...``)."""
        return f"{self.root_uri}/{normalize_key(key)}"

    def local_path(self, key: str) -> Path | None:
        """The key's path on local disk when the store is local (no copy needed), else None."""
        return None

    @contextmanager
    def _errors(self, what: str, key: str) -> Iterator[None]:
        try:
            yield
        except StorageError:
            raise
        except (FileNotFoundError, IsADirectoryError) as e:
            raise ArtifactMissing(f"artifact not found: {self.uri(key) if key else self.root_uri}{self._where}") from e
        except Exception as e:
            if not self.remote:
                raise
            why = " ".join(str(e).split()) or type(e).__name__
            raise StorageError(f"S3 {what} failed for {self.uri(key) if key else self.root_uri}{self._where}: {why}") from e

    # --- writes
    def _put_one(self, src: Path | bytes, path: str) -> tuple[str, int]:
        raise NotImplementedError

    def _recorded_sha(self, path: str) -> str | None:
        return None

    def put_file(self, local_path: str | os.PathLike[str], key: str) -> PutResult:
        key = normalize_key(key)
        with self._errors("upload", key):
            sha, n = self._put_one(Path(local_path), self.path(key))
        return PutResult(key, self.uri(key), "file", sha, n)

    def write_bytes(self, key: str, data: bytes) -> PutResult:
        key = normalize_key(key)
        with self._errors("PUT", key):
            sha, n = self._put_one(bytes(data), self.path(key))
        return PutResult(key, self.uri(key), "file", sha, n)

    def put_dir(self, local_dir: str | os.PathLike[str], key_prefix: str) -> PutResult:
        key = normalize_key(key_prefix)
        src = Path(local_dir)
        if not src.is_dir():
            raise StorageError(f"put_dir: {src} is not a directory")
        base, listing = self.path(key), DirListing()
        with self._errors("directory upload", key):
            try:
                with suppress(FileNotFoundError):  # from here until the marker is back, readers see "absent"
                    self.fs.rm_file(f"{base}/{COMPLETE_MARKER}")
                for rel, p in iter_local_files(src):
                    sha, n = self._put_one(p, f"{base}/{rel}")
                    listing.files[rel] = {"sha256": sha, "size": n}
                for rel in set(self.dir_sizes(key)) - set(listing.files):
                    self.fs.rm_file(f"{base}/{rel}")
                self._put_one(listing.to_marker(), f"{base}/{COMPLETE_MARKER}")  # marker LAST
            except BaseException:
                with suppress(Exception):
                    self.fs.rm(base, recursive=True)
                raise
        return PutResult(key, self.uri(key), "dir", listing.sha256, listing.size_bytes, len(listing.files))

    # --- reads
    def _download(self, path: str, dst: Path) -> tuple[str, int]:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_sibling(dst)
        try:
            with self.fs.open(path, "rb") as fin, open(tmp, "wb") as fout:
                got = copy_hashing(fin, fout)
            os.replace(tmp, dst)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return got

    def get_file(self, key: str, local_path: str | os.PathLike[str]) -> Path:
        dst = Path(local_path)
        with self._errors("GET", key):
            self._download(self.path(key), dst)
        return dst

    def read_bytes(self, key: str) -> bytes:
        with self._errors("GET", key):
            return self.fs.cat_file(self.path(key))

    def get_dir(self, key_prefix: str, local_dir: str | os.PathLike[str], *, verify: bool = True) -> Path:
        """Download a complete directory artifact (marker excluded) to ``local_dir``, which is REPLACED as a
        whole (download into a temp folder beside it, then rename). With verify, every file's sha256 is checked
        against the marker (:class:`CorruptArtifact` on mismatch; ``local_dir`` is then left as it was).
        Raises :class:`ArtifactMissing` for an absent or incomplete prefix."""
        key = normalize_key(key_prefix)
        listing = self.dir_listing(key)
        if listing is None:
            raise ArtifactMissing(f"directory artifact not found or incomplete (no {COMPLETE_MARKER}): {self.uri(key)}{self._where}")
        dst = Path(local_dir).expanduser().resolve()
        if dst == self.local_path(key):
            return dst
        tmp = tmp_sibling(dst)
        try:
            tmp.mkdir(parents=True)
            for rel, meta in listing.files.items():
                self._get_listed(key, rel, tmp / rel, meta["sha256"] if verify else None)
            _swap_dir_into_place(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dst

    def _get_listed(self, key: str, rel: str, dst: Path, expect: str | None) -> None:
        with self._errors("GET", key):
            try:
                sha, _ = self._download(f"{self.path(key)}/{rel}", dst)
            except FileNotFoundError:
                raise CorruptArtifact(f"{self.uri(key)}: file {rel!r} listed in {COMPLETE_MARKER} is missing") from None
        if expect is not None and sha != expect:
            raise CorruptArtifact(f"{self.uri(key)}: sha256 mismatch for {rel!r} (expected {expect[:12]}, got {sha[:12]})")

    # --- queries
    def exists(self, key: str) -> bool:
        """True for a present file key or a directory prefix whose ``_COMPLETE`` marker is present."""
        path = self.path(key)
        with self._errors("HEAD", key):
            return self.fs.isfile(path) or self.fs.isfile(f"{path}/{COMPLETE_MARKER}")

    def is_dir(self, key: str) -> bool:
        """True when key is a COMPLETE directory artifact."""
        with self._errors("HEAD", key):
            return self.fs.isfile(f"{self.path(key)}/{COMPLETE_MARKER}")

    def dir_listing(self, key_prefix: str) -> DirListing | None:
        """The marker's per-file table of a complete directory artifact, else None."""
        marker = f"{self.path(key_prefix)}/{COMPLETE_MARKER}"
        try:
            with self._errors("GET", key_prefix):
                data = self.fs.cat_file(marker)
            return DirListing.from_marker(data)
        except ArtifactMissing:
            return None
        except (ValueError, AttributeError) as e:
            log.warning("unreadable %s at %s: %s", COMPLETE_MARKER, marker, e)
            return None

    def _find(self, prefix: str) -> dict[str, int]:
        """{key: size} of the objects at or under prefix (temp files excluded); one LIST on S3."""
        base = self.path(prefix) if prefix.strip("/") else self.base
        with self._errors("LIST", prefix.strip("/")):
            found = self.fs.find(base, detail=True)
        cut = len(self.base) + 1
        return {name[cut:]: int(info.get("size") or 0) for name, info in found.items() if not _is_tmp(name[cut:])}

    def list_keys(self, prefix: str = "") -> list[str]:
        """All object keys at or under prefix (markers included, temp files excluded), sorted."""
        return sorted(self._find(prefix))

    def dir_sizes(self, key_prefix: str) -> dict[str, int]:
        """{relpath: size} of the files currently under a directory prefix (marker excluded): the cheap half
        of a shallow integrity check."""
        key = normalize_key(key_prefix)
        return {k[len(key) + 1:]: n for k, n in self._find(key).items()
                if k.startswith(key + "/") and k != f"{key}/{COMPLETE_MARKER}"}

    def stat(self, key: str) -> dict[str, Any] | None:
        """Cheap facts about a file key: {"size": int, "sha256": str | None}; None if absent."""
        path = self.path(key)
        with self._errors("HEAD", key):
            try:
                info = self.fs.info(path)
            except FileNotFoundError:
                return None
            if info.get("type") != "file":
                return None
            return {"size": int(info["size"]), "sha256": self._recorded_sha(path)}

    # --- deletion and integrity
    def delete_prefix(self, prefix: str) -> int:
        """Delete the key itself and everything under ``prefix/`` (marker first); how many objects went."""
        key = normalize_key(prefix)
        found = self._find(key)
        with self._errors("DELETE", key), suppress(FileNotFoundError):
            if f"{key}/{COMPLETE_MARKER}" in found:
                self.fs.rm_file(f"{self.path(key)}/{COMPLETE_MARKER}")
            if found:
                self.fs.rm(self.path(key), recursive=True)
        return len(found)

    def compute_sha256(self, key: str) -> tuple[str, int] | None:
        """Recompute (sha256, size_bytes) of an artifact from its actual bytes; None if absent.

        For a directory this rehashes every file currently under the prefix (extra or missing files change the
        digest). Reads everything: on S3 this downloads the artifact (streamed, not kept)."""
        key = normalize_key(key)
        with self._errors("GET", key):
            if self.is_dir(key):
                hashed = {rel: self._hash(f"{self.path(key)}/{rel}") for rel in self.dir_sizes(key)}
                return dir_digest((rel, sha) for rel, (sha, _) in hashed.items()), sum(n for _, n in hashed.values())
            if self.fs.isfile(self.path(key)):
                return self._hash(self.path(key))
        return None

    def _hash(self, path: str) -> tuple[str, int]:
        with self.fs.open(path, "rb") as f:
            return sha256_stream(f)


def open_store(
    uri: str | os.PathLike[str] | None = None,
    *,
    workdir: str | os.PathLike[str] = ".dlp-work",
    endpoint_url: str | None = None,
    region: str | None = None,
) -> ArtifactStore:
    """Open the artifact store named by ``uri`` (see module docstring); None -> ``<workdir>/artifacts``.

    A relative plain path is resolved against the current directory (not the workdir)."""
    from pipeline.local import LocalStore
    from pipeline.s3 import S3Store

    if uri is None or str(uri).strip() == "":
        return LocalStore(Path(workdir) / "artifacts")
    s = str(uri)
    parsed = urlparse(s)
    if parsed.scheme == "s3":
        return S3Store(s, endpoint_url=endpoint_url, region=region)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"file URI with a host is not supported: {s!r} (use file:///abs/path)")
        return LocalStore(unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # (a one-letter scheme is a Windows drive)
        raise StorageError(f"unsupported storage URI {s!r}: use a path, file:///abs/path or s3://bucket/prefix")
    return LocalStore(s)
