"""The S3 place of the artifact store: an S3 prefix through s3fs, on AWS or any S3 endpoint (MinIO, Ceph, moto).

Everything but how one object is written and where its sha256 is recorded is :class:`pipeline.store.ArtifactStore`.
Listings are never cached (``use_listings_cache=False``): another process sharing the bucket may have written
since the last look.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.digests import sha256_bytes, sha256_file
from pipeline.store import ArtifactStore, StorageError

__all__ = ["S3Store", "resolve_s3_endpoint", "s3_filesystem"]


def resolve_s3_endpoint(endpoint_url: str | None = None) -> str | None:
    """Explicit endpoint, else ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``, else None (AWS)."""
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_filesystem(endpoint_url: str | None = None, region: str | None = None, *,
                  timeout: float | None = None, retries: int | None = None) -> Any:
    """An s3fs filesystem: standard credential chain, endpoint per :func:`resolve_s3_endpoint`, path-style
    addressing for custom endpoints, no listings cache. ``timeout``/``retries`` give a private instance (the
    preflight check: short timeouts, ``retries=1`` for none)."""
    from s3fs import S3FileSystem

    endpoint = resolve_s3_endpoint(endpoint_url)
    config: dict[str, Any] = {"s3": {"addressing_style": "path"}} if endpoint else {}
    if timeout is not None:
        config.update(connect_timeout=timeout, read_timeout=timeout)
    if retries is not None:
        config["retries"] = {"total_max_attempts": max(1, retries), "mode": "standard"}
    fs = S3FileSystem(endpoint_url=endpoint, client_kwargs={"region_name": region} if region else {},
                      config_kwargs=config, use_listings_cache=False,
                      skip_instance_cache=timeout is not None or retries is not None)
    if retries is not None:
        fs.retries = max(1, retries)
    return fs


class S3Store(ArtifactStore):
    """An S3 prefix (s3fs), on AWS or any S3 endpoint (MinIO, Ceph, moto)."""

    def __init__(self, uri: str, *, endpoint_url: str | None = None, region: str | None = None):
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise StorageError(f"not an S3 URI: {uri!r} (expected s3://bucket/prefix)")
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        self.endpoint_url = resolve_s3_endpoint(endpoint_url)
        self.region = region
        base = f"{self.bucket}/{self.prefix}".rstrip("/")
        where = f" (endpoint {self.endpoint_url})" if self.endpoint_url else ""
        super().__init__(s3_filesystem(self.endpoint_url, region), base, f"s3://{base}", where)

    def _put_one(self, src: Path | bytes, path: str) -> tuple[str, int]:
        """Hash first, then one upload that carries the sha256 as metadata (s3fs aborts a failed multipart)."""
        if isinstance(src, bytes):
            sha, n = sha256_bytes(src), len(src)
            self.fs.pipe_file(path, src, Metadata={"sha256": sha})
        else:
            sha, n = sha256_file(src), src.stat().st_size
            self.fs.put_file(str(src), path, Metadata={"sha256": sha})
        return sha, n

    def _recorded_sha(self, path: str) -> str | None:
        return self.fs.metadata(path).get("sha256")
