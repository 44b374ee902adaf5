"""Artifact store for the pipeline: a local folder or an S3 bucket, behind one interface.

Choose the backend by URI with :func:`open_store`:

- ``None``                 -> ``<workdir>/artifacts`` on local disk
- ``/abs/path``, ``rel/path`` or ``file:///abs/path`` -> :class:`LocalStore`
- ``s3://bucket/prefix``   -> :class:`S3Store` (boto3; endpoint from the ``endpoint_url`` argument, else
  ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``; region and credentials from the standard AWS chain)

Keys are ``/``-separated relative paths (``"stats/3f2a.../stat.json"``). An artifact is either a *file*
(one object) or a *directory* (many objects under ``key/`` plus a ``key/_COMPLETE`` marker).

Atomicity (a reader never sees a half-written artifact as present):

- local file: written to a temp name in the same folder, then ``os.replace``;
- local directory: written to a temp folder beside the target, marker included, then renamed into place;
- S3 file: one PUT (atomic in S3); S3 directory: the old marker is deleted first, objects are uploaded under
  their final keys, stale objects are removed, and the ``_COMPLETE`` marker is written LAST. A prefix without
  its marker is treated as absent by :meth:`ArtifactStore.exists` and :meth:`ArtifactStore.get_dir`.

sha256 is computed while writing (local: during the copy; S3: in a streaming pass just before the upload, and
stored as object metadata ``x-amz-meta-sha256``). A directory's sha is :func:`dir_digest` over the sorted
``(relpath, file sha256)`` pairs; the marker holds the per-file table, so downloads are checked file by file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Literal
from urllib.parse import unquote, urlparse

log = logging.getLogger(__name__)

COMPLETE_MARKER = "_COMPLETE"
CHUNK = 4 * 1024 * 1024
MARKER_FORMAT = 1

__all__ = [
    "COMPLETE_MARKER",
    "ArtifactMissing",
    "ArtifactStore",
    "CorruptArtifact",
    "DirListing",
    "LocalStore",
    "PutResult",
    "S3Store",
    "StorageError",
    "dir_digest",
    "hash_dir",
    "make_s3_client",
    "open_store",
    "resolve_s3_endpoint",
    "sha256_bytes",
    "sha256_file",
]


# --------------------------------------------------------------------------------------------- errors
class StorageError(RuntimeError):
    """Any artifact-store failure (one-line message)."""


class ArtifactMissing(StorageError, FileNotFoundError):
    """The key is absent, or is a directory prefix without its ``_COMPLETE`` marker."""


class CorruptArtifact(StorageError):
    """Bytes read back do not match the recorded sha256."""


# --------------------------------------------------------------------------------------------- hashing
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def dir_digest(entries: Iterable[tuple[str, str]]) -> str:
    """sha256 of a directory artifact: over the sorted ``(relpath, file_sha256)`` pairs.

    Exactly: ``sha256("".join(f"{relpath}\\0{sha}\\n" for relpath, sha in sorted(entries)))`` with POSIX
    relpaths. Independent of the backend, of file times and of the order files were written.
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


