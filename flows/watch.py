"""``watch-releases``: compress each new release of the watched models, exactly once.

For every entry of the watch config (``configs/watch.yaml``; schema in :class:`WatchEntry`):

1. ask the release source for the latest revision (hub: the branch's current commit sha; local folder: the
   newest snapshot sub-folder -- see :mod:`pipeline.releases`);
2. look in the MLflow registry for a version of the entry's registered model tagged with that revision
   (``dlp.base_revision``, written by the compress flow, or ``dlp.release_revision``, written here);
   found -> ``up-to-date``;
3. otherwise take the release lock -- an exclusive ``flock`` on ``<workdir>/locks/<hash>.lock``, non-blocking:
   when another run holds it the entry is reported ``in-progress`` and skipped -- and, when the Prefect
   global concurrency limit ``dlp-release-compression`` exists (``dlp deploy`` creates it), a slot of it
   (this one waits: it serializes compressions across machines that do not share the workdir); check the
   registry again, then run the compress flow (a subflow) with ``model.source`` / ``model.revision`` pinned
   to the release, tag the new version with the release, and optionally gate-promote and rebuild the report.

Twice in a row, or two runs at once, compress a release once. The compress call goes through
:func:`run_compress` so tests can substitute it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from pathlib import Path
from typing import Any, Iterator

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline import registry as reg
from pipeline.jobconfig import DEMO_JOB, JobError, derive_model_name, load_job, read_yaml
from pipeline.releases import Release, ReleaseError, make_source

__all__ = [
    "GLOBAL_LIMIT",
    "WatchConfig",
    "WatchEntry",
    "find_release_versions",
    "load_watch_config",
    "release_lock",
    "run_compress",
    "watch_releases",
]

GLOBAL_LIMIT = "dlp-release-compression"
RELEASE_TAG = "dlp.release_revision"
DEFAULT_CONFIG = "configs/watch.yaml"


# ============================================================================================ config
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WatchEntry(_Strict):
    name: str = Field(..., min_length=1)
    source: dict[str, Any]
    job: str | None = Field(None, description="job file; None: configs/demo.yaml (compress's default)")
    overrides: dict[str, Any] = Field(default_factory=dict)
    registered_name: str | None = None
    promote_gate: str | None = None
    report: bool = True
    enabled: bool = True

    @field_validator("source")
    @classmethod
    def _check_source(cls, v: dict[str, Any]) -> dict[str, Any]:
        make_source(v)  # raises ReleaseError (a ValueError) with a one-line message
        return v


class WatchConfig(_Strict):
    workdir: str = ".dlp-work"
    models: list[WatchEntry] = Field(default_factory=list)

    @field_validator("models")
    @classmethod
    def _unique(cls, v: list[WatchEntry]) -> list[WatchEntry]:
        names = [e.name for e in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate watch entry name(s): {', '.join(dup)}")
        return v


def load_watch_config(path: str | os.PathLike[str]) -> tuple[WatchConfig, Path]:
    """(config, config folder). JobError with one line on a missing/invalid file."""
    p = Path(path)
    data = read_yaml(p)  # JobError for missing file / bad YAML
    try:
        return WatchConfig.model_validate(data), p.resolve().parent
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = ".".join(str(x) for x in err.get("loc", ()))
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        raise JobError(f"watch config {p}: {loc + ': ' if loc else ''}{msg}") from None


def _job_path(job: str | None, config_dir: Path) -> str | None:
    if job is None:
        return None
    p = Path(job).expanduser()
    if p.is_absolute() or p.exists():
        return str(p)
    alt = config_dir / p
    return str(alt) if alt.exists() else str(p)


# ============================================================================================ hooks
def run_compress(job_file: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """Run the compress flow (as a subflow when called inside a flow). Tests replace this function."""
    from flows.compress import compress

    return compress(job_file=job_file, overrides=overrides)


# ============================================================================================ registry
def find_release_versions(client: Any, registered_name: str, revision: str) -> list[Any]:
    """Versions of ``registered_name`` tagged with ``revision`` as base or release revision."""
    try:
        client.get_registered_model(registered_name)
    except Exception:
        return []
    found: dict[str, Any] = {}
    for tag in ("dlp.base_revision", RELEASE_TAG):
        flt = f"name = {reg._quote(registered_name)} and tags.`{tag}` = {reg._quote(revision)}"
        try:
            hits = client.search_model_versions(flt)
        except Exception:  # a store without tag filters
            hits = [v for v in client.search_model_versions(f"name = {reg._quote(registered_name)}")
                    if (v.tags or {}).get(tag) == revision]
        for v in hits:
            if (v.tags or {}).get(tag) == revision:
                found[str(v.version)] = v
    return sorted(found.values(), key=lambda v: int(v.version))


# ============================================================================================ locks
@contextlib.contextmanager
def release_lock(lock_dir: str | os.PathLike[str], key: str) -> Iterator[bool]:
    """Exclusive non-blocking ``flock`` for one release; yields False when another holder has it. The lock
    dies with its process (no stale locks). Works between threads too (one open file description each)."""
    d = Path(lock_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{key}\npid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode())
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _global_slot(logger: Any) -> Iterator[None]:
    """A slot of the Prefect global concurrency limit GLOBAL_LIMIT when it exists on the server."""
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            client.read_global_concurrency_limit_by_name(GLOBAL_LIMIT)
        exists = True
    except Exception:
        exists = False
    if not exists:
        yield
        return
    from prefect.concurrency.sync import concurrency

    logger.info("waiting for a slot of the global concurrency limit %r", GLOBAL_LIMIT)
    with concurrency(GLOBAL_LIMIT, occupy=1, strict=False, lease_duration=600):
        yield


# ============================================================================================ tasks
@task(name="latest-release", cache_policy=NO_CACHE)
def latest_release(source: dict[str, Any]) -> Release | None:
    return make_source(source).latest()


def _plan(entry: WatchEntry, release: Release, config_dir: Path) -> tuple[str | None, dict[str, Any], str, str, str]:
    """(job file, overrides, registered name, tracking uri, job workdir) for compressing ``release``."""
    job_file = _job_path(entry.job, config_dir) if entry.job else str(DEMO_JOB)  # compress's default too
    name = entry.registered_name
    if name is None and job_file is not None:
        name = ((read_yaml(job_file).get("registry") or {}).get("model_name")) or None
    if name is None:
        name = derive_model_name(release.origin)
    overrides = {**entry.overrides, "model.source": release.source, "model.revision": release.revision,
                 "registry.model_name": name}
    job = load_job(job_file, overrides)  # validate now: a bad job is this entry's error, before any lock
    uri = reg.resolve_tracking_uri(job.registry.tracking_uri, job.workdir)
    return job_file, overrides, name, uri, job.workdir


def compress_release(entry_name: str, release: Release, job_file: str | None, overrides: dict[str, Any],
                     registered_name: str, tracking_uri: str, lock_dir: str) -> dict[str, Any]:
    """Lock, re-check, compress (the compress flow runs as a subflow of watch-releases), tag. Returns the
    entry's outcome."""
    logger = get_run_logger()
    base = {"name": entry_name, "registered_name": registered_name, "revision": release.revision,
            "source": release.source}
    key = f"{registered_name}|{release.kind}:{release.origin}|{release.revision}"
    with release_lock(lock_dir, key) as got:
        if not got:
            logger.info("%s: release %s is being compressed by another run; skipping", entry_name, release.revision)
            return {**base, "status": "in-progress"}
        with _global_slot(logger):
            client = reg.get_client(tracking_uri)
            existing = find_release_versions(client, registered_name, release.revision)
            if existing:
                return {**base, "status": "up-to-date", "version": str(existing[-1].version)}
            logger.info("%s: new release %s -> compressing into %s", entry_name, release.revision, registered_name)
            result = _call_compress(job_file, overrides)
            name = result.get("registered_name") or registered_name
            version = str(result.get("version"))
            tags = {RELEASE_TAG: release.revision, "dlp.release_source": f"{release.kind}:{release.origin}",
                    "dlp.watch_entry": entry_name}
            rid = reg._prefect_flow_run_id()
            if rid:
                tags["dlp.watch_flow_run_id"] = rid
            for k, v in tags.items():
                client.set_model_version_tag(name, version, k, v)
            return {**base, "registered_name": name, "status": "compressed", "version": version,
                    "pruned_ppl": result.get("pruned_ppl"), "achieved_sparsity": result.get("achieved_sparsity")}


