"""The registry side of variants stored as masks over their base (``registry.storage: masks``).

A registered variant is then an ``mlflow.pyfunc`` model (:mod:`pipeline.mask_model`) whose one artifact is the
packed variant (:func:`dlp.maskstore.pack`: a 1-bit mask per pruned weight over the base for magnitude / Wanda,
mask + surviving values where the survivors changed, e.g. SparseGPT), not a dense copy. The base checkpoint is
logged to MLflow's artifact store **once per content sha256** (:func:`dlp.models.folder_fingerprint`): a run
tagged ``dlp.base_checkpoint_sha256`` in the variant's experiment, artifact folder ``checkpoint``. Each variant's
run and model version are tagged with:

- ``dlp.storage``: ``masks`` or ``dense``;
- ``dlp.base_checkpoint_sha256`` / ``dlp.base_checkpoint_uri``: the base's content sha256 and where it lives;
- ``dlp.bytes_stored`` / ``dlp.bytes_dense``: bytes of the logged variant folder vs its dense folder (weights,
  config and tokenizer files both)
  (also logged as the metrics ``storage.bytes_stored`` / ``storage.bytes_dense`` / ``storage.ratio``).

mlflow is imported lazily.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient
    from mlflow.models.model import ModelInfo

STORAGES = ("masks", "dense")
STORAGE_TAG = "dlp.storage"
BASE_SHA_TAG = "dlp.base_checkpoint_sha256"
BASE_URI_TAG = "dlp.base_checkpoint_uri"
BYTES_STORED_TAG = "dlp.bytes_stored"
BYTES_DENSE_TAG = "dlp.bytes_dense"
STORAGE_TAGS = (STORAGE_TAG, BASE_SHA_TAG, BASE_URI_TAG, BYTES_STORED_TAG, BYTES_DENSE_TAG)
BASE_ARTIFACT = "checkpoint"


@dataclass(frozen=True)
class StoredForm:
    """How one variant is logged: its folder (dense checkpoint or packed variant) and where its base lives."""

    storage: str
    folder: Path
    bytes_stored: int
    bytes_dense: int
    base_sha256: str | None = None
    base_uri: str | None = None

    def tags(self) -> dict[str, str]:
        tags = {STORAGE_TAG: self.storage, BYTES_STORED_TAG: str(self.bytes_stored), BYTES_DENSE_TAG: str(self.bytes_dense)}
        if self.base_sha256:
            tags.update({BASE_SHA_TAG: self.base_sha256, BASE_URI_TAG: self.base_uri or ""})
        return tags

    def metrics(self) -> dict[str, float]:
        return {"storage.bytes_stored": float(self.bytes_stored), "storage.bytes_dense": float(self.bytes_dense),
                "storage.ratio": self.bytes_stored / max(self.bytes_dense, 1)}


def storage_tags_of(tags: Mapping[str, str]) -> dict[str, str]:
    """The storage tags among a run's tags (a reused run gives them to its new version)."""
    return {k: v for k, v in tags.items() if k in STORAGE_TAGS}


# ============================================================================================ the base
def _find_base_run(client: "MlflowClient", experiment_id: str, sha256: str):
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{BASE_SHA_TAG}` = '{sha256}' and "
                              "attributes.status = 'FINISHED'", order_by=["attributes.start_time ASC"], max_results=1)
    return runs[0] if runs else None


def ensure_base_logged(client: "MlflowClient", experiment_id: str, base_dir: Path, sha256: str, source: str) -> str:
    """The artifact URI of the base checkpoint with content ``sha256``, logged in a run of its own the first time."""
    import mlflow

    run = _find_base_run(client, experiment_id, sha256)
    if run is None:
        tags = {BASE_SHA_TAG: sha256, "dlp.base_model": source, "dlp.kind": "base-checkpoint"}
        nested = mlflow.active_run() is not None
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"base {source} {sha256[:12]}", tags=tags,
                              nested=nested) as active:
            mlflow.log_artifacts(str(base_dir), artifact_path=BASE_ARTIFACT)
        run = client.get_run(active.info.run_id)
    return f"{run.info.artifact_uri.rstrip('/')}/{BASE_ARTIFACT}"


# ============================================================================================ the variant
@contextmanager
def stored_form(storage: str, checkpoint_dir: Path, base_dir: Path | None, base_source: str | None,
                client: "MlflowClient", experiment_id: str) -> Iterator[StoredForm]:
    """The variant as it will be logged: the dense checkpoint, or (``masks``) a packed copy in a temp folder
    over the base, which is logged first (once per content). Packing fails before any run is started."""
    from dlp.maskstore import folder_bytes, pack, read_manifest

    if storage not in STORAGES:
        raise ValueError(f"unknown registry storage '{storage}'; use one of: {', '.join(STORAGES)}")
    dense = folder_bytes(checkpoint_dir)
    if storage == "dense":
        yield StoredForm("dense", Path(checkpoint_dir), dense, dense)
        return
    if base_dir is None:
        raise ValueError("registry storage 'masks' needs the base checkpoint folder (base_dir)")
    with tempfile.TemporaryDirectory(prefix="dlp-pack-") as tmp:
        info = pack(checkpoint_dir, base_dir, Path(tmp) / "variant", base_source=base_source)
        sha = read_manifest(info.path)["base"]["fingerprint"]
        uri = ensure_base_logged(client, experiment_id, Path(base_dir), sha, base_source or str(base_dir))
        yield StoredForm("masks", info.path, info.bytes_variant, dense, sha, uri)


def log_packed_model(form: StoredForm, *, pip_requirements: Sequence[str]) -> "ModelInfo":
    """Log the packed variant as the ``model`` pyfunc model of the active run (:mod:`pipeline.mask_model`)."""
    import mlflow

    from pipeline import mask_model

    code = Path(mask_model.__file__).with_name("mask_model_code.py")  # a model from code: loading unpickles nothing
    return mlflow.pyfunc.log_model(
        name="model", python_model=str(code), artifacts={mask_model.VARIANT_ARTIFACT: str(form.folder)},
        model_config={"base_uri": form.base_uri, "base_sha256": form.base_sha256},
        signature=mask_model.signature(),
        pip_requirements=[*pip_requirements, "numpy"],
    )
