"""What the MLflow run of one pruned variant holds, logged through MLflow's fluent API into the active run:

- params: the resolved job, flattened to ``a.b.c`` keys;
- metrics: the scalar metrics plus per-block ``sparsity.block_NN`` / ``target_sparsity.block_NN`` /
  ``statistic.block_NN`` and ``sparsity.block_mean|min|max``;
- artifacts: ``sparsity/blocks.json`` (``mlflow.log_dict``), ``sparsity/sparsity.png`` (``mlflow.log_figure``),
  documents (dict -> ``log_dict``, text -> ``log_text``) and extra files or folders;
- the checkpoint, logged with ``mlflow.transformers.log_model(name="model", ...)`` (``registry.storage: dense``;
  stored as masks it is :func:`pipeline.mask_registry.log_packed_model` instead).

mlflow, matplotlib and transformers are imported lazily.
"""

from __future__ import annotations

import importlib
import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure
    from mlflow.models.model import ModelInfo

__all__ = [
    "BlockProfile",
    "default_pip_requirements",
    "flat_params",
    "log_checkpoint",
    "log_run_content",
    "require_checkpoint",
    "run_metrics",
    "sparsity_figure",
]

_PARAM_BATCH = 100  # MLflow's limit of params per log_params call
_METRIC_BATCH = 500
_PARAM_VALUE_MAX = 6000


@dataclass(frozen=True)
class BlockProfile:
    """Per-block arrays of a variant (any may be empty)."""

    achieved: Sequence[float] = ()
    target: Sequence[float] = ()
    statistic: Sequence[float] = ()
    statistic_name: str = "block statistic"

    def __bool__(self) -> bool:
        return bool(self.achieved or self.target or self.statistic)

    def to_json(self) -> dict[str, Any]:
        return {
            "achieved_sparsity": [float(x) for x in self.achieved],
            "target_sparsity": [float(x) for x in self.target],
            "statistic": [float(x) for x in self.statistic],
            "statistic_name": self.statistic_name,
        }


# ============================================================================================ params, metrics
def flat_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; keys made MLflow-safe, values cut to MLflow's length limit."""
    out: dict[str, str] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flat_params(v, key + "."))
        else:
            s = v if isinstance(v, str) else json.dumps(v, default=str)
            out[re.sub(r"[^\w\-. /:]", "_", key)] = s[:_PARAM_VALUE_MAX]
    return out


