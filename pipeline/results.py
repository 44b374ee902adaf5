"""Typed results of the pipeline's stages: what one stage hands the next, instead of nested dicts.

Each is a frozen pydantic model: it travels as a Prefect task parameter and result (Prefect keeps results in
memory here: no result persistence, see :mod:`tasks.stage`), pickles for a Dask worker, and dumps to JSON.
Every result carries the stage's :class:`~pipeline.manifest.Manifest` (URI, sha256, figures) and whether this
run computed it; the fields a later stage reads are typed attributes, taken from the manifest's figures by
:meth:`StageResult.typed`.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

from pipeline.manifest import Manifest

__all__ = ["CalibrationResult", "EvaluationResult", "FetchResult", "ModelSource", "PruneResult", "QuantizeResult",
           "RatesResult", "RecoverResult",
           "RegisterResult", "Registration", "StageResult", "StatisticsResult"]

R = TypeVar("R", bound="StageResult")


class StageResult(BaseModel):
    """One stage's outcome: its content key, its manifest, and whether this run computed it."""

    model_config = ConfigDict(frozen=True)

    stage: str
    key: str
    computed: bool
    manifest: Manifest | None = None
    compute_seconds: float = 0.0  # spent computing in this run (0 when served from the store)

    @property
    def figures(self) -> dict[str, Any]:
        return self.manifest.figures if self.manifest is not None else {}

    @property
    def uri(self) -> str | None:
        return self.manifest.uri if self.manifest is not None else None

    @property
    def recorded_seconds(self) -> float | None:
        """The compute time recorded with the artifact (the same on every rerun)."""
        return self.figures.get("compute_seconds")

    def typed(self, cls: type[R], **fields: Any) -> R:
        """This result as ``cls``: its own fields from ``fields``, else from the manifest's figures."""
        base = {name: getattr(self, name) for name in StageResult.model_fields}
        own = {name: self.figures[name] for name in cls.model_fields
               if name not in base and name not in fields and name in self.figures}
        return cls(**base, **own, **fields)


class ModelSource(BaseModel):
    """The fetched model (the fields of :class:`dlp.models.ModelRef`; torch is not imported for it)."""

    model_config = ConfigDict(frozen=True)

    source: str
    path: str  # machine-local: never part of a cache key
    revision: str | None
    fingerprint: str
    kind: str

    def model_ref(self) -> Any:
        from dlp.models import ModelRef

        return ModelRef(**self.model_dump())


class FetchResult(StageResult):
    ref: ModelSource
    tokenizer_fp: str
    seconds: float
    native_dtype: str = "float32"  # the checkpoint's own dtype (config.json): what ``model.dtype: auto`` means


class CalibrationResult(StageResult):
    fingerprint: str
    source: str
    nsamples: int
    seqlen: int
    seed: int


class StatisticsResult(StageResult):
    num_blocks: int


class RatesResult(StageResult):
    ratios: list[float]
    params: dict[str, Any]
    statistic_name: str
    block_statistic: list[float]
    alpha_search: dict[str, Any] | None = None

    def chosen(self) -> dict[str, Any]:
        """``{"alpha", "statistic"}`` the rates were computed with: the search's choice under ``auto``, else
        the requested values (None for allocations without them)."""
        if self.alpha_search:
            return {"alpha": self.alpha_search["alpha"], "statistic": self.alpha_search["statistic"]}
        return {"alpha": self.params.get("alpha"), "statistic": self.params.get("statistic")}


class PruneResult(StageResult):
    achieved_sparsity: float
    achieved_per_block: list[float]
    target_per_block: list[float]
    weights_sha256: dict[str, str] = {}


class RecoverResult(StageResult):
    """The recovered checkpoint (a folder in the store, read like the prune stage's) and its figures."""

    achieved_sparsity: float
    sparsity_before: float
    exact: bool
    achieved_per_block: list[float]
    loss: list[float]
    steps: int
    settings: dict[str, Any]
    data: dict[str, Any] = {}
    train_seconds: float = 0.0
    weights_sha256: dict[str, str] = {}


class QuantizeResult(StageResult):
    """The quantized checkpoint (compressed-tensors W4A16 / W8A16) and what its load-back measured."""

    bits: int
    group_size: int
    method: str
    compensation: str | None = None
    export_dtype: str = "bfloat16"
    bytes_on_disk: int  # the checkpoint's safetensors files
    parent_bytes: int  # the parent checkpoint's safetensors files
    zeros_parent: int  # exactly-zero weights of the parent's block linears
    zeros_loaded: int  # ... of the checkpoint loaded back through transformers (equal, or the stage fails)
    weights_total: int
    sparsity_loaded: float
    parent_stage: str  # the checkpoint it quantized: prune's (or a later stage's)
    parent_key: str
    parent_uri: str | None = None
    parent_sha256: str | None = None


class EvaluationResult(StageResult):
    """Perplexity and zero-shot, each cached on its own (``parts``); ``manifest`` is the main part's."""

    parts: dict[str, StageResult]
    ppl: float | None = None
    zero_shot: dict[str, Any] | None = None  # dlp.zeroshot's report


class Registration(BaseModel):
    """The registered version of a variant (:func:`pipeline.registry.log_variant_run`)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str
    version: str
    run_id: str | None = None
    model_uri: str
    alias: str | None = None
    reused: bool = False


class RegisterResult(StageResult):
    registered: Registration
