"""MLflow 3 registry of pruned variants: one run per variant, one registered model version per variant.

Idempotency: every registered version carries the tag ``dlp.variant_key`` (the variant's cache key).
:func:`log_variant_run` first looks the key up and, when a version exists, returns it and creates nothing.
A run that logged its model but crashed before registration is reused (found by the same tag on the run and
the logged model's URI in ``dlp.logged_model_uri``), so a rerun does not log the checkpoint twice.

Where MLflow lives (tracking URI, client, experiment) is :mod:`pipeline.tracking`, re-exported here; what the
run holds is :mod:`pipeline.variant_logging`. mlflow and prefect are imported lazily.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from pipeline.mask_registry import storage_tags_of
from pipeline.tracking import (
    DEFAULT_EXPERIMENT,
    configure_mlflow,
    default_artifact_location,
    default_tracking_uri,
    ensure_experiment,
    get_client,
    resolve_tracking_uri,
    sqlite_path,
)
from pipeline.variant_logging import (
    BlockProfile,
    default_pip_requirements,
    log_checkpoint,
    log_run_content,
    require_checkpoint,
)

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

VARIANT_TAG = "dlp.variant_key"
MODEL_URI_TAG = "dlp.logged_model_uri"
DEFAULT_ALIAS = "candidate"
MODEL_DESCRIPTION = "DLP-pruned variants; one version per variant (tag dlp.variant_key)."

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
#: lineage of a quantized variant besides those (pipeline.stages.register.quantize_lineage): itself and its
#: pruned parent
QUANT_LINEAGE_FIELDS = (
    "quantized",
    "quantize_key",
    "quant_method",
    "quant_bits",
    "quant_group_size",
    "prune_key",
    "parent_stage",
    "parent_key",
    "parent_artifact_uri",
    "parent_sha256",
)

__all__ = [
    "DEFAULT_ALIAS",
    "DEFAULT_EXPERIMENT",
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
    "resolve_tracking_uri",
    "sqlite_path",
]


# ============================================================================================ versions
def _quote(value: str) -> str:
    """A string literal for an MLflow search filter."""
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
    versions = [v for v in client.search_model_versions(flt) if (v.tags or {}).get(VARIANT_TAG) == variant_key]
    return min(versions, key=lambda v: int(v.version)) if versions else None


def _latest_version(client: "MlflowClient", name: str) -> "ModelVersion | None":
    versions = list(client.search_model_versions(f"name = {_quote(name)}"))
    return max(versions, key=lambda v: int(v.version)) if versions else None


def _alias_version(client: "MlflowClient", name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except Exception:  # no such alias
        return None


# ============================================================================================ lineage
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
    except Exception:  # outside a flow run, or Prefect half-configured
        return None


# ============================================================================================ the run
@dataclass(frozen=True)
class _VariantRun:
    """Everything :func:`log_variant_run` logs for one new variant."""

    registered_name: str
    variant_key: str
    checkpoint_dir: str | os.PathLike[str]
    tags: dict[str, str]
    run_tags: dict[str, str]
    params: Mapping[str, Any]
    metrics: Mapping[str, float]
    blocks: BlockProfile
    run_name: str | None
    pip_requirements: Sequence[str] | None
    documents: Mapping[str, Any]
    extra_artifacts: Mapping[str, str | os.PathLike[str]]
    series: Mapping[str, Sequence[float]]
    storage: str = "dense"  # or "masks": pipeline.mask_registry
    base_dir: str | os.PathLike[str] | None = None
    base_source: str | None = None

    @property
    def title(self) -> str:
        return f"{self.registered_name}: {self.run_name or self.variant_key[:12]}"

    @property
    def card_title(self) -> str:
        return self.registered_name + (f" -- {self.run_name}" if self.run_name else "")


def _find_reusable_run(client: "MlflowClient", experiment_id: str, variant_key: str) -> "Run | None":
    """A finished run of this variant that already logged its model (a crash before registration)."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{VARIANT_TAG}` = {_quote(variant_key)} and attributes.status = 'FINISHED'",
        max_results=20,
    )
    return next((r for r in runs if r.data.tags.get(MODEL_URI_TAG)), None)


def _log_new_run(client: "MlflowClient", experiment_id: str, v: _VariantRun) -> tuple[str, _VariantRun]:
    """Start the variant run, log its content and its stored form (dense checkpoint or packed variant over the
    base, :mod:`pipeline.mask_registry`); returns the logged model URI and ``v`` with the storage tags."""
    import mlflow

    from pipeline.mask_registry import log_packed_model, stored_form

    require_checkpoint(v.checkpoint_dir)  # before the run: a bad folder leaves no failed run behind
    with stored_form(v.storage, Path(v.checkpoint_dir), Path(v.base_dir) if v.base_dir else None, v.base_source,
                     client, experiment_id) as form:  # packing fails before the run too
        v = replace(v, tags={**v.tags, **form.tags()}, run_tags={**v.run_tags, **form.tags()},
                    metrics={**v.metrics, **form.metrics()})
        nested = mlflow.active_run() is not None
        with mlflow.start_run(experiment_id=experiment_id, run_name=v.run_name, nested=nested, tags=v.run_tags) as run:
            log_run_content(params=v.params, metrics=v.metrics, blocks=v.blocks, plot_title=v.title,
                            documents=v.documents, extra_artifacts=v.extra_artifacts, series=v.series)
            reqs = list(v.pip_requirements) if v.pip_requirements is not None else default_pip_requirements()
            if form.storage == "masks":
                info = log_packed_model(form, pip_requirements=reqs)
            else:
                info = log_checkpoint(form.folder, card_title=v.card_title, tags=v.tags, pip_requirements=reqs)
            mlflow.set_tag(MODEL_URI_TAG, info.model_uri)
            log.info("logged model %s (%s, %s: %d bytes, dense %d) in run %s", info.model_id,
                     v.run_name or v.variant_key[:12], form.storage, form.bytes_stored, form.bytes_dense,
                     run.info.run_id)
            return info.model_uri, v


