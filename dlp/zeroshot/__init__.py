"""Zero-shot evaluation through lm-eval 0.4.x, offline.

The project ships task definitions (``dlp/zeroshot/tasks/*.yaml``) that mirror the stock lm-eval tasks
(same prompts, choices, targets, metrics, output type and version) but read the local evaluation files
under ``<data_dir>/evalsets/`` (see :mod:`dlp.zeroshot.docs`). lm-eval's own ``TaskManager(include_path=...)``
indexes them; the folder reaches their loaders as task metadata (``data_dir``). ``tasks_source="hub"`` runs the stock
tasks by name instead (needs internet).

    from dlp.zeroshot import evaluate_zero_shot
    report = evaluate_zero_shot(model, tokenizer, "zero-shot-7", limit=100)
    report["tasks"]["arc_easy"]["acc"], report["mean_acc"]
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from ..errors import DLPError
from . import docs

ZERO_SHOT_7 = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
ALL_TASKS = ZERO_SHOT_7 + ["piqa", "lambada_openai"]
TASK_GROUPS: dict[str, list[str]] = {"zero-shot-7": ZERO_SHOT_7, "all": ALL_TASKS}
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
TASK_SOURCES = ("local", "hub")

__all__ = [
    "ZERO_SHOT_7", "ALL_TASKS", "TASK_GROUPS", "TASKS_DIR", "check_data", "evaluate_zero_shot", "resolve_tasks",
    "load_tasks", "task_manager", "evalsets_dir",
]

evalsets_dir = docs.evalsets_dir


# --------------------------------------------------------------------------- task definitions
def resolve_tasks(tasks: list[str] | str, tasks_source: str = "local") -> list[str]:
    """Expand group names ("zero-shot-7", "all") and comma lists into task names, in order, no repeats.

    With ``tasks_source="local"`` every name must be one of :data:`ALL_TASKS`; with "hub" names pass through.
    """
    if isinstance(tasks, str):
        tasks = [tasks]
    if not isinstance(tasks, (list, tuple)) or not all(isinstance(t, str) for t in tasks):
        raise DLPError(f"tasks must be a task name, a group name or a list of names; got {tasks!r}")
    names: list[str] = []
    for item in tasks:
        for part in (p.strip() for p in item.split(",")):
            if not part:
                continue
            for name in TASK_GROUPS.get(part, [part]):
                if name not in names:
                    names.append(name)
    if not names:
        raise DLPError(f"no tasks given; use one of: {', '.join(ALL_TASKS)} or a group ({', '.join(TASK_GROUPS)})")
    if tasks_source == "local":
        unknown = [n for n in names if n not in ALL_TASKS]
        if unknown:
            raise DLPError(f"unknown task(s) {', '.join(unknown)}; valid tasks: {', '.join(ALL_TASKS)}; "
                           f"groups: {', '.join(TASK_GROUPS)}")
    return names


def check_data(names: list[str], data_dir: str | Path | None = None) -> Path:
    """The ``evalsets/`` folder, once every file the local tasks ``names`` read is there (else a DLPError)."""
    evalsets = docs.evalsets_dir(data_dir)
    for name in names:
        docs.check_files(name, evalsets)
    return evalsets


class _QuietCustomDataset(logging.Filter):
    """Drops lm-eval's per-task hint about --metadata, logged for every task with a custom_dataset."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


_QUIET = _QuietCustomDataset()


def task_manager(evalsets: Path | None):
    """lm-eval's ``TaskManager``: the shipped task files (``include_path``, no built-in index) whose loaders
    get ``data_dir`` from the task metadata; ``evalsets=None``: the stock tasks (hub)."""
    from lm_eval.tasks import TaskManager

    task_logger = logging.getLogger("lm_eval.api.task")
    if _QUIET not in task_logger.filters:
        task_logger.addFilter(_QUIET)
    if evalsets is None:
        return TaskManager()
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(evalsets)})


def load_tasks(tasks: list[str] | str, data_dir: str | Path | None = None) -> dict[str, Any]:
    """Build the shipped lm-eval ``Task`` objects (data loaded), keyed by task name."""
    names = resolve_tasks(tasks, "local")
    return task_manager(check_data(names, data_dir)).load(names)["tasks"]


# --------------------------------------------------------------------------- evaluation
def _number(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _jsonable(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj, default=str))


def _summarise(name: str, raw: dict) -> dict[str, Any]:
    metrics = raw["results"].get(name, {})
    entry: dict[str, Any] = {}
    for key, value in metrics.items():
        metric, sep, filt = key.partition(",")
        if sep and filt == "none":  # "acc,none", "acc_stderr,none", ...
            entry[metric] = _number(value)
    n = raw.get("n-samples", {}).get(name, {})
    entry["n_samples"] = int(n.get("effective", n.get("original", 0)))
    version = raw.get("versions", {}).get(name)
    entry["version"] = version if isinstance(version, (int, float, str)) or version is None else str(version)
    return entry


