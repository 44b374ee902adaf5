"""The job file: one YAML document describing a compression run, validated with pydantic v2.

Every section forbids unknown keys: a typo is an error, never a silently ignored setting. Errors are raised as
:class:`JobError` whose message is ONE line naming the offending key and what is expected, e.g.::

    job file configs/x.yaml: unknown key 'pruning.alhpa' -- did you mean 'alpha'? (valid: allocation, alpha, ...)
    job file configs/x.yaml: 'pruning.sparsity': expected a number between 0 and 1, got 'high'

Defaults are the paper's (DLP, arXiv 2505.23807): C4 calibration 128 x 2048 tokens, seed 0, alpha 0.15,
median statistic, 70 % sparsity, WikiText-2 perplexity at seqlen 2048.

YAML note: the loader here reads ``pattern: 2:4`` as the string ``"2:4"`` (plain PyYAML would read YAML 1.1
sexagesimal ``124``) and ``1e-3`` as a number (plain PyYAML: a string). Duplicate keys are errors.

Use :func:`load_job` (file + dotted overrides) and :func:`parse_overrides` (``["pruning.alpha=0.2"]`` from a CLI).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import types
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Mapping, Union, get_args, get_origin

import annotated_types as at
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from dlp import bounds
from dlp.zeroshot import ZERO_SHOT_7

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



class JobError(ValueError):
    """Invalid job file or override. ``str()`` is one line naming the key and the fix."""


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
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
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
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    registry: RegistrySection = Field(default_factory=RegistrySection)
    storage: StorageSection = Field(default_factory=StorageSection)
    workdir: str = Field(".dlp-work", min_length=1)
    data_dir: str | None = Field(default_factory=_env_data_dir, description="shared data folder (default: $DLP_DATA_DIR)")

    @model_validator(mode="after")
    def _derive(self) -> "JobConfig":
        if self.registry.model_name is None:
            self.registry.model_name = derive_model_name(self.model.source)
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
        return "-".join(parts)

    def flat_params(self) -> dict[str, str]:
        """Flat ``{"pruning.alpha": "0.15", ...}`` view of the resolved config (MLflow params)."""
        return {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in _flatten(self.model_dump(mode="json")).items()}

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


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# ============================================================================================ YAML
class _JobLoader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1 sexagesimal numbers ('2:4' stays a string), with '1e-3' as a float and
    duplicate keys rejected."""


_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_JobLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_JobLoader.add_implicit_resolver(
    _INT,
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0x[0-9a-fA-F_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*))$"),
    list("-+0123456789"),
)
_JobLoader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^(?:[-+]?[0-9][0-9_]*(?:\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[eE][-+]?[0-9]+)"
        r"|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _construct_mapping_no_dups(loader: _JobLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen[key] = loader.construct_object(value_node, deep=deep)
    return seen


_JobLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_no_dups)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_JobLoader)  # noqa: S506 -- a SafeLoader subclass


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a job YAML file into a dict (JobError on a missing file, bad YAML or a non-mapping document)."""
    where = f"job file {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobError(f"{where}: not found") from None
    except OSError as e:
        raise JobError(f"{where}: cannot read ({e.strerror or e})") from None
    try:
        data = _yaml_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        at_line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise JobError(f"{where}: invalid YAML{at_line}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise JobError(f"{where}: expected a mapping of sections (model, calibration, pruning, ...), got {_show(data)}")
    return data


# ============================================================================================ overrides
def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["pruning.alpha=0.2", "evaluation.zero_shot.tasks=[piqa, boolq]"]`` -> dotted-key dict.

    Values are parsed as YAML scalars/lists (``0.2`` -> float, ``null`` -> None, ``auto`` -> "auto")."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise JobError(f"override {item!r}: expected KEY=VALUE, e.g. pruning.alpha=0.2")
        key, _, raw = item.partition("=")
        key = key.strip()
        if not key:
            raise JobError(f"override {item!r}: empty key")
        try:
            value = _yaml_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out[key] = value
    return out


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return a copy of data with dotted-key overrides applied (``{"pruning.alpha": 0.2}``).

    Missing intermediate sections are created; unknown keys are left for validation to report."""
    out = json.loads(json.dumps(data, default=str)) if data else {}
    for dotted, value in (overrides or {}).items():
        parts = [p for p in str(dotted).split(".") if p]
        if not parts:
            raise JobError(f"override {dotted!r}: empty key")
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                prefix = ".".join(parts[: i + 1])
                raise JobError(f"override '{dotted}': '{prefix}' is {_show(nxt)}, not a section")
            node = nxt
        node[parts[-1]] = value
    return out


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
        raise JobError(f"{where}: expected a mapping of sections (model, calibration, pruning, ...), got {_show(data)}")
    merged = apply_overrides(dict(data or {}), overrides)
    try:
        return JobConfig.model_validate(merged)
    except ValidationError as e:
        msg = _first_problem(e, set(_norm_keys(overrides)), merged)
        raise JobError(f"{where}: {msg}".replace("\n", " ")) from None


def _norm_keys(overrides: Mapping[str, Any] | None) -> list[str]:
    return [".".join(p for p in str(k).split(".") if p) for k in (overrides or {})]


# ============================================================================================ messages
def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        r = repr(list(value))
        return r if len(r) <= 60 else "a list"
    if value is None:
        return "null"
    s = repr(value)
    return s if len(s) <= 60 else s[:57] + "..."