def _call_compress(job_file: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    # module-global lookup at call time, so monkeypatching flows.watch.run_compress takes effect
    return globals()["run_compress"](job_file, overrides)


@task(name="after-compress", cache_policy=NO_CACHE)
def after_compress(entry: WatchEntry, outcome: dict[str, Any], tracking_uri: str, workdir: str) -> dict[str, Any]:
    """Optional gate promotion and report rebuild (failures here do not undo the compression)."""
    logger = get_run_logger()
    extra: dict[str, Any] = {}
    if entry.promote_gate:
        from pipeline.promotion import auto_promote

        res = auto_promote(outcome["registered_name"], entry.promote_gate, by="watch-releases",
                           tracking_uri=tracking_uri, workdir=workdir)
        extra["champion"] = res.version if res else None
        logger.info("%s: gate %s -> champion %s", entry.name, entry.promote_gate, extra["champion"])
    if entry.report:
        from pipeline.report import build_report

        rep = build_report(outcome["registered_name"], tracking_uri=tracking_uri, workdir=workdir)
        extra["report"] = rep["path"]
    return extra


# ============================================================================================ flow
@flow(name="watch-releases", log_prints=True)
def watch_releases(config: str = DEFAULT_CONFIG, only: list[str] | None = None, dry_run: bool = False,
                   fail_on_error: bool = True) -> list[dict[str, Any]]:
    """Compress new releases of the models in ``config``; returns one outcome per entry with ``status`` in
    compressed | up-to-date | in-progress | no-release | new (dry run) | disabled | error."""
    logger = get_run_logger()
    cfg, cfg_dir = load_watch_config(config)
    entries = cfg.models
    if only:
        unknown = sorted(set(only) - {e.name for e in entries})
        if unknown:
            raise JobError(f"watch config {config}: no entry named {', '.join(unknown)} "
                           f"(entries: {', '.join(e.name for e in entries) or 'none'})")
        entries = [e for e in entries if e.name in only]
    lock_dir = str(Path(cfg.workdir).expanduser().resolve() / "locks")
    outcomes: list[dict[str, Any]] = []
    for entry in entries:
        if not entry.enabled:
            outcomes.append({"name": entry.name, "status": "disabled"})
            continue
        try:
            release = latest_release(entry.source)
            if release is None:
                outcomes.append({"name": entry.name, "status": "no-release", "source": make_source(entry.source).describe()})
                continue
            job_file, overrides, name, uri, workdir = _plan(entry, release, cfg_dir)
            existing = find_release_versions(reg.get_client(uri), name, release.revision)
            base = {"name": entry.name, "registered_name": name, "revision": release.revision, "source": release.source}
            if existing:
                outcomes.append({**base, "status": "up-to-date", "version": str(existing[-1].version)})
                continue
            if dry_run:
                outcomes.append({**base, "status": "new"})
                continue
            outcome = compress_release(entry.name, release, job_file, overrides, name, uri, lock_dir)
            if outcome["status"] == "compressed":
                try:
                    outcome.update(after_compress(entry, outcome, uri, workdir))
                except Exception as e:  # promotion/report problems are reported, the release stays compressed
                    outcome["post_error"] = f"{type(e).__name__}: {e}"
                    logger.warning("%s: after-compress step failed: %s", entry.name, outcome["post_error"])
            outcomes.append(outcome)
        except (ReleaseError, JobError) as e:
            outcomes.append({"name": entry.name, "status": "error", "error": str(e)})
        except Exception as e:  # compression failure: keep going with the other entries
            outcomes.append({"name": entry.name, "status": "error", "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
        o = outcomes[-1]
        logger.info("%s: %s%s", entry.name, o["status"], f" ({o.get('revision', '')[:12]} v{o['version']})" if o.get("version") else "")
    errors = [o for o in outcomes if o["status"] == "error"]
    for o in errors:
        logger.error("%s: %s", o["name"], o["error"])
    if errors and fail_on_error:
        raise RuntimeError(f"{len(errors)} of {len(outcomes)} watched model(s) failed: "
                           + "; ".join(f"{o['name']}: {o['error']}" for o in errors))
    return outcomes


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(yaml.safe_dump(watch_releases(*(sys.argv[1:2] or [DEFAULT_CONFIG]))))
