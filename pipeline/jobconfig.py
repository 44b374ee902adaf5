"""The job file: one YAML document describing a compression run, validated with pydantic v2.

Every section forbids unknown keys: a typo is an error, never a silently ignored setting. Errors are raised as
:class:`JobError` whose message is ONE line naming the offending key and what is expected, e.g.::

    job file configs/x.yaml: unknown key 'pruning.alhpa' -- did you mean 'alpha'? (valid: allocation, alpha, ...)
    job file configs/x.yaml: 'pruning.sparsity': expected a number between 0 and 1, got 'high'

Defaults are the paper's (DLP, arXiv 2505.23807): C4 calibration 128 x 2048 tokens, seed 0, alpha 0.15,
median statistic, 70 % sparsity, WikiText-2 perplexity at seqlen 2048.

Use :func:`load_job` (file + dotted overrides) and :func:`parse_overrides` (``["pruning.alpha=0.2"]`` from a CLI);
the YAML reading is :mod:`pipeline.jobyaml`, the messages :mod:`pipeline.jobmessages`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dlp import bounds
from dlp.zeroshot import ZERO_SHOT_7
from pipeline.jobmessages import JobError, first_problem, show
from pipeline.jobyaml import apply_overrides, parse_overrides, read_yaml

__all__ = [
    "CalibrationSection",
    "DEMO_JOB",
    "EvaluationSection",
    "JobConfig",
    "JobError",
    "ModelSection",
    "PAPER_JOBS",
    "PerplexitySection",
    "PruningSection",
    "QuantizationSection",
    "RecoverySection",
    "RegistrySection",
    "StorageSection",
    "ZERO_SHOT_7",
    "ZeroShotSection",
    "apply_overrides",
    "derive_model_name",
    "load_job",
    "load_job_data",
    "parse_overrides",
    "read_yaml",
]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEMO_JOB = CONFIG_DIR / "demo.yaml"
PAPER_JOBS = sorted(CONFIG_DIR.glob("paper-*.yaml"))


# ============================================================================================ schema
class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)


class ModelSection(_Section):
    source: str = Field(
        "smollm2-135m",
        min_length=1,
        description="'smollm2-135m' (bundled), a hub id (meta-llama/Llama-2-7b-hf), a local folder, or a .gguf file",
    )
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute dtype; auto = the checkpoint's own (config.json), resolved after fetch")
    device: Literal["cpu", "cuda"] = "cpu"
    trust_remote_code: bool = False


class CalibrationSection(_Section):
    source: str = Field("c4", min_length=1, description="'c4', 'wikitext2', or a path to a .jsonl/.txt corpus")
    nsamples: int = Field(128, **bounds.NSAMPLES.field())
    seqlen: int = Field(2048, **bounds.SEQLEN.field())
    seed: int = 0


Alpha = Union[Annotated[float, Field(**bounds.ALPHA.field())], Literal["auto"]]


class AlphaSearchSection(_Section):
    """Settings of ``alpha: auto`` / ``statistic: auto`` (see :func:`dlp.autoalpha.choose_alpha`)."""

    heldout: int | None = Field(None, **bounds.HELDOUT.field(), description="held-out calibration windows for the proxy (None: about 4096 tokens)")
    budget: int | None = Field(None, **bounds.BUDGET.field(), description="screening evaluations (None: 6 for one statistic, 8 for auto)")
    confirm: int = Field(2, ge=1, description="SparseGPT: finalists the pruner itself scores (uniform first)")


class PruningSection(_Section):
    method: Literal["magnitude", "wanda", "sparsegpt"] = "wanda"
    allocation: Literal["dlp", "owl", "uniform"] = "dlp"
    sparsity: float = Field(bounds.DEFAULT_SPARSITY, **bounds.SPARSITY.field())
    alpha: Alpha = bounds.DEFAULT_ALPHA
    statistic: Literal["median", "mean", "auto"] = bounds.DEFAULT_STATISTIC
    owl_m: float = Field(bounds.DEFAULT_OWL_M, **bounds.OWL_M.field())
    owl_lambda: float = Field(bounds.DEFAULT_OWL_LAMBDA, **bounds.OWL_LAMBDA.field())
    pattern: Literal["unstructured", "2:4", "4:8"] = "unstructured"
    mode: Literal["sequential", "oneshot"] = "sequential"
    search: AlphaSearchSection = Field(default_factory=AlphaSearchSection,
                                       description="alpha: auto / statistic: auto -- the search's settings")


class QuantizationSection(_Section):
    """The optional ``quantize`` stage after prune (section absent: no stage): weights to 4 or 8 bits with the
    pruned zeros kept, exported as a compressed-tensors W4A16 / W8A16 checkpoint (:mod:`dlp.quantize`)."""

    bits: Literal[bounds.QUANT_BITS] = Field(bounds.DEFAULT_QUANT_BITS, description="4 (W4A16) or 8 (W8A16)")
    group_size: int = Field(bounds.DEFAULT_GROUP_SIZE, **bounds.GROUP_SIZE.field(),
                            description="inputs per scale; must divide every block linear's in_features")
    method: Literal[bounds.QUANT_METHODS] = Field("gptq", description="gptq (calibrated) | rtn (round-to-nearest)")
    compensation: Literal[bounds.QUANT_COMPENSATIONS] = Field(
        bounds.DEFAULT_COMPENSATION, description="GPTQ: shared (SparseGPT's rule) | exact (per-row, survivors only; "
                                                 "lower error, much slower)")
    nsamples: int | None = Field(None, **bounds.NSAMPLES.field(),
                                 description="GPTQ: the first N of the calibration stage's windows (None: all)")
    export_dtype: Literal[bounds.QUANT_EXPORT_DTYPES] = Field(
        "bfloat16", description="dtype of the scales and of the unquantized tensors in the checkpoint")


class PerplexitySection(_Section):
    data: str = Field("wikitext2", min_length=1, description="'wikitext2' or a path to a text corpus")
    seqlen: int = Field(2048, **bounds.SEQLEN.field())
    max_windows: int | None = Field(None, **bounds.WINDOWS.field(), description="evaluate only the first N windows (None: all)")


ZeroShotTasks = Union[list[str], Literal["zero-shot-7"], None]


class ZeroShotSection(_Section):
    tasks: ZeroShotTasks = Field(None, description="lm-eval task names, 'zero-shot-7', or null to skip")
    limit: int | None = Field(None, ge=1, description="examples per task (None: all)")

    def resolved_tasks(self) -> list[str]:
        if self.tasks is None:
            return []
        if self.tasks == "zero-shot-7":
            return list(ZERO_SHOT_7)
        return list(self.tasks)


class EvaluationSection(_Section):
    perplexity: PerplexitySection | None = Field(default_factory=PerplexitySection)
    zero_shot: ZeroShotSection = Field(default_factory=ZeroShotSection)


class RegistrySection(_Section):
    model_name: str | None = Field(None, description="registered model name (default: '<base model>-dlp')")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite in the workdir)"
    )
    experiment: str = Field("dlp", min_length=1)
    artifact_location: str | None = Field(None, description="experiment artifact root (default: <workdir>/mlartifacts)")
    alias: str = Field("candidate", min_length=1, description="alias moved to each newly registered version")
    storage: Literal["masks", "dense"] = Field(
        "masks", description="registered variant: masks (bitmask + changed values over the base, logged once) | dense")


class ResourcesSection(_Section):
    """Memory and disk of the out-of-core engine (see dlp.resources)."""

    memory_budget: str | None = Field(None, description="memory for calibration states before they spill to the "
                                                         "work dir, e.g. 8GB (None: half the available memory); also "
                                                         "the limit past which zero-shot runs offloaded")
    max_shard_size: str = Field("5GB", description="shard size of pruned checkpoints")

    @field_validator("memory_budget", "max_shard_size")
    @classmethod
    def _size(cls, value: str | None, info) -> str | None:
        from dlp.resources import parse_size

        if value is not None:
            parse_size(value, "the value")
        return value

    def budget_bytes(self) -> int | None:
        from dlp.resources import parse_size

        return None if self.memory_budget is None else parse_size(self.memory_budget)


class RecoverySection(_Section):
    """LoRA recovery fine-tuning of the pruned model (the ``recover`` stage; see :mod:`dlp.recovery`).
    Bounds and defaults from :mod:`dlp.bounds` (the CPU defaults: minutes for the bundled model)."""

    steps: int = Field(bounds.DEFAULT_RECOVERY_STEPS, **bounds.RECOVERY_STEPS.field(), description="optimizer steps")
    lr: float = Field(bounds.DEFAULT_RECOVERY_LR, **bounds.RECOVERY_LR.field(), description="AdamW learning rate (linear decay to 0)")
    rank: int = Field(bounds.DEFAULT_LORA_RANK, **bounds.LORA_RANK.field(), description="LoRA rank r")
    alpha: float = Field(bounds.DEFAULT_LORA_ALPHA, **bounds.LORA_ALPHA.field(), description="LoRA alpha (update scaled by alpha / r)")
    dropout: float = Field(bounds.DEFAULT_LORA_DROPOUT, **bounds.LORA_DROPOUT.field())
    target_modules: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: list(bounds.DEFAULT_RECOVERY_TARGETS), min_length=1,
        description="block linears that get an adapter, e.g. [q_proj, v_proj]")
    seqlen: int = Field(bounds.DEFAULT_RECOVERY_SEQLEN, **bounds.SEQLEN.field(), description="tokens per training window")
    batch: int = Field(bounds.DEFAULT_RECOVERY_BATCH, **bounds.RECOVERY_BATCH.field(), description="windows per step")
    data: str | None = Field(None, min_length=1, description="training text (None: the calibration source); "
                                                             "windows disjoint from the calibration windows")
    seed: int = bounds.DEFAULT_RECOVERY_SEED
    merge: Literal[bounds.MERGE_MODES] = Field(  # type: ignore[valid-type]
        bounds.DEFAULT_MERGE, description="masked keeps every zero; none keeps the adapter unmerged (an MLflow "
                                          "artifact beside the sparse model); plain densifies (for comparison)")
    save_every: int = Field(bounds.DEFAULT_SAVE_EVERY, **bounds.SAVE_EVERY.field(), description="steps between training states saved to the store")


class StorageSection(_Section):
    uri: str | None = Field(None, description="artifact store: path, file:///abs/path or s3://bucket/prefix")
    endpoint_url: str | None = Field(None, description="S3 endpoint (default: $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL)")
    region: str | None = None


def _env_data_dir() -> str | None:
    return os.environ.get("DLP_DATA_DIR") or None


class JobConfig(_Section):
    name: str | None = Field(None, description="free-form job name (run names, logs)")
    model: ModelSection = Field(default_factory=ModelSection)
    calibration: CalibrationSection = Field(default_factory=CalibrationSection)
    pruning: PruningSection = Field(default_factory=PruningSection)
    quantization: QuantizationSection | None = Field(None, description="optional quantize stage after prune")
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    recovery: RecoverySection | None = Field(None, description="LoRA recovery after pruning (absent: no recover stage)")
    registry: RegistrySection = Field(default_factory=RegistrySection)
    storage: StorageSection = Field(default_factory=StorageSection)
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    workdir: str = Field(".dlp-work", min_length=1)
    data_dir: str | None = Field(default_factory=_env_data_dir, description="shared data folder (default: $DLP_DATA_DIR)")

    @model_validator(mode="after")
    def _derive(self) -> "JobConfig":
        if self.registry.model_name is None:
            self.registry.model_name = derive_model_name(self.model.source)
        if self.recovery is not None and self.recovery.merge == "none" and self.quantization is not None:
            raise ValueError("quantization needs the adapter merged: set recovery.merge to masked, or drop the "
                             "quantization block")
        return self

    # -- helpers for tasks / flows
    @property
    def workdir_path(self) -> Path:
        return Path(self.workdir).expanduser().resolve()

    @property
    def storage_uri(self) -> str:
        """The artifact store URI with the default filled in (``<workdir>/artifacts`` as a file URI)."""
        return self.storage.uri or (self.workdir_path / "artifacts").as_uri()

    def variant_name(self) -> str:
        """Short human label, e.g. ``wanda-dlp-p0.7-a0.15-median-unstructured``."""
        p = self.pruning
        parts = [p.method, p.allocation, f"p{p.sparsity:g}"]
        if p.allocation == "dlp":
            parts += [f"a{p.alpha:g}" if isinstance(p.alpha, float) else "a-auto", p.statistic]
        elif p.allocation == "owl":
            parts += [f"m{p.owl_m:g}", f"l{p.owl_lambda:g}"]
        parts.append(p.pattern.replace(":", "of"))
        if p.mode != "sequential":
            parts.append(p.mode)
        if self.recovery is not None:
            parts.append(f"lora{self.recovery.steps}" + {"none": "-adapter", "plain": "-plain"}.get(self.recovery.merge, ""))
        q = self.quantization
        if q is not None:
            parts.append(f"w{q.bits}g{q.group_size}-{q.method}")
        return "-".join(parts)

    def flat_params(self) -> dict[str, str]:
        """Flat ``{"pruning.alpha": "0.15", ...}`` view of the resolved config: the variant run's MLflow params."""
        from pipeline.variant_logging import flat_params

        return flat_params(self.model_dump(mode="json"))

    def section_hash(self, *paths: str) -> str:
        """sha256 of the canonical JSON of the given dotted sections (e.g. ``"model", "calibration"``):
        a stable cache-key ingredient across processes and machines."""
        data = self.model_dump(mode="json")
        picked = {}
        for p in paths:
            node: Any = data
            for part in p.split("."):
                if not isinstance(node, dict) or part not in node:
                    raise KeyError(f"no job setting {p!r}")
                node = node[part]
            picked[p] = node
        blob = json.dumps(picked, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def derive_model_name(source: str) -> str:
    """Registered-model name from the base model: ``smollm2-135m`` -> ``smollm2-135m-dlp``,
    ``meta-llama/Llama-2-7b-hf`` -> ``llama-2-7b-hf-dlp``, ``/m/SmolLM2-135M.Q8_0.gguf`` -> ``smollm2-135m.q8_0-dlp``."""
    s = str(source).rstrip("/\\")
    base = re.split(r"[/\\]", s)[-1] or s
    if base.lower().endswith(".gguf"):
        base = base[: -len(".gguf")]
    base = re.sub(r"[^a-z0-9._-]+", "-", base.lower()).strip("-.") or "model"
    return f"{base}-dlp"


# ============================================================================================ loading
def load_job(path: str | os.PathLike[str] | None = None, overrides: Mapping[str, Any] | None = None) -> JobConfig:
    """Load and validate a job: the YAML file (or built-in defaults when path is None) plus dotted-key
    overrides applied BEFORE validation. Raises :class:`JobError` (one line)."""
    where = f"job file {path}" if path is not None else "job settings"
    data = read_yaml(path) if path is not None else {}
    return load_job_data(data, overrides, where=where)


def load_job_data(
    data: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None = None, *, where: str = "job settings"
) -> JobConfig:
    """Validate a job given as a mapping (the parsed YAML document) plus dotted-key overrides.
    Raises :class:`JobError` (one line, prefixed with ``where``)."""
    if data is not None and not isinstance(data, Mapping):
        raise JobError(f"{where}: expected a mapping of sections (model, calibration, pruning, ...), got {show(data)}")
    merged = apply_overrides(dict(data or {}), overrides)
    try:
        return JobConfig.model_validate(merged)
    except ValidationError as e:
        msg = first_problem(e, JobConfig, set(_norm_keys(overrides)), merged)
        raise JobError(f"{where}: {msg}".replace("\n", " ")) from None


def _norm_keys(overrides: Mapping[str, Any] | None) -> list[str]:
    return [".".join(p for p in str(k).split(".") if p) for k in (overrides or {})]


def resolve_job(job: Mapping[str, Any] | None = None, job_file: str | os.PathLike[str] | None = None,
                overrides: Mapping[str, Any] | None = None):
    """The validated :class:`pipeline.jobconfig.JobConfig` (demo job when neither job nor job_file is given),
    with the workdir and data folder made absolute. Raises JobError / DLPError (one line)."""
    if job is not None and job_file is not None:
        raise JobError("give either a job mapping or a job file, not both")
    if job is None:
        cfg = load_job(job_file if job_file is not None else DEMO_JOB, overrides)
    else:
        cfg = load_job_data(job, overrides)
    cfg.workdir = str(cfg.workdir_path)
    if cfg.data_dir:
        cfg.data_dir = str(Path(cfg.data_dir).expanduser().resolve())
    return cfg