def _unwrap(annotation: Any, metadata: list[Any]) -> tuple[Any, list[Any]]:
    while get_origin(annotation) is Annotated:
        base, *extra = get_args(annotation)
        metadata = list(metadata) + list(extra)
        annotation = base
    flat: list[Any] = []
    for m in metadata:
        if isinstance(m, FieldInfo):
            flat.extend(m.metadata)
        else:
            flat.append(m)
    return annotation, flat


def _bounds(metadata: list[Any]) -> str:
    """The field's constraint as text: `` in [0, 0.5)``, `` >= 1``, ... (from its annotated-types metadata)."""
    lo = hi = None
    for m in metadata:
        for name, side, bracket in (("ge", "lo", "["), ("gt", "lo", "("), ("le", "hi", "]"), ("lt", "hi", ")")):
            value = getattr(m, name, None)
            if value is not None and isinstance(m, (at.Ge, at.Gt, at.Le, at.Lt, at.Interval)):
                if side == "lo":
                    lo = (value, bracket)
                else:
                    hi = (value, bracket)
    if lo and hi:
        return f" in {lo[1]}{lo[0]:g}, {hi[0]:g}{hi[1]}"
    if lo:
        return f" {'>=' if lo[1] == '[' else '>'} {lo[0]:g}"
    if hi:
        return f" {'<=' if hi[1] == ']' else '<'} {hi[0]:g}"
    return ""


def _expected(annotation: Any, metadata: list[Any] | None = None) -> str:
    annotation, metadata = _unwrap(annotation, list(metadata or []))
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = get_args(annotation)
        parts = [_expected(a) for a in args if a is not type(None)]
        text = " or ".join(parts)
        return text + " or null" if type(None) in args else text
    if origin is Literal:
        vals = get_args(annotation)
        return repr(vals[0]) if len(vals) == 1 else "one of " + ", ".join(repr(v) for v in vals)
    if origin in (list, tuple, set):
        inner = get_args(annotation)
        what = {str: "strings", int: "integers", float: "numbers"}.get(inner[0] if inner else None, "values")
        return f"a list of {what}"
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "an integer" + _bounds(metadata)
    if annotation is float:
        return "a number" + _bounds(metadata)
    if annotation is str:
        return "a non-empty string" if any(isinstance(m, at.MinLen) and m.min_length > 0 for m in metadata) else "a string"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "a mapping with keys " + ", ".join(sorted(annotation.model_fields))
    return getattr(annotation, "__name__", str(annotation))


def _resolve_loc(loc: tuple[Any, ...]) -> tuple[str, FieldInfo | None, type[BaseModel] | None, bool]:
    """Map a pydantic error loc to (dotted key, field info, owning model, is_unknown_key)."""
    model: type[BaseModel] | None = JobConfig
    parts: list[str] = []
    info: FieldInfo | None = None
    owner: type[BaseModel] | None = JobConfig
    for i, item in enumerate(loc):
        if model is None:
            if isinstance(item, int):
                parts[-1] = f"{parts[-1]}[{item}]"
            continue  # union tags like 'float' / "literal['auto']"
        if not isinstance(item, str):
            break
        if item not in model.model_fields:
            return ".".join(parts + [item]), None, model, True
        parts.append(item)
        owner = model
        info = model.model_fields[item]
        ann, _ = _unwrap(info.annotation, [])
        args = [a for a in (get_args(ann) or (ann,)) if a is not type(None)]
        nested = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        model = nested[0] if nested and len(args) == 1 else None
    return ".".join(parts), info, owner, False


def _lookup(data: Any, dotted: str) -> tuple[bool, Any]:
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _first_problem(err: ValidationError, override_keys: set[str], data: Mapping[str, Any] | None = None) -> str:
    """One line for the first offending key (unknown keys first), plus a count of the others."""
    errors = err.errors(include_url=False)
    described: dict[str, str] = {}
    unknown_keys: list[str] = []
    for e in errors:
        key, info, owner, unknown = _resolve_loc(tuple(e.get("loc", ())))
        key = key.split("[", 1)[0]  # a bad list item is reported on its field, with the whole value
        if key in described:
            continue
        from_override = key in override_keys or any(k.startswith(key + ".") for k in override_keys)
        source = " (set by override)" if from_override else ""
        if unknown or e.get("type") == "extra_forbidden":
            unknown_keys.append(key)
            name = key.rsplit(".", 1)[-1]
            valid = sorted(owner.model_fields) if owner is not None else []
            close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
            hint = f" -- did you mean '{close[0]}'?" if close else ""
            described[key] = f"unknown key '{key}'{source}{hint} (valid: {', '.join(valid)})"
        elif e.get("type") == "missing":
            described[key] = f"'{key}' is required{source}"
        elif info is not None:
            expected = _expected(info.annotation, list(info.metadata))
            found, value = _lookup(data, key) if data is not None else (False, None)
            described[key] = f"'{key}'{source}: expected {expected}, got {_show(value if found else e.get('input'))}"
        else:
            described[key] = f"'{key or '(top level)'}'{source}: {e.get('msg', 'invalid value')}"
    keys = unknown_keys + [k for k in described if k not in unknown_keys]
    msg = described[keys[0]]
    if len(keys) > 1:
        msg += f" (and {len(keys) - 1} more: {', '.join(repr(k) for k in keys[1:4])}{', ...' if len(keys) > 4 else ''})"
    return msg


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
