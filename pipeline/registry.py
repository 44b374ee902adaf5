"""MLflow 3 helpers: experiment, one run per pruned variant, registered model versions with lineage tags.

Tracking URI: the explicit argument (``job.registry.tracking_uri``), else ``$MLFLOW_TRACKING_URI``, else
``sqlite:////<abs workdir>/mlflow.db`` (four slashes: absolute path) with artifacts in ``<workdir>/mlartifacts``.

Idempotency: every registered version carries the tag ``dlp.variant_key`` (the variant's cache key).
:func:`log_variant_run` first looks the key up and, when a version exists, returns it and creates nothing.
A run that logged its model but crashed before registration is reused (found by the same tag on the run), so
a rerun does not log the checkpoint twice.

mlflow, matplotlib and prefect are imported lazily (this module is cheap to import).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

VARIANT_TAG = "dlp.variant_key"
MODEL_URI_TAG = "dlp.logged_model_uri"
DEFAULT_ALIAS = "candidate"
DEFAULT_EXPERIMENT = "dlp"

#: lineage field -> tag name on the run and on the model version
LINEAGE_FIELDS = (
    "base_model",
    "base_revision",
    "base_hash",
    "method",
    "allocation",
    "statistic",
    "sparsity",
    "alpha",
    "pattern",
    "calibration_fingerprint",
    "flow_run_id",
    "artifact_uri",
)

__all__ = [
    "DEFAULT_ALIAS",
    "LINEAGE_FIELDS",
    "VARIANT_TAG",
    "configure_mlflow",
    "default_artifact_location",
    "default_pip_requirements",
    "default_tracking_uri",
    "ensure_experiment",
    "find_version_by_variant_key",
    "get_client",
    "lineage_tags",
    "log_variant_run",
    "plot_sparsity",
    "resolve_tracking_uri",
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


# ============================================================================================ versions
def _quote(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def find_version_by_variant_key(
    registered_name: str,
    variant_key: str,
    *,
    client: "MlflowClient | None" = None,
    tracking_uri: str | None = None,
    workdir: str | os.PathLike[str] = ".dlp-work",
) -> "ModelVersion | None":
    """The oldest version of ``registered_name`` tagged ``dlp.variant_key = variant_key``, or None."""
    client = client or get_client(tracking_uri, workdir)
    flt = f"name = {_quote(registered_name)} and tags.`{VARIANT_TAG}` = {_quote(variant_key)}"
    try:
        versions = list(client.search_model_versions(flt))
    except Exception as e:  # a store without tag filtering: filter here
        log.debug("search_model_versions with a tag filter failed (%s); filtering client-side", e)
        versions = [
            v for v in client.search_model_versions(f"name = {_quote(registered_name)}")
            if (v.tags or {}).get(VARIANT_TAG) == variant_key
        ]
    versions = [v for v in versions if (v.tags or {}).get(VARIANT_TAG) == variant_key]
    if not versions:
        return None
    return min(versions, key=lambda v: int(v.version))


def _latest_version(client: "MlflowClient", name: str) -> "ModelVersion | None":
    versions = list(client.search_model_versions(f"name = {_quote(name)}"))
    return max(versions, key=lambda v: int(v.version)) if versions else None


def _alias_version(client: "MlflowClient", name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except Exception:
        return None


# ============================================================================================ tags, params
def lineage_tags(lineage: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, str]:
    """``{"base_model": "x", "sparsity": 0.7, ...}`` -> ``{"dlp.base_model": "x", "dlp.sparsity": "0.7", ...}``.

    Keys already starting with ``dlp.`` are kept as they are; None values are dropped. When no flow-run id is
    given and the caller runs inside a Prefect flow, the current flow-run id is filled in."""
    merged = {**(lineage or {}), **extra}
    tags: dict[str, str] = {}
    for k, v in merged.items():
        if v is None:
            continue
        tag = k if k.startswith("dlp.") else f"dlp.{k}"
        tags[tag] = v if isinstance(v, str) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    if "dlp.flow_run_id" not in tags:
        rid = _prefect_flow_run_id()
        if rid:
            tags["dlp.flow_run_id"] = rid
    return tags


def _prefect_flow_run_id() -> str | None:
    if "prefect" not in sys.modules:
        return None
    try:
        from prefect.runtime import flow_run

        rid = flow_run.id
        return str(rid) if rid else None
    except Exception:
        return None


def _flat_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flat_params(v, key + "."))
        else:
            s = v if isinstance(v, str) else json.dumps(v, default=str)
            out[re.sub(r"[^\w\-. /:]", "_", key)] = s[:6000]
    return out


def default_pip_requirements() -> list[str]:
    """Pinned requirements of the logged model, from the installed versions (no torchvision: see stack notes)."""
    reqs = []
    for dist in ("mlflow", "torch", "transformers", "accelerate", "safetensors", "tokenizers", "sentencepiece"):
        try:
            ver = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            continue
        reqs.append(f"{dist}=={ver.split('+', 1)[0]}")
    return reqs


# ============================================================================================ plot
def plot_sparsity(
    achieved: Sequence[float],
    path: str | os.PathLike[str],
    *,
    target: Sequence[float] | None = None,
    statistic: Sequence[float] | None = None,
    statistic_name: str = "block statistic",
    title: str | None = None,
) -> Path:
    """PNG of per-block sparsity (target vs achieved) with the per-block statistic on a second axis.

    Uses matplotlib's Agg canvas directly: no global backend switch, safe in worker threads."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(achieved)
    xs = list(range(n))
    fig = Figure(figsize=(max(6.0, 0.25 * n + 3), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if target is not None:
        ax.plot(xs[: len(target)], list(target), "o--", color="tab:blue", label="target sparsity", markersize=4)
    ax.plot(xs, list(achieved), "s-", color="tab:orange", label="achieved sparsity", markersize=3)
    ax.set_xlabel("block")
    ax.set_ylabel("sparsity")
    vals = [float(v) for v in list(achieved) + list(target or []) if v is not None and math.isfinite(float(v))]
    if vals:
        lo, hi = min(vals), max(vals)
        pad = max(0.02, 0.1 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad))
    lines, labels = ax.get_legend_handles_labels()
    if statistic is not None and len(statistic):
        ax2 = ax.twinx()
        ax2.plot(list(range(len(statistic))), list(statistic), "^:", color="tab:green", label=statistic_name, markersize=3)
        ax2.set_ylabel(statistic_name)
        l2, lb2 = ax2.get_legend_handles_labels()
        lines += l2
        labels += lb2
    ax.legend(lines, labels, loc="best", fontsize="small")
    ax.grid(True, alpha=0.3)
    ax.set_title(title or "per-block sparsity")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


# ============================================================================================ the run
def _block_metrics(prefix: str, values: Sequence[float] | None) -> dict[str, float]:
    if not values:
        return {}
    width = max(2, len(str(len(values) - 1)))
    return {f"{prefix}.block_{i:0{width}d}": float(v) for i, v in enumerate(values)}


def _find_reusable_run(client: "MlflowClient", experiment_id: str, variant_key: str):
    try:
        runs = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{VARIANT_TAG}` = {_quote(variant_key)} and attributes.status = 'FINISHED'",
            max_results=20,
        )
    except Exception as e:
        log.debug("run search failed: %s", e)
        return None
    for r in runs:
        if r.data.tags.get(MODEL_URI_TAG):
            return r
    return None


def log_variant_run(
    *,
    registered_name: str,
    variant_key: str,
    checkpoint_dir: str | os.PathLike[str],
    params: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    block_sparsity: Sequence[float] | None = None,
    block_target: Sequence[float] | None = None,
    block_statistic: Sequence[float] | None = None,
    statistic_name: str = "block statistic",
    lineage: Mapping[str, Any] | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    artifact_location: str | None = None,
    run_name: str | None = None,
    tracking_uri: str | None = None,
    workdir: str | os.PathLike[str] = ".dlp-work",
    alias: str | None = DEFAULT_ALIAS,
    pip_requirements: Sequence[str] | None = None,
    extra_artifacts: Mapping[str, str | os.PathLike[str]] | None = None,
    extra_tags: Mapping[str, str] | None = None,
    description: str | None = None,
) -> dict[str, Any]:
    """Log one pruned variant as an MLflow run and register its checkpoint as a new model version.

    - params: nested or flat dict of the resolved config (flattened to ``a.b.c`` keys);
    - metrics: scalar metrics (``ppl.wikitext2``, ``sparsity.global`` ...);
    - block_sparsity / block_target / block_statistic: per-block arrays, logged as ``sparsity.block_NN``,
      ``target_sparsity.block_NN``, ``statistic.block_NN`` metrics, as ``blocks.json`` and as ``sparsity.png``;
    - lineage: see :data:`LINEAGE_FIELDS` (tagged ``dlp.<field>`` on run and version);
    - checkpoint_dir: a ``save_pretrained`` folder with tokenizer; logged with
      ``mlflow.transformers.log_model(name="model", task="text-generation", pip_requirements=...)``.

    Idempotent on ``variant_key``: when a version with that ``dlp.variant_key`` exists it is returned and
    nothing is created. Returns ``{"name", "version", "run_id", "model_uri", "alias", "reused"}`` with
    ``model_uri = "models:/NAME/VERSION"``.
    """
    import mlflow

    uri = configure_mlflow(tracking_uri, workdir)
    client = get_client(uri, workdir)

    existing = find_version_by_variant_key(registered_name, variant_key, client=client)
    if existing is not None:
        if alias and _alias_version(client, registered_name, alias) is None:
            latest = _latest_version(client, registered_name)
            if latest is not None:
                client.set_registered_model_alias(registered_name, alias, latest.version)
        log.info("variant %s already registered as %s v%s; nothing to do", variant_key[:12], registered_name, existing.version)
        return _result(existing, alias, reused=True)

    exp_id = ensure_experiment(experiment, artifact_location, tracking_uri=uri, workdir=workdir)
    tags = lineage_tags(lineage)
    tags[VARIANT_TAG] = variant_key

    run = _find_reusable_run(client, exp_id, variant_key)
    if run is not None:
        run_id = run.info.run_id
        logged_model_uri = run.data.tags[MODEL_URI_TAG]
        log.info("reusing finished run %s (model already logged) for variant %s", run_id, variant_key[:12])
    else:
        ckpt = Path(checkpoint_dir)
        if not (ckpt / "config.json").is_file():
            raise FileNotFoundError(f"checkpoint folder {ckpt} has no config.json (expected a save_pretrained folder)")
        nested = mlflow.active_run() is not None
        with mlflow.start_run(experiment_id=exp_id, run_name=run_name, nested=nested, tags={**tags, **(extra_tags or {})}) as active:
            run_id = active.info.run_id
            flat = _flat_params(params or {})
            items = list(flat.items())
            for i in range(0, len(items), 100):
                mlflow.log_params(dict(items[i : i + 100]))
            all_metrics: dict[str, float] = {k: float(v) for k, v in (metrics or {}).items() if v is not None}
            all_metrics.update(_block_metrics("sparsity", block_sparsity))
            all_metrics.update(_block_metrics("target_sparsity", block_target))
            all_metrics.update(_block_metrics("statistic", block_statistic))
            if block_sparsity:
                all_metrics.setdefault("sparsity.block_mean", sum(map(float, block_sparsity)) / len(block_sparsity))
                all_metrics.setdefault("sparsity.block_min", min(map(float, block_sparsity)))
                all_metrics.setdefault("sparsity.block_max", max(map(float, block_sparsity)))
            finite = {k: v for k, v in all_metrics.items() if math.isfinite(v)}
            metric_items = list(finite.items())
            for i in range(0, len(metric_items), 500):
                mlflow.log_metrics(dict(metric_items[i : i + 500]))

            with tempfile.TemporaryDirectory(prefix="dlp-mlflow-") as tmp:
                if block_sparsity or block_target or block_statistic:
                    blocks = {
                        "achieved_sparsity": [float(x) for x in block_sparsity or []],
                        "target_sparsity": [float(x) for x in block_target or []],
                        "statistic": [float(x) for x in block_statistic or []],
                        "statistic_name": statistic_name,
                    }
                    (Path(tmp) / "blocks.json").write_text(json.dumps(blocks, indent=1))
                    mlflow.log_artifact(str(Path(tmp) / "blocks.json"), artifact_path="sparsity")
                    if block_sparsity:
                        png = plot_sparsity(
                            block_sparsity, Path(tmp) / "sparsity.png", target=block_target,
                            statistic=block_statistic, statistic_name=statistic_name,
                            title=f"{registered_name}: {run_name or variant_key[:12]}",
                        )
                        mlflow.log_artifact(str(png), artifact_path="sparsity")
                for dest, src in (extra_artifacts or {}).items():
                    src_p = Path(src)
                    if src_p.is_dir():
                        mlflow.log_artifacts(str(src_p), artifact_path=dest)
                    else:
                        mlflow.log_artifact(str(src_p), artifact_path=dest or None)

            with _transformers5_check_task_shim():
                info = mlflow.transformers.log_model(
                    transformers_model=str(ckpt.resolve()),  # absolute: never mistaken for a hub repo id
                    name="model",
                    task="text-generation",
                    pip_requirements=list(pip_requirements) if pip_requirements is not None else default_pip_requirements(),
                    model_card=_model_card(registered_name, run_name, tags),
                )
            logged_model_uri = info.model_uri
            mlflow.set_tag(MODEL_URI_TAG, logged_model_uri)

    # register (create the registered model on first use)
    try:
        client.get_registered_model(registered_name)
    except Exception:
        try:
            client.create_registered_model(
                registered_name,
                tags={"dlp.base_model": tags.get("dlp.base_model", "")},
                description=description or "DLP-pruned variants; one version per variant (tag dlp.variant_key).",
            )
        except Exception:  # created concurrently
            client.get_registered_model(registered_name)
    mv = client.create_model_version(
        registered_name,
        source=logged_model_uri,
        run_id=run_id,
        tags=tags,
        description=run_name,
        model_id=_model_id(logged_model_uri),
    )
    # a concurrent writer may have registered the same variant: keep the oldest, drop ours
    first = find_version_by_variant_key(registered_name, variant_key, client=client)
    if first is not None and int(first.version) < int(mv.version):
        client.delete_model_version(registered_name, mv.version)
        return _result(first, alias, reused=True)
    if alias:
        client.set_registered_model_alias(registered_name, alias, mv.version)
    return _result(mv, alias, reused=False)


def _model_card(registered_name: str, run_name: str | None, tags: Mapping[str, str]):
    """A small model card (README.md in the logged model) listing the lineage tags; also stops MLflow from
    trying to fetch a card from the hub. None when huggingface_hub is unavailable."""
    try:
        from huggingface_hub import ModelCard
    except ImportError:  # pragma: no cover
        return None
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [pruned, dlp]", "---",
             f"# {registered_name}" + (f" -- {run_name}" if run_name else ""), "",
             "Pruned with Dynamic Layerwise Pruning (DLP, arXiv 2505.23807).", "", "| lineage | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(tags.items())]
    return ModelCard("\n".join(lines) + "\n")


@contextmanager
def _transformers5_check_task_shim():
    """MLflow 3.17.2 logs a local checkpoint via ``pipelines.check_task(task)[1]["impl"].__name__``
    (mlflow/transformers/flavor_config.py); transformers 5 returns ``impl`` as a dotted *string*, so the call
    fails with ``AttributeError: 'str' object has no attribute '__name__'``. For the duration of ``log_model``
    only, resolve that string to the class. A no-op when ``impl`` is already a class (transformers 4)."""
    try:
        from transformers import pipelines
    except ImportError:  # pragma: no cover
        yield
        return
    original = pipelines.check_task

    def check_task(task):
        name, meta, options = original(task)
        impl = meta.get("impl") if isinstance(meta, dict) else None
        if isinstance(impl, str) and "." in impl:
            module, _, cls = impl.rpartition(".")
            meta = {**meta, "impl": getattr(importlib.import_module(module), cls)}
        return name, meta, options

    pipelines.check_task = check_task
    try:
        yield
    finally:
        pipelines.check_task = original


def _model_id(model_uri: str) -> str | None:
    m = re.match(r"^models:/(m-[0-9a-f]+)$", model_uri or "")
    return m.group(1) if m else None


def _result(mv: "ModelVersion", alias: str | None, *, reused: bool) -> dict[str, Any]:
    return {
        "name": mv.name,
        "version": str(mv.version),
        "run_id": mv.run_id,
        "model_uri": f"models:/{mv.name}/{mv.version}",
        "alias": alias,
        "reused": reused,
    }