def _ensure_registered_model(client: "MlflowClient", name: str, tags: Mapping[str, str], description: str | None):
    """Create the registered model on first use, with a description and the base-model tag."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, tags={"dlp.base_model": tags.get("dlp.base_model", "")},
                                           description=description or MODEL_DESCRIPTION)
        except MlflowException:  # created concurrently
            client.get_registered_model(name)


def _register(client: "MlflowClient", model_uri: str, v: _VariantRun, alias: str | None) -> dict[str, Any]:
    """A new version of the logged model; a concurrent duplicate of the same variant is dropped again."""
    import mlflow

    mv = mlflow.register_model(model_uri, v.registered_name, tags=v.tags)
    if v.run_name:
        client.update_model_version(v.registered_name, mv.version, description=v.run_name)
    first = find_version_by_variant_key(v.registered_name, v.variant_key, client=client)
    if first is not None and int(first.version) < int(mv.version):  # keep the oldest, drop ours
        client.delete_model_version(v.registered_name, mv.version)
        return _result(first, alias, reused=True)
    if alias:
        client.set_registered_model_alias(v.registered_name, alias, mv.version)
    return _result(mv, alias, reused=False)


def _existing_result(client: "MlflowClient", mv: "ModelVersion", alias: str | None) -> dict[str, Any]:
    """The already-registered version; the alias is set (to the newest) only when nobody holds it."""
    if alias and _alias_version(client, mv.name, alias) is None:
        latest = _latest_version(client, mv.name)
        if latest is not None:
            client.set_registered_model_alias(mv.name, alias, latest.version)
    log.info("variant %s already registered as %s v%s; nothing to do", mv.tags.get(VARIANT_TAG, "")[:12],
             mv.name, mv.version)
    return _result(mv, alias, reused=True)


def _result(mv: "ModelVersion", alias: str | None, *, reused: bool) -> dict[str, Any]:
    return {"name": mv.name, "version": str(mv.version), "run_id": mv.run_id,
            "model_uri": f"models:/{mv.name}/{mv.version}", "alias": alias, "reused": reused}


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
    documents: Mapping[str, Any] | None = None,
    extra_artifacts: Mapping[str, str | os.PathLike[str]] | None = None,
    extra_tags: Mapping[str, str] | None = None,
    description: str | None = None,
    series: Mapping[str, Sequence[float]] | None = None,
    storage: str = "dense",
    base_dir: str | os.PathLike[str] | None = None,
    base_source: str | None = None,
) -> dict[str, Any]:
    """Log one pruned variant as an MLflow run and register its checkpoint as a new model version.

    params/metrics/block_*: see :mod:`pipeline.variant_logging`; lineage: :data:`LINEAGE_FIELDS` (tagged
    ``dlp.<field>`` on run and version); documents: artifact file -> dict or text; extra_artifacts: artifact
    folder -> file or folder; series: metric -> values logged at steps 1, 2, ...; storage: ``dense`` (the
    checkpoint, transformers flavor) or ``masks`` (packed over the base checkpoint ``base_dir``, a pyfunc
    model: :mod:`pipeline.mask_registry`). Idempotent on ``variant_key``: when a version with that
    ``dlp.variant_key`` exists it is returned and nothing is created (whatever ``storage`` says). Returns
    ``{"name", "version", "run_id", "model_uri",
    "alias", "reused"}`` with ``model_uri = "models:/NAME/VERSION"``.
    """
    uri = configure_mlflow(tracking_uri, workdir)
    client = get_client(uri, workdir)
    existing = find_version_by_variant_key(registered_name, variant_key, client=client)
    if existing is not None:
        return _existing_result(client, existing, alias)
    tags = {**lineage_tags(lineage), VARIANT_TAG: variant_key}
    v = _VariantRun(
        registered_name=registered_name, variant_key=variant_key, checkpoint_dir=checkpoint_dir, tags=tags,
        run_tags={**tags, **(extra_tags or {})}, params=params or {}, metrics=metrics or {},
        blocks=BlockProfile(block_sparsity or (), block_target or (), block_statistic or (), statistic_name),
        run_name=run_name, pip_requirements=pip_requirements, documents=documents or {},
        extra_artifacts=extra_artifacts or {}, series=series or {}, storage=storage, base_dir=base_dir,
        base_source=base_source,
    )
    exp_id = ensure_experiment(experiment, artifact_location, tracking_uri=uri, workdir=workdir)
    run = _find_reusable_run(client, exp_id, variant_key)
    if run is not None:
        log.info("reusing finished run %s (model already logged) for variant %s", run.info.run_id, variant_key[:12])
        model_uri = run.data.tags[MODEL_URI_TAG]
        v = replace(v, tags={**v.tags, **storage_tags_of(run.data.tags)})
    else:
        model_uri, v = _log_new_run(client, exp_id, v)
    _ensure_registered_model(client, registered_name, tags, description)
    return _register(client, model_uri, v, alias)
