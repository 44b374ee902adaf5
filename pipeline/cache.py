"""Cache keys, fingerprints and the stage plumbing shared by the pipeline tasks.

How a stage is cached (every stage module follows this):

1. Its **content key** is ``sha256`` of the canonical JSON of the stage's explicit ingredients (see each
   module's ``*_key`` function): content hashes of its inputs (model fingerprint, calibration-window
   fingerprint, upstream stage keys, per-block ratios), the stage's own parameters, and the code-version
   salt (:data:`CODE_SALT` + the stage's entry in :data:`STAGE_VERSIONS`). Never tensors, never ``hash()``,
   never machine-local paths -- the same job on another machine computes the same keys.
2. The **store** holds the artifact under ``<stage>/<key>/...`` and, written LAST, its manifest
   (:mod:`pipeline.manifest`). :func:`run_cached` first looks for a *verified* manifest under the content key
   (artifact present, sha256 matches); only when there is none does the stage compute. This is the cache
   that survives a fresh ``PREFECT_HOME`` or a second machine that shares the bucket, and the check that
   catches a missing or corrupted artifact (warning, then recompute).
3. **Prefect does not cache**: every stage runs as a task run with ``cache_policy=NO_CACHE`` and returns
   at once, in a state named ``Cached``, when the store holds its verified manifest (:mod:`tasks.stage`).
   One cache, one key, one place to look: nothing in Prefect's database or result storage can hand out a
   manifest whose artifact is gone.

Test seams (environment variables, read at each call; never set them in production):

- ``DLP_PIPELINE_TRACE=<file>``: every stage appends ``<stage>:<event>`` lines (``start``, ``computed``,
  ``hit``, ...) -- tests count executions with it.
- ``DLP_PIPELINE_FAIL=<stage>[:<point>]``: raise :class:`InjectedFailure` at that point (default ``start``).
- ``DLP_PIPELINE_PAUSE=<stage>:<point>:<seconds>``: sleep there (lets a test SIGKILL a run mid-stage).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from pipeline.manifest import Manifest, load_verified, manifest_key, write_manifest
from pipeline.results import StageResult
from pipeline.store import ArtifactStore, CorruptArtifact, PutResult, StorageError, hash_dir, open_store, sha256_file

log = logging.getLogger("dlp.pipeline")

#: Bump when the meaning of a cached artifact changes for every stage (format, protocol).
CODE_SALT = "dlp-pipeline/1"
#: Bump a stage's entry when that stage computes something different from the same inputs.
STAGE_VERSIONS: dict[str, int] = {
    "fetch": 1,
    "calibration": 1,
    "statistics": 1,
    "rates": 1,
    # one candidate of the alpha search (pipeline.stages.rates.StoredCandidates); 2: keyed by the scorer (pruner,
    # mode, windows), per-window held-out losses kept
    "alpha-candidates": 2,
    "prune": 1,
    "recover": 1,
    "quantize": 1,
    "perplexity": 1,
    "zero_shot": 1,
    "evaluate": 1,
    "variant": 1,
    "register": 1,
}

__all__ = [
    "CODE_SALT",
    "STAGE_VERSIONS",
    "InjectedFailure",
    "StoreSpec",
    "canonical_json",
    "content_key",
    "file_set_fingerprint",
    "hook",
    "materialize",
    "run_cached",
    "stage_logger",
    "text_fingerprint",
    "tokenizer_fingerprint",
]


# ============================================================================================ keys
def _canon(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _canon(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canon(v) for v in obj]
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"non-finite number {obj!r} in a cache key")
        return obj
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if isinstance(obj, Path):
        raise TypeError("a path in a cache key would tie the cache to one machine; hash its content instead")
    raise TypeError(f"cannot put a {type(obj).__name__} in a cache key (use JSON values or a content hash)")


def canonical_json(obj: Any) -> str:
    """Sorted-key, whitespace-free JSON of JSON values (floats as Python's shortest exact repr)."""
    return json.dumps(_canon(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def content_key(stage: str, **ingredients: Any) -> str:
    """The content key of one stage: sha256 over the stage name, the code-version salt and the ingredients."""
    payload = {"stage": stage, "salt": CODE_SALT, "stage_version": STAGE_VERSIONS[stage], "in": ingredients}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


# ============================================================================================ fingerprints
def text_fingerprint(source: Any) -> str:
    """sha256 of a loaded :class:`dlp.data.TextSource` (kind + every item, length-prefixed)."""
    h = hashlib.sha256()
    h.update(f"{source.kind}\n{len(source.items)}\n".encode())
    for item in source.items:
        b = item.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "vocab.txt",
    "chat_template.jinja",
)


def file_set_fingerprint(folder: str | os.PathLike[str], names: Iterator[str] | tuple[str, ...]) -> str:
    """sha256 over (name, file sha256) of the given files that exist in folder (missing ones are skipped)."""
    root = Path(folder)
    h = hashlib.sha256()
    for name in sorted(names):
        p = root / name
        if p.is_file():
            h.update(f"{name}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def tokenizer_fingerprint(folder: str | os.PathLike[str]) -> str:
    """Content hash of a model folder's tokenizer files (the model fingerprint covers weights + config only)."""
    return file_set_fingerprint(folder, TOKENIZER_FILES)


# ============================================================================================ store spec
@dataclass(frozen=True)
class StoreSpec:
    """Everything a task needs to open the artifact store (JSON-able: it travels as a task parameter)."""

    uri: str
    workdir: str
    endpoint_url: str | None = None
    region: str | None = None

    def open(self) -> ArtifactStore:
        return open_store(self.uri, workdir=self.workdir, endpoint_url=self.endpoint_url, region=self.region)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, spec: "StoreSpec | Mapping[str, Any]") -> "StoreSpec":
        return spec if isinstance(spec, StoreSpec) else cls(**dict(spec))

    @property
    def scratch(self) -> Path:
        """Machine-local scratch folder (downloads from a remote store, temporary outputs)."""
        return Path(self.workdir).expanduser().resolve() / "cache"


# ============================================================================================ test seams
class InjectedFailure(RuntimeError):
    """Raised by the DLP_PIPELINE_FAIL test seam."""


def hook(stage: str, point: str) -> None:
    """Trace / fail / pause at a named point of a stage (see the module docstring; no-op unless set)."""
    trace = os.environ.get("DLP_PIPELINE_TRACE")
    if trace:
        with open(trace, "a", encoding="utf-8") as f:
            f.write(f"{stage}:{point}\n")
            f.flush()
            os.fsync(f.fileno())
    fail = os.environ.get("DLP_PIPELINE_FAIL")
    if fail:
        f_stage, _, f_point = fail.partition(":")
        if f_stage == stage and (f_point or "start") == point:
            raise InjectedFailure(f"injected failure in stage {stage!r} at {point!r} (DLP_PIPELINE_FAIL)")
    pause = os.environ.get("DLP_PIPELINE_PAUSE")
    if pause:
        parts = pause.split(":")
        if len(parts) == 3 and parts[0] == stage and parts[1] == point:
            time.sleep(float(parts[2]))


# ============================================================================================ logging
def stage_logger(stage: str) -> logging.LoggerAdapter | logging.Logger:
    """Prefect's run logger inside a task/flow run (shows in the UI and on stderr), else ``dlp.pipeline``."""
    try:
        from prefect.exceptions import MissingContextError
        from prefect.logging import get_run_logger

        try:
            return get_run_logger()
        except MissingContextError:
            pass
    except ImportError:  # pragma: no cover
        pass
    return log


@contextmanager
def engine_progress(stage: str, every_s: float = 5.0) -> Iterator[None]:
    """Forward the calibration engine's per-block progress (logger ``dlp.engine``) to the stage's log (throttled)
    and to the test seams (``hook(stage, "block<i>")``, 0-based), while the stage runs."""
    logger = stage_logger(stage)
    last = [0.0]

    class _Bridge(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            block, total = getattr(record, "dlp_block", None), getattr(record, "dlp_blocks", None)
            if block is None:
                return
            hook(stage, f"block{block}")
            now = time.monotonic()
            if now - last[0] >= every_s or block == total - 1:
                last[0] = now
                logger.info("%s: block %d/%d", stage, block + 1, total)

    bridge = _Bridge()
    with _engine_log_scope() as engine_log:
        engine_log.addHandler(bridge)
        try:
            yield
        finally:
            engine_log.removeHandler(bridge)


_ENGINE_LOG_LOCK = threading.Lock()
_engine_log_users: list = [0, None]  # stages inside engine_progress, the logger's own (level, propagate)


@contextmanager
def _engine_log_scope() -> Iterator[logging.Logger]:
    """``dlp.engine`` at INFO and not propagated while any stage runs (stages of a sweep overlap on threads):
    the bridges say each block once, on the stage's log, instead of once more through the root logger."""
    engine_log = logging.getLogger("dlp.engine")
    with _ENGINE_LOG_LOCK:
        if _engine_log_users[0] == 0:
            _engine_log_users[1] = (engine_log.level, engine_log.propagate)
            engine_log.setLevel(logging.INFO)
            engine_log.propagate = False
        _engine_log_users[0] += 1
    try:
        yield engine_log
    finally:
        with _ENGINE_LOG_LOCK:
            _engine_log_users[0] -= 1
            if _engine_log_users[0] == 0:
                engine_log.setLevel(_engine_log_users[1][0])
                engine_log.propagate = _engine_log_users[1][1]


# ============================================================================================ running a stage
@contextmanager
def stage_lock(spec: StoreSpec, stage: str, key: str) -> Iterator[None]:
    """Exclusive lock on one stage key among the processes sharing a work dir (``<workdir>/locks/``).

    Two overlapping runs of the same job (a schedule and a manual run) then compute each stage once: the
    second waits, re-reads the manifest and is served from the store. Processes on other machines that share
    only an S3 store are not serialised; their writes are atomic and identical, so the last one wins."""
    import fcntl

    folder = Path(spec.workdir).expanduser() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{stage}-{key[:40]}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def run_cached(
    spec: StoreSpec | Mapping[str, Any],
    stage: str,
    key: str,
    artifact_key: str,
    compute: Callable[[ArtifactStore], tuple[PutResult, dict[str, Any]]],
) -> StageResult:
    """Return the stage's verified manifest from the store, or run ``compute(store)`` and record it.

    ``compute`` writes the artifact (atomically, through the store) under ``artifact_key`` and returns the
    ``PutResult`` and the manifest figures. The manifest is written last. Returns the
    :class:`~pipeline.results.StageResult` (each stage types it: ``.typed(...)``). A run that finds another process computing the same key
    (:func:`stage_lock`) waits for it and is then served its result."""
    spec = StoreSpec.of(spec)
    store = spec.open()
    mkey = manifest_key(artifact_key)
    m = load_verified(store, mkey, cache_key=key)
    if m is None:
        with stage_lock(spec, stage, key):
            m = load_verified(store, mkey, cache_key=key)
            if m is None:
                return _compute(store, stage, key, mkey, compute)
    hook(stage, "hit")
    return StageResult(stage=stage, key=key, manifest=m, computed=False)


def _compute(store: ArtifactStore, stage: str, key: str, mkey: str,
             compute: Callable[[ArtifactStore], tuple[PutResult, dict[str, Any]]]) -> StageResult:
    hook(stage, "start")
    t0 = time.perf_counter()
    put, figures = compute(store)
    figures = dict(figures)
    figures.setdefault("seconds", round(time.perf_counter() - t0, 3))
    hook(stage, "after_artifact")
    m = Manifest.from_put(stage, put, cache_key=key, figures=figures)
    write_manifest(store, mkey, m)
    hook(stage, "computed")
    return StageResult(stage=stage, key=key, manifest=m, computed=True,
                       compute_seconds=float(figures.get("compute_seconds") or 0.0))


def retry_on_storage_error(_task: Any, _task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only transient storage / network failures."""
    try:
        state.result()
    except (StorageError, ConnectionError, TimeoutError):
        return True
    except Exception as e:  # MLflow's S3 artifact uploads raise botocore errors (the store raises StorageError)
        return type(e).__module__.startswith(("botocore", "urllib3"))
    return False


# ============================================================================================ artifacts
def materialize(spec: StoreSpec | Mapping[str, Any], manifest: Mapping[str, Any] | Manifest) -> Path:
    """A local path holding the manifest's artifact: the file/folder itself for a local store, else a
    verified download into ``<workdir>/cache/<sha256>/`` (reused while its sha256 still matches)."""
    spec = StoreSpec.of(spec)
    store = spec.open()
    m = manifest if isinstance(manifest, Manifest) else Manifest.model_validate(dict(manifest))
    local = store.local_path(m.key)
    if local is not None:
        if not local.exists():
            raise StorageError(f"artifact {m.uri} is missing")
        return local
    name = m.key.rsplit("/", 1)[-1]
    target_root = spec.scratch / m.sha256[:32]
    target = target_root / name
    stamp = target_root / ".complete"
    if stamp.is_file() and stamp.read_text().strip() == m.sha256 and target.exists():
        return target
    target_root.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    if m.kind == "dir":
        store.get_dir(m.key, target, verify=True)
        got = hash_dir(target).sha256
    else:
        store.get_file(m.key, target)
        got = sha256_file(target)
    if got != m.sha256:
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        raise CorruptArtifact(f"{m.uri}: downloaded sha256 {got[:12]} != manifest {m.sha256[:12]}")
    stamp.write_text(m.sha256)
    return target


def seed_materialized(spec: StoreSpec | Mapping[str, Any], put: PutResult, local: Path) -> None:
    """After uploading ``local`` to a remote store, keep it as the verified local copy (no re-download)."""
    spec = StoreSpec.of(spec)
    store = spec.open()
    if store.local_path(put.key) is not None:
        return
    target_root = spec.scratch / put.sha256[:32]
    target = target_root / put.key.rsplit("/", 1)[-1]
    if target.exists():
        return
    target_root.mkdir(parents=True, exist_ok=True)
    shutil.move(str(local), str(target))
    (target_root / ".complete").write_text(put.sha256)


def json_put(store: ArtifactStore, key: str, data: Any) -> PutResult:
    """Write deterministic JSON (sorted keys) as a file artifact."""
    return store.write_bytes(key, (json.dumps(data, indent=1, sort_keys=True, allow_nan=False) + "\n").encode())


def read_json_artifact(spec: StoreSpec | Mapping[str, Any], manifest: Mapping[str, Any]) -> Any:
    return json.loads(materialize(spec, manifest).read_text(encoding="utf-8"))


# ============================================================================================ derived local copies
def _derived_paths(spec: StoreSpec, kind: str, sha256: str) -> tuple[Path, Path, Path]:
    root = spec.scratch / kind / sha256[:32]
    return root, root / "checkpoint", root / ".complete"


def derived_folder(spec: StoreSpec | Mapping[str, Any], kind: str, manifest: Mapping[str, Any] | Manifest,
                   build: Callable[[Path, Path], Any]) -> Path:
    """A local folder made from the manifest's artifact by ``build(source_folder, out)`` (a quantized checkpoint's
    dense load-back, a recovered checkpoint with its adapter folded in), written once into
    ``<workdir>/cache/<kind>/<sha256>/checkpoint`` and reused while its stamp names the artifact's sha256."""
    spec = StoreSpec.of(spec)
    m = manifest if isinstance(manifest, Manifest) else Manifest.model_validate(dict(manifest))
    root, target, stamp = _derived_paths(spec, kind, m.sha256)
    with stage_lock(spec, kind, m.sha256):
        if stamp.is_file() and stamp.read_text().strip() == m.sha256 and target.is_dir():
            return target
        stamp.unlink(missing_ok=True)
        tmp = root / ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        build(materialize(spec, m), tmp)
        os.replace(tmp, target)
        stamp.write_text(m.sha256)
    return target


def seed_derived_folder(spec: StoreSpec | Mapping[str, Any], kind: str, sha256: str, folder: Path) -> None:
    """Keep a folder a stage already made as the artifact's ``kind`` copy (what :func:`derived_folder` would write)."""
    spec = StoreSpec.of(spec)
    root, target, stamp = _derived_paths(spec, kind, sha256)
    with stage_lock(spec, kind, sha256):
        stamp.unlink(missing_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
        shutil.move(str(folder), str(target))
        stamp.write_text(sha256)