def _iter_local_files(root: Path) -> Iterator[tuple[str, Path]]:
    """(posix relpath, path) of every regular file under root, sorted, marker excluded."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if rel == COMPLETE_MARKER:
                continue
            yield rel, p


def hash_dir(path: str | os.PathLike[str]) -> DirListing:
    """Hash every file of a local folder (marker excluded): its :class:`DirListing`."""
    root = Path(path)
    listing = DirListing()
    for rel, p in _iter_local_files(root):
        listing.files[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return listing


def _copy_hashing(src: BinaryIO, dst: BinaryIO) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    for chunk in iter(lambda: src.read(CHUNK), b""):
        h.update(chunk)
        dst.write(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def _tmp_sibling(target: Path, tag: str = "tmp") -> Path:
    return target.parent / f".{target.name}.{tag}-{uuid.uuid4().hex[:12]}"


def _is_tmp_name(name: str) -> bool:
    return name.startswith(".") and (".tmp-" in name or ".old-" in name)


def _atomic_copy_local(src: Path, dst: Path) -> tuple[str, int]:
    """Copy src to dst atomically (temp in dst's folder + os.replace), hashing on the way."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(dst)
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            sha, n = _copy_hashing(fin, fout)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return sha, n


def _atomic_write_local(data: bytes, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(dst)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _swap_dir_into_place(tmp: Path, target: Path) -> None:
    """Rename a finished temp folder onto target (replacing an old artifact folder if there is one)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_file() or target.is_symlink():
        target.unlink()
    if target.exists():
        old = _tmp_sibling(target, "old")
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)


# --------------------------------------------------------------------------------------------- results
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
    k = key.replace("\\", "/").strip("/")
    parts = [p for p in k.split("/") if p != ""]
    if not parts or any(p in (".", "..") for p in parts):
        raise StorageError(f"invalid artifact key {key!r}: use a relative 'a/b/c' path without '..'")
    return "/".join(parts)


# --------------------------------------------------------------------------------------------- interface
class ArtifactStore(ABC):
    """One interface over a local folder and an S3 prefix. See the module docstring for the guarantees."""

    root_uri: str

    # --- addressing
    @abstractmethod
    def uri(self, key: str) -> str:
        """Absolute URI of a key (``file:///...`` or ``s3://bucket/...``)."""

    def local_path(self, key: str) -> Path | None:
        """The key's path on local disk when the store is local (no copy needed), else None."""
        return None

    # --- writes (atomic)
    @abstractmethod
    def put_file(self, local_path: str | os.PathLike[str], key: str) -> PutResult: ...

    @abstractmethod
    def put_dir(self, local_dir: str | os.PathLike[str], key_prefix: str) -> PutResult: ...

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> PutResult: ...

    # --- reads
    @abstractmethod
    def get_file(self, key: str, local_path: str | os.PathLike[str]) -> Path: ...

    @abstractmethod
    def get_dir(self, key_prefix: str, local_dir: str | os.PathLike[str], *, verify: bool = True) -> Path:
        """Download a complete directory artifact (marker excluded) to ``local_dir``, which is REPLACED as a
        whole (download into a temp folder beside it, then rename). With verify, every file's sha256 is checked
        against the marker while copying (:class:`CorruptArtifact` on mismatch; ``local_dir`` is then left as
        it was). Raises :class:`ArtifactMissing` for an absent or incomplete prefix."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    # --- queries
    @abstractmethod
    def exists(self, key: str) -> bool:
        """True for a present file key or a directory prefix whose ``_COMPLETE`` marker is present."""

    @abstractmethod
    def is_dir(self, key: str) -> bool:
        """True when key is a COMPLETE directory artifact."""

    @abstractmethod
    def dir_listing(self, key_prefix: str) -> DirListing | None:
        """The marker's per-file table of a complete directory artifact, else None."""

    @abstractmethod
    def list_keys(self, prefix: str = "") -> list[str]:
        """All object keys at or under prefix (markers included, temp files excluded), sorted."""

    @abstractmethod
    def stat(self, key: str) -> dict[str, Any] | None:
        """Cheap facts about a file key: {"size": int, "sha256": str | None}; None if absent."""

    # --- deletion
    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete the key itself and everything under ``prefix/``; returns how many objects/files went."""

    # --- integrity
    def compute_sha256(self, key: str) -> tuple[str, int] | None:
        """Recompute (sha256, size_bytes) of an artifact from its actual bytes; None if absent.

        For a directory this rehashes every file currently under the prefix (extra or missing files change the
        digest). Reads everything: on S3 this downloads the artifact (streamed, not kept)."""
        if self.is_dir(key):
            entries: list[tuple[str, str]] = []
            total = 0
            for rel in self._dir_files(key):
                sha, n = self._hash_object(f"{normalize_key(key)}/{rel}")
                entries.append((rel, sha))
                total += n
            return dir_digest(entries), total
        if self.exists(key):
            return self._hash_object(normalize_key(key))
        return None

    @abstractmethod
    def _hash_object(self, key: str) -> tuple[str, int]: ...

    @abstractmethod
    def dir_sizes(self, key_prefix: str) -> dict[str, int]:
        """{relpath: size} of the files currently under a directory prefix (marker and temp files excluded);
        one LIST call on S3 -- the cheap half of a shallow integrity check."""

    @abstractmethod
    def _dir_files(self, key_prefix: str) -> list[str]:
        """Relpaths of the files currently under a directory artifact (marker and temp files excluded)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root_uri!r})"


# --------------------------------------------------------------------------------------------- local
class LocalStore(ArtifactStore):
    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().resolve()
        self.root_uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / normalize_key(key)

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    # writes
    def put_file(self, local_path: str | os.PathLike[str], key: str) -> PutResult:
        key = normalize_key(key)
        dst = self._path(key)
        if dst.is_dir():
            raise StorageError(f"cannot write file {self.uri(key)}: a directory artifact is there")
        sha, n = _atomic_copy_local(Path(local_path), dst)
        return PutResult(key, self.uri(key), "file", sha, n)

    def write_bytes(self, key: str, data: bytes) -> PutResult:
        key = normalize_key(key)
        dst = self._path(key)
        if dst.is_dir():
            raise StorageError(f"cannot write file {self.uri(key)}: a directory artifact is there")
        _atomic_write_local(bytes(data), dst)
        return PutResult(key, self.uri(key), "file", sha256_bytes(data), len(data))

    def put_dir(self, local_dir: str | os.PathLike[str], key_prefix: str) -> PutResult:
        key = normalize_key(key_prefix)
        src = Path(local_dir)
        if not src.is_dir():
            raise StorageError(f"put_dir: {src} is not a directory")
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_sibling(target)
        listing = DirListing()
        try:
            tmp.mkdir()
            for rel, p in _iter_local_files(src):
                out = tmp / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with open(p, "rb") as fin, open(out, "wb") as fout:
                    sha, n = _copy_hashing(fin, fout)
                    fout.flush()
                    os.fsync(fout.fileno())
                listing.files[rel] = {"sha256": sha, "size": n}
            (tmp / COMPLETE_MARKER).write_bytes(listing.to_marker())
            _swap_dir_into_place(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return PutResult(key, self.uri(key), "dir", listing.sha256, listing.size_bytes, len(listing.files))

    # reads
    def get_file(self, key: str, local_path: str | os.PathLike[str]) -> Path:
        src = self._path(key)
        if not src.is_file():
            raise ArtifactMissing(f"artifact not found: {self.uri(key)}")
        dst = Path(local_path)
        _atomic_copy_local(src, dst)
        return dst

    def read_bytes(self, key: str) -> bytes:
        src = self._path(key)
        if not src.is_file():
            raise ArtifactMissing(f"artifact not found: {self.uri(key)}")
        return src.read_bytes()

    def get_dir(self, key_prefix: str, local_dir: str | os.PathLike[str], *, verify: bool = True) -> Path:
        key = normalize_key(key_prefix)
        listing = self.dir_listing(key)
        if listing is None:
            raise ArtifactMissing(f"directory artifact not found or incomplete (no {COMPLETE_MARKER}): {self.uri(key)}")
        src = self._path(key)
        dst = Path(local_dir).expanduser().resolve()
        if dst == src:
            return dst
        tmp = _tmp_sibling(dst)
        try:
            tmp.mkdir(parents=True)
            for rel, meta in listing.files.items():
                out = tmp / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                try:
                    fin = open(src / rel, "rb")
                except FileNotFoundError:
                    raise CorruptArtifact(f"{self.uri(key)}: file {rel!r} listed in {COMPLETE_MARKER} is missing") from None
                with fin, open(out, "wb") as fout:
                    sha, _ = _copy_hashing(fin, fout)
                if verify and sha != meta["sha256"]:
                    raise CorruptArtifact(f"{self.uri(key)}: sha256 mismatch for {rel!r} (expected {meta['sha256'][:12]}, got {sha[:12]})")
            _swap_dir_into_place(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dst

    # queries
    def exists(self, key: str) -> bool:
        p = self._path(key)
        if p.is_file():
            return True
        return p.is_dir() and (p / COMPLETE_MARKER).is_file()

    def is_dir(self, key: str) -> bool:
        p = self._path(key)
        return p.is_dir() and (p / COMPLETE_MARKER).is_file()

    def dir_listing(self, key_prefix: str) -> DirListing | None:
        marker = self._path(key_prefix) / COMPLETE_MARKER
        try:
            return DirListing.from_marker(marker.read_bytes())
        except FileNotFoundError:
            return None
        except (ValueError, AttributeError) as e:
            log.warning("unreadable %s at %s: %s", COMPLETE_MARKER, marker, e)
            return None

    def list_keys(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix.strip("/") else self.root
        if base.is_file():
            return [normalize_key(prefix)]
        if not base.is_dir():
            return []
        out = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if not _is_tmp_name(d))
            for name in filenames:
                if _is_tmp_name(name):
                    continue
                out.append((Path(dirpath) / name).relative_to(self.root).as_posix())
        return sorted(out)

    def stat(self, key: str) -> dict[str, Any] | None:
        p = self._path(key)
        if not p.is_file():
            return None
        return {"size": p.stat().st_size, "sha256": None}

    def delete_prefix(self, prefix: str) -> int:
        p = self._path(prefix)
        if p.is_dir() and not p.is_symlink():
            n = sum(len(files) for _, _, files in os.walk(p))
            # remove the marker first: a concurrent reader then sees "absent", never a half-deleted artifact
            (p / COMPLETE_MARKER).unlink(missing_ok=True)
            shutil.rmtree(p)
            return n
        if p.exists() or p.is_symlink():
            p.unlink()
            return 1
        return 0

    # integrity helpers
    def _hash_object(self, key: str) -> tuple[str, int]:
        p = self._path(key)
        return sha256_file(p), p.stat().st_size

    def dir_sizes(self, key_prefix: str) -> dict[str, int]:
        root = self._path(key_prefix)
        return {rel: (root / rel).stat().st_size for rel in self._dir_files(key_prefix)} if root.is_dir() else {}

    def _dir_files(self, key_prefix: str) -> list[str]:
        root = self._path(key_prefix)
        return [rel for rel, _ in _iter_local_files(root) if not any(_is_tmp_name(part) for part in rel.split("/"))]


# --------------------------------------------------------------------------------------------- S3
def resolve_s3_endpoint(endpoint_url: str | None = None) -> str | None:
    """Explicit endpoint, else ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``, else None (AWS)."""
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def make_s3_client(
    endpoint_url: str | None = None,
    region: str | None = None,
    *,
    connect_timeout: float = 10.0,
    read_timeout: float = 120.0,
    max_attempts: int = 5,
):
    """A boto3 S3 client: standard credential chain, endpoint per :func:`resolve_s3_endpoint`, path-style
    addressing for custom endpoints (MinIO, moto, Ceph). ``max_attempts=1`` disables retries."""
    import boto3
    from botocore.config import Config

    endpoint = resolve_s3_endpoint(endpoint_url)
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
    cfg = Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"total_max_attempts": max(1, int(max_attempts)), "mode": "standard"},
        s3={"addressing_style": "path"} if endpoint else None,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=cfg)


def _is_not_found(err: Exception) -> bool:
    resp = getattr(err, "response", None) or {}
    code = str(resp.get("Error", {}).get("Code", ""))
    status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket") or status == 404


class _HashingReader:
    """File-like wrapper that hashes what boto3 reads (used to hash S3 downloads in one pass)."""

    def __init__(self, body):
        self._body = body
        self.h = hashlib.sha256()
        self.n = 0

    def read(self, size: int = -1) -> bytes:
        data = self._body.read(size) if size is not None and size >= 0 else self._body.read()
        self.h.update(data)
        self.n += len(data)
        return data


class S3Store(ArtifactStore):
    def __init__(
        self,
        uri: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        client=None,
    ):
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise StorageError(f"not an S3 URI: {uri!r} (expected s3://bucket/prefix)")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.endpoint_url = resolve_s3_endpoint(endpoint_url)
        self.region = region
        self.root_uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self._client = client

    @property
    def client(self):
        if self._client is None:
            self._client = make_s3_client(self.endpoint_url, self.region)
        return self._client

    def _obj(self, key: str) -> str:
        k = normalize_key(key)
        return f"{self.prefix}/{k}" if self.prefix else k

    def _rel(self, obj_key: str) -> str:
        return obj_key[len(self.prefix) + 1 :] if self.prefix else obj_key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._obj(key)}"

    def _where(self) -> str:
        return f" (endpoint {self.endpoint_url})" if self.endpoint_url else ""

    def _wrap(self, what: str, key: str, err: Exception) -> StorageError:
        if _is_not_found(err):
            return ArtifactMissing(f"artifact not found: {self.uri(key)}{self._where()}")
        return StorageError(f"S3 {what} failed for {self.uri(key)}{self._where()}: {err}".replace("\n", " "))

    def _head(self, obj_key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=obj_key)
        except ClientError as e:
            if _is_not_found(e):
                return None
            raise StorageError(f"S3 HEAD failed for s3://{self.bucket}/{obj_key}{self._where()}: {e}") from e

    def _list(self, obj_prefix: str) -> Iterator[dict[str, Any]]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=obj_prefix):
            yield from page.get("Contents", []) or []

    def _delete_objects(self, obj_keys: list[str]) -> None:
        for i in range(0, len(obj_keys), 1000):
            batch = [{"Key": k} for k in obj_keys[i : i + 1000]]
            if batch:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    # writes
    def _upload(self, local: Path, obj_key: str) -> tuple[str, int]:
        sha = sha256_file(local)
        size = local.stat().st_size
        self.client.upload_file(str(local), self.bucket, obj_key, ExtraArgs={"Metadata": {"sha256": sha}})
        return sha, size

    def put_file(self, local_path: str | os.PathLike[str], key: str) -> PutResult:
        key = normalize_key(key)
        try:
            sha, n = self._upload(Path(local_path), self._obj(key))
        except (OSError, StorageError):  # local file problems stay what they are
            raise
        except Exception as e:  # botocore / boto3 transfer errors
            raise self._wrap("upload", key, e) from e
        return PutResult(key, self.uri(key), "file", sha, n)

    def write_bytes(self, key: str, data: bytes) -> PutResult:
        key = normalize_key(key)
        data = bytes(data)
        sha = sha256_bytes(data)
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._obj(key), Body=data, Metadata={"sha256": sha})
        except Exception as e:
            raise self._wrap("PUT", key, e) from e
        return PutResult(key, self.uri(key), "file", sha, len(data))

    def put_dir(self, local_dir: str | os.PathLike[str], key_prefix: str) -> PutResult:
        key = normalize_key(key_prefix)
        src = Path(local_dir)
        if not src.is_dir():
            raise StorageError(f"put_dir: {src} is not a directory")
        base = self._obj(key)
        marker = f"{base}/{COMPLETE_MARKER}"
        listing = DirListing()
        try:
            # 1. retract the old marker: from here until step 4 readers see "absent"
            self.client.delete_object(Bucket=self.bucket, Key=marker)
            # 2. objects under their final keys
            for rel, p in _iter_local_files(src):
                sha, n = self._upload(p, f"{base}/{rel}")
                listing.files[rel] = {"sha256": sha, "size": n}
            # 3. drop stale objects of an earlier version of this artifact
            wanted = {f"{base}/{rel}" for rel in listing.files}
            stale = [o["Key"] for o in self._list(base + "/") if o["Key"] not in wanted and o["Key"] != marker]
            self._delete_objects(stale)
            # 4. marker LAST
            self.client.put_object(Bucket=self.bucket, Key=marker, Body=listing.to_marker(), ContentType="application/json")
        except StorageError:
            raise
        except Exception as e:
            raise self._wrap("directory upload", key, e) from e
        return PutResult(key, self.uri(key), "dir", listing.sha256, listing.size_bytes, len(listing.files))

    # reads
    def _download(self, obj_key: str, dst: Path, expect_sha: str | None, what: str) -> tuple[str, int]:
        from botocore.exceptions import ClientError

        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_sibling(dst)
        try:
            try:
                resp = self.client.get_object(Bucket=self.bucket, Key=obj_key)
            except ClientError as e:
                raise self._wrap("GET", self._rel(obj_key), e) from e
            reader = _HashingReader(resp["Body"])
            with open(tmp, "wb") as f:
                for chunk in iter(lambda: reader.read(CHUNK), b""):
                    f.write(chunk)
            sha = reader.h.hexdigest()
            if expect_sha is not None and sha != expect_sha:
                raise CorruptArtifact(f"{what}: sha256 mismatch for s3://{self.bucket}/{obj_key} (expected {expect_sha[:12]}, got {sha[:12]})")
            os.replace(tmp, dst)
            return sha, reader.n
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def get_file(self, key: str, local_path: str | os.PathLike[str]) -> Path:
        dst = Path(local_path)
        self._download(self._obj(key), dst, None, self.uri(key))
        return dst

    def read_bytes(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._obj(key))["Body"].read()
        except ClientError as e:
            raise self._wrap("GET", key, e) from e

    def get_dir(self, key_prefix: str, local_dir: str | os.PathLike[str], *, verify: bool = True) -> Path:
        key = normalize_key(key_prefix)
        listing = self.dir_listing(key)
        if listing is None:
            raise ArtifactMissing(f"directory artifact not found or incomplete (no {COMPLETE_MARKER}): {self.uri(key)}{self._where()}")
        dst = Path(local_dir).expanduser().resolve()
        tmp = _tmp_sibling(dst)
        base = self._obj(key)
        try:
            tmp.mkdir(parents=True)
            for rel, meta in listing.files.items():
                try:
                    self._download(f"{base}/{rel}", tmp / rel, meta["sha256"] if verify else None, self.uri(key))
                except ArtifactMissing:
                    raise CorruptArtifact(f"{self.uri(key)}: file {rel!r} listed in {COMPLETE_MARKER} is missing") from None
            _swap_dir_into_place(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dst

    # queries
    def exists(self, key: str) -> bool:
        obj = self._obj(key)
        return self._head(obj) is not None or self._head(f"{obj}/{COMPLETE_MARKER}") is not None

    def is_dir(self, key: str) -> bool:
        return self._head(f"{self._obj(key)}/{COMPLETE_MARKER}") is not None

    def dir_listing(self, key_prefix: str) -> DirListing | None:
        from botocore.exceptions import ClientError

        marker = f"{self._obj(key_prefix)}/{COMPLETE_MARKER}"
        try:
            data = self.client.get_object(Bucket=self.bucket, Key=marker)["Body"].read()
        except ClientError as e:
            if _is_not_found(e):
                return None
            raise self._wrap("GET", self._rel(marker), e) from e
        try:
            return DirListing.from_marker(data)
        except (ValueError, AttributeError) as e:
            log.warning("unreadable %s at s3://%s/%s: %s", COMPLETE_MARKER, self.bucket, marker, e)
            return None

    def list_keys(self, prefix: str = "") -> list[str]:
        if prefix.strip("/"):
            obj = self._obj(prefix)
            out = [self._rel(o["Key"]) for o in self._list(obj + "/")]
            if self._head(obj) is not None:
                out.append(self._rel(obj))
            return sorted(out)
        base = f"{self.prefix}/" if self.prefix else ""
        return sorted(self._rel(o["Key"]) for o in self._list(base))

    def stat(self, key: str) -> dict[str, Any] | None:
        head = self._head(self._obj(key))
        if head is None:
            return None
        return {"size": int(head.get("ContentLength", 0)), "sha256": (head.get("Metadata") or {}).get("sha256")}

    def delete_prefix(self, prefix: str) -> int:
        obj = self._obj(prefix)
        marker = f"{obj}/{COMPLETE_MARKER}"
        keys = [o["Key"] for o in self._list(obj + "/")]
        if self._head(obj) is not None:
            keys.append(obj)
        # marker first, so the artifact reads as absent while the rest is deleted
        if marker in keys:
            self.client.delete_object(Bucket=self.bucket, Key=marker)
            keys.remove(marker)
            n = 1
        else:
            n = 0
        self._delete_objects(keys)
        return n + len(keys)

    # integrity helpers
    def _hash_object(self, key: str) -> tuple[str, int]:
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._obj(key))["Body"]
        except ClientError as e:
            raise self._wrap("GET", key, e) from e
        reader = _HashingReader(body)
        for _ in iter(lambda: reader.read(CHUNK), b""):
            pass
        return reader.h.hexdigest(), reader.n

    def dir_sizes(self, key_prefix: str) -> dict[str, int]:
        base = self._obj(key_prefix) + "/"
        return {o["Key"][len(base):]: int(o.get("Size", 0)) for o in self._list(base) if o["Key"] != base + COMPLETE_MARKER}

    def _dir_files(self, key_prefix: str) -> list[str]:
        base = self._obj(key_prefix) + "/"
        return sorted(o["Key"][len(base) :] for o in self._list(base) if o["Key"] != base + COMPLETE_MARKER)


# --------------------------------------------------------------------------------------------- factory
def open_store(
    uri: str | os.PathLike[str] | None = None,
    *,
    workdir: str | os.PathLike[str] = ".dlp-work",
    endpoint_url: str | None = None,
    region: str | None = None,
) -> ArtifactStore:
    """Open the artifact store named by ``uri`` (see module docstring); None -> ``<workdir>/artifacts``.

    A relative plain path is resolved against the current directory (not the workdir)."""
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