def _block_metrics(prefix: str, values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    width = max(2, len(str(len(values) - 1)))
    return {f"{prefix}.block_{i:0{width}d}": float(v) for i, v in enumerate(values)}


def run_metrics(metrics: Mapping[str, float | None], blocks: BlockProfile) -> dict[str, float]:
    """The scalar metrics plus the per-block ones; None and non-finite values are dropped."""
    out: dict[str, float] = {k: float(v) for k, v in metrics.items() if v is not None}
    out.update(_block_metrics("sparsity", blocks.achieved))
    out.update(_block_metrics("target_sparsity", blocks.target))
    out.update(_block_metrics("statistic", blocks.statistic))
    if blocks.achieved:
        achieved = [float(v) for v in blocks.achieved]
        out.setdefault("sparsity.block_mean", sum(achieved) / len(achieved))
        out.setdefault("sparsity.block_min", min(achieved))
        out.setdefault("sparsity.block_max", max(achieved))
    return {k: v for k, v in out.items() if math.isfinite(v)}


def _batches(items: Mapping[str, Any], size: int) -> Iterator[dict[str, Any]]:
    pairs = list(items.items())
    for i in range(0, len(pairs), size):
        yield dict(pairs[i : i + size])


# ============================================================================================ figure
def sparsity_figure(blocks: BlockProfile, title: str | None = None) -> "Figure":
    """Per-block sparsity (target vs achieved) with the per-block statistic on a second axis.

    A :func:`pipeline.charts.new_figure`: no global backend switch, safe in threads."""
    from pipeline.charts import new_figure

    n = len(blocks.achieved)
    fig = new_figure(max(6.0, 0.25 * n + 3), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    if blocks.target:
        ax.plot(range(len(blocks.target)), list(blocks.target), "o--", color="tab:blue", label="target sparsity",
                markersize=4)
    ax.plot(range(n), list(blocks.achieved), "s-", color="tab:orange", label="achieved sparsity", markersize=3)
    ax.set(xlabel="block", ylabel="sparsity", title=title or "per-block sparsity")
    values = [float(v) for v in [*blocks.achieved, *blocks.target] if v is not None and math.isfinite(float(v))]
    if values:
        pad = max(0.02, 0.1 * (max(values) - min(values)))
        ax.set_ylim(max(0.0, min(values) - pad), min(1.0, max(values) + pad))
    handles, labels = ax.get_legend_handles_labels()
    if blocks.statistic:
        ax2 = ax.twinx()
        ax2.plot(range(len(blocks.statistic)), list(blocks.statistic), "^:", color="tab:green",
                 label=blocks.statistic_name, markersize=3)
        ax2.set_ylabel(blocks.statistic_name)
        more_handles, more_labels = ax2.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, loc="best", fontsize="small")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


# ============================================================================================ the run
def log_run_content(
    *,
    params: Mapping[str, Any],
    metrics: Mapping[str, float | None],
    blocks: BlockProfile,
    plot_title: str,
    documents: Mapping[str, Any] | None = None,
    extra_artifacts: Mapping[str, str | Path] | None = None,
    series: Mapping[str, Sequence[float]] | None = None,
) -> None:
    """Params, metrics and artifacts into the active run.

    ``series``: metric -> values, logged as one metric history at steps 1, 2, ... (a loss curve); ``documents``: artifact file -> dict (``mlflow.log_dict``) or str (``mlflow.log_text``);
    ``extra_artifacts``: artifact folder -> a file or a folder (logged under that folder)."""
    import mlflow

    for batch in _batches(flat_params(params), _PARAM_BATCH):
        mlflow.log_params(batch)
    for batch in _batches(run_metrics(metrics, blocks), _METRIC_BATCH):
        mlflow.log_metrics(batch)
    _log_series(series or {})
    if blocks:
        mlflow.log_dict(blocks.to_json(), "sparsity/blocks.json")
    if blocks.achieved:
        mlflow.log_figure(sparsity_figure(blocks, plot_title), "sparsity/sparsity.png")
    for artifact_file, doc in (documents or {}).items():
        if isinstance(doc, str):
            mlflow.log_text(doc, artifact_file)
        else:
            mlflow.log_dict(doc, artifact_file)
    for dest, src in (extra_artifacts or {}).items():
        src_path = Path(src)
        if src_path.is_dir():
            mlflow.log_artifacts(str(src_path), artifact_path=dest)
        else:
            mlflow.log_artifact(str(src_path), artifact_path=dest or None)


def _log_series(series: Mapping[str, Sequence[float]]) -> None:
    """Each series as a stepped metric history, in batches (one request per batch, not per point)."""
    import time

    import mlflow
    from mlflow.entities import Metric

    run_id, now = mlflow.active_run().info.run_id, int(time.time() * 1000)
    points = [Metric(name, float(v), now, step) for name, values in series.items()
              for step, v in enumerate(values, start=1) if math.isfinite(float(v))]
    client = mlflow.MlflowClient()
    for i in range(0, len(points), _METRIC_BATCH):
        client.log_batch(run_id, metrics=points[i : i + _METRIC_BATCH])


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


def require_checkpoint(checkpoint_dir: str | Path) -> Path:
    """The checkpoint folder, or FileNotFoundError when it is no ``save_pretrained`` folder."""
    ckpt = Path(checkpoint_dir)
    if not (ckpt / "config.json").is_file():
        raise FileNotFoundError(f"checkpoint folder {ckpt} has no config.json (expected a save_pretrained folder)")
    return ckpt


def log_checkpoint(
    checkpoint_dir: str | Path,
    *,
    card_title: str,
    tags: Mapping[str, str],
    pip_requirements: Sequence[str] | None = None,
) -> "ModelInfo":
    """Log a ``save_pretrained`` folder (with tokenizer) into the active run as the ``model`` logged model."""
    import mlflow

    ckpt = require_checkpoint(checkpoint_dir)
    reqs = list(pip_requirements) if pip_requirements is not None else default_pip_requirements()
    with _transformers5_check_task_shim():
        return mlflow.transformers.log_model(
            transformers_model=str(ckpt.resolve()),  # absolute: never mistaken for a hub repo id
            name="model",
            task="text-generation",
            pip_requirements=reqs,
            model_card=_model_card(card_title, tags),
        )


def _model_card(title: str, tags: Mapping[str, str]):
    """A small model card (README.md in the logged model) listing the lineage tags; also stops MLflow from
    trying to fetch a card from the hub. None when huggingface_hub is unavailable."""
    try:
        from huggingface_hub import ModelCard
    except ImportError:  # pragma: no cover
        return None
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [pruned, dlp]", "---",
             f"# {title}", "", "Pruned with Dynamic Layerwise Pruning (DLP, arXiv 2505.23807).", "",
             "| lineage | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(tags.items())]
    return ModelCard("\n".join(lines) + "\n")


@contextmanager
def _transformers5_check_task_shim() -> Iterator[None]:
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
