"""Preflight checks: run them BEFORE any expensive stage, so a wrong endpoint fails in seconds, not after an
hour of calibration.

Each check returns a one-line "ok" description or raises :class:`PreflightError` whose message is one line
naming what is wrong and the setting / environment variable that fixes it.

- :func:`check_workdir`       -- the work folder exists (or can be created) and is writable
- :func:`check_s3`            -- endpoint reachable and bucket accessible (``head_bucket``, short connect
                                 timeout, no retries)
- :func:`check_tracking_uri`  -- MLflow: http(s) server answers ``/health`` (or the REST API) quickly;
                                 SQLite: its folder is writable
- :func:`run_preflight`       -- all of the above for a :class:`pipeline.jobconfig.JobConfig`
"""

from __future__ import annotations

import errno
import ipaddress
import os
import shutil
import socket
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from pipeline.registry import default_artifact_location, resolve_tracking_uri, sqlite_path

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.jobconfig import JobConfig

__all__ = ["PreflightError", "check_disk_for_model", "check_s3", "check_tracking_uri", "check_workdir", "check_writable_dir", "run_preflight"]

DEFAULT_TIMEOUT = 3.0


class PreflightError(RuntimeError):
    """A precondition of the pipeline is not met. ``str()`` is one line with the fix."""


def _one_line(text: object, limit: int = 200) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


# ============================================================================================ folders
def check_writable_dir(path: str | os.PathLike[str], what: str = "folder", fix: str = "") -> str:
    p = Path(path).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".preflight-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        hint = f"; {fix}" if fix else ""
        raise PreflightError(f"{what} {p} is not writable ({e.strerror or _one_line(e)}){hint}") from None
    try:
        free_gb = shutil.disk_usage(p).free / 1e9
        return f"{what} {p.resolve()} writable ({free_gb:.1f} GB free)"
    except OSError:
        return f"{what} {p.resolve()} writable"


def check_workdir(path: str | os.PathLike[str]) -> str:
    return check_writable_dir(path, "workdir", "set `workdir:` in the job file to a writable folder")


# ============================================================================================ S3
def _endpoint_source(endpoint_url: str | None, setting: str) -> tuple[str | None, str]:
    """(endpoint, the setting that chose it) -- for error messages."""
    if endpoint_url:
        return endpoint_url, setting
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var], var
    return None, f"{setting} or AWS_ENDPOINT_URL_S3"


def _s3_failure(e: Exception, bucket: str, uri: str, where: str, source: str, aws: bool) -> str:
    """One line naming what failed and the fix; ``e`` is what s3fs raised (botocore's connection and
    credential errors pass through it, S3 error codes arrive as OSError subclasses)."""
    from botocore.exceptions import ConnectionError as EndpointError
    from botocore.exceptions import HTTPClientError, NoCredentialsError, PartialCredentialsError

    if isinstance(e, (EndpointError, HTTPClientError, TimeoutError)):
        return f"{where} is unreachable ({type(e).__name__}): check {source}" + (" if you use MinIO/Ceph/moto" if aws else "")
    if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
        return (f"no AWS credentials for s3://{bucket} at {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE)")
    if isinstance(e, FileNotFoundError):
        return f"S3 bucket '{bucket}' does not exist at {where}: create it or fix the bucket in {uri}"
    if isinstance(e, PermissionError):
        return (f"access to S3 bucket '{bucket}' at {where} denied ({_one_line(e)}): check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY and the bucket policy")
    if isinstance(e, OSError) and e.errno == errno.EREMCHG:
        return f"S3 bucket '{bucket}' is in another region ({_one_line(e)}): set AWS_DEFAULT_REGION"
    return f"S3 bucket '{bucket}' at {where} is not accessible: {_one_line(e)}; check {source}"


def check_s3(
    uri: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    setting: str = "storage.endpoint_url",
) -> str:
    """``head_bucket`` on the bucket of ``uri`` (s3://bucket/prefix) with a short timeout and no retries.

    ``setting`` names the job key that sets the endpoint (used in the error message)."""
    from pipeline.s3 import s3_filesystem

    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise PreflightError(f"not an S3 URI: {uri!r} (expected s3://bucket/prefix)")
    bucket = parsed.netloc
    endpoint, source = _endpoint_source(endpoint_url, setting)
    where = f"S3 endpoint {endpoint}" if endpoint else "AWS S3 (no custom endpoint)"
    try:
        s3_filesystem(endpoint, region, timeout=timeout, retries=1).call_s3("head_bucket", Bucket=bucket)
    except Exception as e:
        raise PreflightError(_s3_failure(e, bucket, uri, where, source, endpoint is None)) from None
    return f"S3 bucket s3://{bucket} reachable at {endpoint or 'AWS'}"