def _check_arguments(limit: Any, batch_size: Any, tasks_source: str) -> None:
    if tasks_source not in TASK_SOURCES:
        raise DLPError(f"unknown tasks_source '{tasks_source}'; use 'local' (offline files) or 'hub'")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise DLPError(f"limit must be a positive integer (documents per task) or None for all; got {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise DLPError(f"batch_size must be a positive integer; got {batch_size!r}")


def _wrap(model, tokenizer, device: str, batch_size: int):
    """lm-eval's HFLM around the in-memory model (moved to ``device`` in place, never saved or reloaded). A model
    dispatched by accelerate (``device_map``, weights offloaded to disk) stays where accelerate put it, and its
    inputs go to ``device``."""
    import torch
    from lm_eval.models.huggingface import HFLM

    dispatched = bool(getattr(model, "hf_device_map", None))
    if device and not dispatched and str(getattr(model, "device", device)) != str(device):
        model.to(device)
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    if dispatched:
        lm._device = torch.device(device or "cpu")  # its first weight may sit on the meta device (offloaded)
    return lm


def _simple_evaluate(lm, names: list[str], manager, tasks_source: str, *, seed: int, **options: Any) -> dict | None:
    """``lm_eval.simple_evaluate`` zero-shot, seeded, without request caches; hub failures as one DLPError."""
    import lm_eval

    try:
        return lm_eval.simple_evaluate(
            model=lm, tasks=names, task_manager=manager, num_fewshot=0, use_cache=None, cache_requests=False,
            rewrite_requests_cache=False, delete_requests_cache=False, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed, **options)
    except KeyError as exc:  # hub mode: lm-eval does not know a name
        if tasks_source != "hub":
            raise
        raise DLPError(f"lm-eval does not know task {exc}; check the name with `lm_eval ls tasks`") from exc
    except (ConnectionError, OSError) as exc:
        if tasks_source != "hub":
            raise
        raise DLPError(f"cannot fetch the stock task data from the hub ({type(exc).__name__}: {exc}); check the "
                       "network, or use tasks_source='local' with DLP_DATA_DIR") from exc


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def evaluate_zero_shot(
    model,
    tokenizer,
    tasks: list[str] | str,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    data_dir: str | Path | None = None,
    tasks_source: str = "local",
    seed: int = 1234,
    log_samples: bool = False,
    device: str = "cpu",
    bootstrap_iters: int = 1000,
) -> dict[str, Any]:
    """Zero-shot accuracy of an in-memory causal LM on lm-eval tasks; returns a JSON-able report.

    ``tasks``: task names, a group ("zero-shot-7", "all") or a comma list. ``limit``: first N documents
    of each task (None = all). ``data_dir``: the folder holding ``evalsets/`` (default: ``DLP_DATA_DIR``).
    ``tasks_source="hub"`` runs the stock lm-eval tasks by name (needs internet). The model is moved to
    ``device`` in place and wrapped without saving or reloading; no request or response cache is used.
    ``bootstrap_iters`` only affects the bootstrapped perplexity stderr of lambada_openai (lm-eval's CLI
    default is 100000, minutes on 2 cores); accuracy stderrs are closed-form.

    Returns ``{"tasks": {name: {"acc", "acc_stderr", ["acc_norm", "acc_norm_stderr"], [...], "n_samples",
    "version"}}, "mean_acc", "mean_acc_norm", "harness_version", "limit", "tasks_source", ...}``.
    """
    _check_arguments(limit, batch_size, tasks_source)
    names = resolve_tasks(tasks, tasks_source)
    manager = task_manager(check_data(names, data_dir) if tasks_source == "local" else None)
    lm = _wrap(model, tokenizer, device, batch_size)
    raw = _simple_evaluate(lm, names, manager, tasks_source, seed=seed, limit=limit, log_samples=log_samples,
                           bootstrap_iters=bootstrap_iters)
    if raw is None:  # not rank 0 (never the case for an in-memory model)
        return {}
    import lm_eval

    per_task = {name: _summarise(name, raw) for name in names}
    report: dict[str, Any] = {
        "tasks": per_task,
        "mean_acc": _mean([t.get("acc") for t in per_task.values()]),
        "mean_acc_norm": _mean([t.get("acc_norm") for t in per_task.values()]),
        "harness_version": lm_eval.__version__, "limit": limit, "tasks_source": tasks_source, "num_fewshot": 0,
        "seed": seed, "batch_size": batch_size,
    }
    if log_samples:
        report["samples"] = _jsonable(raw.get("samples", {}))
    return report
