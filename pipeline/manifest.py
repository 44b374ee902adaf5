"""Stage manifests: what a stage produced, written LAST, checked before a cached result is trusted.

A stage task writes its artifact with :mod:`pipeline.store` (``put_file`` / ``put_dir`` / ``write_bytes``), then
``write_manifest(store, manifest_key(artifact_key), Manifest.from_put(...))``. A later run that hits the
cache calls :func:`load_verified` (or :func:`verify`): a manifest whose artifact is missing or whose bytes no
longer match the recorded sha256 is rejected with a warning, so the stage recomputes.

The manifest is stored beside the artifact (``<key>.manifest.json``), never inside a directory artifact, so it
does not take part in the directory's sha256.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.store import COMPLETE_MARKER, ArtifactStore, PutResult, StorageError, normalize_key

log = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".manifest.json"

__all__ = [
    "MANIFEST_SUFFIX",
    "Manifest",
    "load_verified",
    "manifest_key",
    "read_manifest",
    "verify",
    "write_manifest",
]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Manifest(BaseModel):
    """Record of one stage output.

    ``sha256`` is the artifact's digest: a file's sha256, or for a directory
    :func:`pipeline.store.dir_digest` over the sorted (relpath, file sha256) pairs.
    ``figures`` holds the stage's key numbers (e.g. ``{"ppl": 22.8}``, per-block sparsity) -- JSON values only.
    """

    model_config = ConfigDict(extra="ignore")  # tolerate fields added by newer versions

    format: int = 1
    stage: str
    key: str = Field(description="store key of the artifact")
    uri: str = Field(description="absolute URI of the artifact (file:///... or s3://...)")
    kind: Literal["file", "dir"] = "file"
    sha256: str
    size_bytes: int = 0
    files: int = 1
    created: str = Field(default_factory=_now)
    figures: dict[str, Any] = Field(default_factory=dict)
    cache_key: str = ""

    # -- construction
    @classmethod
    def from_put(
        cls,
        stage: str,
        put: PutResult,
        *,
        cache_key: str = "",
        figures: dict[str, Any] | None = None,
    ) -> "Manifest":
        return cls(
            stage=stage,
            key=put.key,
            uri=put.uri,
            kind=put.kind,
            sha256=put.sha256,
            size_bytes=put.size_bytes,
            files=put.files,
            figures=dict(figures or {}),
            cache_key=cache_key,
        )

    # -- (de)serialisation
    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Manifest":
        return cls.model_validate_json(text)


def manifest_key(artifact_key: str) -> str:
    """Conventional manifest location for an artifact: ``<artifact_key>.manifest.json``."""
    return normalize_key(artifact_key) + MANIFEST_SUFFIX


def write_manifest(store: ArtifactStore, key: str, manifest: Manifest) -> str:
    """Write the manifest (atomically) -- call it AFTER the artifact is fully written. Returns its URI."""
    store.write_bytes(key, manifest.to_json().encode())
    return store.uri(key)


def read_manifest(store: ArtifactStore, key: str) -> Manifest | None:
    """The manifest at key, or None when absent or unreadable (unreadable -> warning)."""
    try:
        if not store.exists(key):
            return None
        return Manifest.from_json(store.read_bytes(key))
    except (ValidationError, ValueError) as e:
        log.warning("ignoring unreadable manifest %s: %s", store.uri(key), str(e).splitlines()[0])
        return None
    except StorageError as e:
        log.warning("cannot read manifest %s: %s", store.uri(key), e)
        return None


def verify(store: ArtifactStore, manifest: Manifest, *, deep: bool | None = None) -> bool:
    """True when the manifest's artifact is present and its sha256 matches; otherwise False with a warning.

    ``deep=True`` rehashes the actual bytes (a directory: every file under the prefix). ``deep=False`` trusts
    cheap metadata: a directory's ``_COMPLETE`` table (its digest must match, and the files present must have
    the recorded names and sizes -- one LIST on S3) or a file's size and S3 ``sha256`` metadata. Default: deep for local stores (cheap), shallow for remote ones (a deep check
    downloads the whole artifact -- several GB for a 7B checkpoint).
    """
    if deep is None:
        deep = store.local_path(manifest.key) is not None
    where = store.uri(manifest.key)
    try:
        if manifest.kind == "dir":
            listing = store.dir_listing(manifest.key)
            if listing is None:
                return _fail(manifest, f"directory artifact {where} is missing or incomplete")
            if listing.sha256 != manifest.sha256:
                return _fail(manifest, f"{where}: recorded digest {listing.sha256[:12]} != manifest {manifest.sha256[:12]}")
            expected = {rel: int(meta["size"]) for rel, meta in listing.files.items()}
            actual = store.dir_sizes(manifest.key)
            if actual != expected:
                missing = sorted(set(expected) - set(actual))
                extra = sorted(set(actual) - set(expected))
                changed = sorted(k for k in set(expected) & set(actual) if expected[k] != actual[k])
                what = "; ".join(
                    f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                    for label, items in (("missing", missing), ("unexpected", extra), ("size changed", changed))
                    if items
                )
                return _fail(manifest, f"{where}: files differ from its {COMPLETE_MARKER} table ({what})")
            if deep:
                got = store.compute_sha256(manifest.key)
                if got is None:
                    return _fail(manifest, f"directory artifact {where} vanished")
                if got[0] != manifest.sha256:
                    return _fail(manifest, f"{where}: content sha256 {got[0][:12]} != manifest {manifest.sha256[:12]} (corrupted)")
            return True
        st = store.stat(manifest.key)
        if st is None:
            return _fail(manifest, f"artifact {where} is missing")
        if manifest.size_bytes and st["size"] != manifest.size_bytes:
            return _fail(manifest, f"{where}: size {st['size']} != manifest {manifest.size_bytes} (corrupted)")
        if deep or st.get("sha256") is None:
            got = store.compute_sha256(manifest.key)
            if got is None:
                return _fail(manifest, f"artifact {where} vanished")
            sha = got[0]
        else:
            sha = st["sha256"]
        if sha != manifest.sha256:
            return _fail(manifest, f"{where}: sha256 {sha[:12]} != manifest {manifest.sha256[:12]} (corrupted)")
        return True
    except StorageError as e:
        return _fail(manifest, f"{where}: {e}")


def _fail(manifest: Manifest, why: str) -> bool:
    log.warning("stage %r: cached result rejected, will recompute: %s", manifest.stage, why)
    return False


def load_verified(store: ArtifactStore, key: str, *, deep: bool | None = None, cache_key: str | None = None) -> Manifest | None:
    """Read the manifest at key and :func:`verify` it; None (after a warning) means "recompute".

    With ``cache_key`` given, a manifest recorded under another cache key is also rejected."""
    m = read_manifest(store, key)
    if m is None:
        return None
    if cache_key is not None and m.cache_key != cache_key:
        log.warning("stage %r: manifest %s has cache key %s, expected %s; recomputing", m.stage, store.uri(key), m.cache_key[:12], cache_key[:12])
        return None
    return m if verify(store, m, deep=deep) else None