# ============================================================================================ MLflow
def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _http_get(url: str, timeout: float) -> int:
    req = urllib.request.Request(url, method="GET", headers={"User-Agent": "dlp-preflight"})
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    handlers: list[urllib.request.BaseHandler] = []
    if _is_loopback(urlparse(url).hostname):
        handlers.append(urllib.request.ProxyHandler({}))  # never send localhost through a proxy
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(req, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def check_tracking_uri(uri: str, *, timeout: float = DEFAULT_TIMEOUT) -> str:
    """MLflow tracking URI reachable: http(s) -> ``GET /health`` (falls back to the REST API) within
    ``timeout``; sqlite -> the database folder is writable; a plain path / file URI -> writable folder."""
    fix = "set MLFLOW_TRACKING_URI (or registry.tracking_uri in the job file)"
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        base = uri.rstrip("/")
        try:
            status = _http_get(base + "/health", timeout)
            if status == 404:
                status = _http_get(base + "/api/2.0/mlflow/experiments/search?max_results=1", timeout)
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise PreflightError(
                f"MLflow tracking server {uri} is unreachable ({_one_line(reason, 80)}): start it or {fix}"
            ) from None
        if status in (401, 403):
            raise PreflightError(
                f"MLflow tracking server {uri} refused access (HTTP {status}): set MLFLOW_TRACKING_USERNAME/"
                "MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"
            )
        if status >= 400:
            raise PreflightError(f"MLflow tracking server {uri} answered HTTP {status}: is it an MLflow server? {fix}")
        return f"MLflow tracking server {uri} reachable"
    if scheme.startswith("sqlite"):
        db = sqlite_path(uri)
        if db is None:
            raise PreflightError(f"unsupported SQLite tracking URI {uri!r}: use sqlite:////abs/path/mlflow.db; {fix}")
        if db.exists() and not os.access(db, os.W_OK):
            raise PreflightError(f"MLflow database {db} is not writable: fix its permissions or {fix}")
        check_writable_dir(db.parent, "MLflow database folder", fix)
        return f"MLflow tracking on SQLite {db}"
    if scheme in ("", "file"):
        root = Path(unquote(parsed.path) if scheme == "file" else uri)
        check_writable_dir(root, "MLflow tracking folder", fix)
        return f"MLflow tracking folder {root}"
    return f"MLflow tracking URI {uri} (scheme {scheme!r} not checked)"


# ============================================================================================ disk
def check_disk_for_model(job: "JobConfig", model_path: str, dtype: str) -> str:
    """Free disk in the work dir for what the block-by-block stages write: the pruned checkpoint (in the work dir,
    and once more in a local artifact store) and the journaled calibration states -- checked after fetch, before
    the first expensive stage."""
    import json

    from dlp.models import DTYPES, checkpoint_bytes, native_dtype_name
    from dlp.resources import human_size

    size = lambda name: DTYPES[name].itemsize  # noqa: E731
    out = checkpoint_bytes(model_path) * size(dtype) // size(native_dtype_name(model_path))
    hidden_size = int(json.loads((Path(model_path) / "config.json").read_text()).get("hidden_size") or 0)
    states = 2 * job.calibration.nsamples * job.calibration.seqlen * hidden_size * size(dtype)
    need = out * (1 if job.storage_uri.startswith("s3://") else 2) + states
    free = shutil.disk_usage(job.workdir_path if job.workdir_path.exists() else job.workdir_path.parent).free
    if free < need:
        raise PreflightError(f"work dir {job.workdir_path} has {human_size(free)} free but the pruned checkpoint and "
                             f"the calibration states need {human_size(need)}; free disk space or set workdir elsewhere")
    return f"disk: {human_size(free)} free in {job.workdir_path}, {human_size(need)} needed"


# ============================================================================================ all
def run_preflight(job: "JobConfig", *, timeout: float = DEFAULT_TIMEOUT, registry: bool = True, storage: bool = True) -> list[str]:
    """Run every check that applies to the job; returns the "ok" lines, raises :class:`PreflightError`."""
    ok = [check_workdir(job.workdir_path)]
    if storage:
        uri = job.storage_uri
        if uri.startswith("s3://"):
            ok.append(check_s3(uri, endpoint_url=job.storage.endpoint_url, region=job.storage.region, timeout=timeout))
        else:
            from pipeline.local import LocalStore
            from pipeline.store import open_store

            store = open_store(uri, workdir=job.workdir, endpoint_url=job.storage.endpoint_url)
            if isinstance(store, LocalStore):
                ok.append(check_writable_dir(store.root, "artifact store", "set storage.uri in the job file"))
    if registry:
        tracking = resolve_tracking_uri(job.registry.tracking_uri, job.workdir)
        ok.append(check_tracking_uri(tracking, timeout=timeout))
        loc = job.registry.artifact_location or default_artifact_location(tracking, job.workdir)
        if loc and loc.startswith("s3://"):
            ok.append(
                check_s3(
                    loc,
                    endpoint_url=os.environ.get("MLFLOW_S3_ENDPOINT_URL"),
                    timeout=timeout,
                    setting="MLFLOW_S3_ENDPOINT_URL",
                )
            )
    return ok
