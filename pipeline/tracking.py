"""Where MLflow lives: the tracking URI of a job, the client, and the experiment.

Tracking URI: the explicit argument (``job.registry.tracking_uri``), else ``$MLFLOW_TRACKING_URI``, else
``sqlite:////<abs workdir>/mlflow.db`` (four slashes: absolute path) with artifacts in ``<workdir>/mlartifacts``.

mlflow is imported lazily (this module is cheap to import).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "dlp"

__all__ = [
    "DEFAULT_EXPERIMENT",
    "configure_mlflow",
    "default_artifact_location",
    "default_tracking_uri",
    "ensure_experiment",
    "get_client",
    "resolve_tracking_uri",
    "sqlite_path",
]


# ============================================================================================ URIs
def default_tracking_uri(workdir: str | os.PathLike[str] = ".dlp-work") -> str:
    """``sqlite:////abs/workdir/mlflow.db``."""
    return "sqlite:///" + (Path(workdir).expanduser().resolve() / "mlflow.db").as_posix()


def resolve_tracking_uri(tracking_uri: str | None = None, workdir: str | os.PathLike[str] = ".dlp-work") -> str:
    """Explicit URI, else ``$MLFLOW_TRACKING_URI``, else :func:`default_tracking_uri`. A relative
    ``sqlite:///rel.db`` is made absolute (MLflow would resolve it against the current directory)."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(workdir)
    db = sqlite_path(uri)
    if db is not None and not db.is_absolute():
        uri = "sqlite:///" + db.resolve().as_posix()
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative or absolute), else None."""
    if not uri.startswith("sqlite:"):
        return None
    rest = uri[len("sqlite:") :]
    if rest.startswith("///"):
        p = rest[3:]
    elif rest.startswith("//"):
        p = rest[2:]
    else:
        return None
    p = unquote(p.split("?", 1)[0])
    return Path(p) if p and p != ":memory:" else None


def default_artifact_location(tracking_uri: str, workdir: str | os.PathLike[str] = ".dlp-work") -> str | None:
    """Where a new experiment keeps artifacts when the job does not say: for a SQLite store, the
    ``mlartifacts`` folder beside the database; for a server (http/https/databricks), None (its default)."""
    db = sqlite_path(tracking_uri)
    if db is not None:
        return (db.resolve().parent / "mlartifacts").as_uri()
    scheme = urlparse(tracking_uri).scheme
    if scheme in ("", "file"):
        root = Path(unquote(urlparse(tracking_uri).path) if scheme == "file" else tracking_uri)
        return (root.resolve() / "mlartifacts").as_uri()
    if scheme in ("http", "https", "databricks"):
        return None
    return (Path(workdir).expanduser().resolve() / "mlartifacts").as_uri()


def configure_mlflow(tracking_uri: str | None = None, workdir: str | os.PathLike[str] = ".dlp-work") -> str:
    """Point MLflow's fluent API (tracking AND registry) at the resolved URI; create the SQLite folder."""
    import mlflow

    uri = resolve_tracking_uri(tracking_uri, workdir)
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    # MLflow 3 also exports both URIs to the environment ("so that subprocesses inherit it"). Left there, the
    # exported URI would win over the next job's workdir in this process (resolve_tracking_uri reads the
    # environment first): a second job with another workdir would write into the first job's registry.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    try:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return uri


def get_client(tracking_uri: str | None = None, workdir: str | os.PathLike[str] = ".dlp-work") -> "MlflowClient":
    from mlflow import MlflowClient

    uri = configure_mlflow(tracking_uri, workdir)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# ============================================================================================ experiment
def ensure_experiment(
    name: str = DEFAULT_EXPERIMENT,
    artifact_location: str | None = None,
    *,
    tracking_uri: str | None = None,
    workdir: str | os.PathLike[str] = ".dlp-work",
) -> str:
    """Experiment id of ``name``, created with ``artifact_location`` (default: see
    :func:`default_artifact_location`) when missing; a deleted experiment of that name is restored."""
    client = get_client(tracking_uri, workdir)
    uri = resolve_tracking_uri(tracking_uri, workdir)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if artifact_location and exp.artifact_location.rstrip("/") != artifact_location.rstrip("/"):
            log.warning(
                "MLflow experiment %r already stores artifacts in %s, not %s; keeping the existing location",
                name, exp.artifact_location, artifact_location,
            )
        return exp.experiment_id
    loc = artifact_location or default_artifact_location(uri, workdir)
    try:
        return client.create_experiment(name, artifact_location=loc)
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id
