"""Stage 5 -- evaluate a model: WikiText-2 perplexity and (when configured) zero-shot accuracy.

One implementation serves the dense baseline (stage ``baseline``: the base model, cached once per base
model + evaluation settings, shared by every variant) and the pruned variant (stage ``evaluate``).
Perplexity and zero-shot are cached separately (``eval/perplexity/<key>.json``, ``eval/zero_shot/<key>.json``),
so adding zero-shot tasks never recomputes a perplexity. Keys:

- perplexity: the target (``dense``: model fingerprint + dtype; ``pruned``: the prune key + dtype;
  ``quantized``: the quantize key + dtype, evaluated on its load-back, see :mod:`pipeline.stages.quantize`), the
  evaluation text's content hash, the tokenizer hash, seqlen, max_windows;
- zero-shot: the target, the resolved task list, limit, the evaluation files' content hash and the lm-eval
  version.

Thin over :func:`dlp.perplexity.perplexity` and :func:`dlp.zeroshot.evaluate_zero_shot` (imported lazily).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

from pipeline.cache import (
    StoreSpec,
    content_key,
    derived_folder,
    engine_progress,
    file_set_fingerprint,
    hook,
    json_put,
    materialize,
    read_json_artifact,
    run_cached,
    stage_logger,
    text_fingerprint,
)
from pipeline.recovery_logging import unmerged_adapter
from pipeline.results import EvaluationResult, StageResult


# ============================================================================================ settings
def evaluation_spec(job: Any) -> dict[str, Any]:
    """The evaluation settings of a :class:`pipeline.jobconfig.JobConfig`, with the content hashes of the
    evaluation data filled in (cheap: reads and hashes the text / evaluation files, no tokenizing)."""
    from dlp import data

    ev = job.evaluation
    spec: dict[str, Any] = {
        "dtype": job.model.dtype,
        "device": job.model.device,
        "trust_remote_code": job.model.trust_remote_code,
        "memory_budget": job.resources.budget_bytes(),
        "data_dir": job.data_dir,
        "perplexity": None,
        "zero_shot": None,
    }
    if ev.perplexity is not None:
        text = data.load_text(ev.perplexity.data, job.data_dir)
        spec["perplexity"] = {
            "data": ev.perplexity.data,
            "seqlen": ev.perplexity.seqlen,
            "max_windows": ev.perplexity.max_windows,
            "text_fp": text_fingerprint(text),
        }
    tasks = ev.zero_shot.resolved_tasks()
    if tasks:
        spec["zero_shot"] = zero_shot_spec(tasks, ev.zero_shot.limit, job.data_dir)
    return spec


def zero_shot_spec(tasks: list[str], limit: int | None, data_dir: str | None) -> dict[str, Any]:
    """Resolved task names + content hash of their local evaluation files (dlp.zeroshot's local tasks)."""
    from importlib import metadata

    try:
        from dlp import zeroshot
    except ImportError as e:  # the integration point: dlp.zeroshot.evaluate_zero_shot
        raise RuntimeError(f"zero-shot evaluation needs dlp.zeroshot ({e})") from e
    names = zeroshot.resolve_tasks(tasks, "local")
    root = Path(data_dir) if data_dir else None
    if root is None:
        from dlp import settings

        root = settings.data_dir()
    files: list[str] = []
    fp = "none"
    if root is not None:
        base = root / "evalsets"
        for name in names:
            for folder in {base / name, base / name.split("_")[0]}:
                if folder.is_dir():
                    files += [p.relative_to(base).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
        fp = file_set_fingerprint(base, tuple(sorted(set(files))))
    try:
        harness = metadata.version("lm_eval")
    except metadata.PackageNotFoundError:  # pragma: no cover
        harness = "unknown"
    return {"tasks": names, "limit": limit, "evalsets_fp": fp, "harness_version": harness}


# ============================================================================================ keys
def checkpoint_target(result: StageResult, model: Any) -> dict[str, Any]:
    """The evaluation target of a stage's checkpoint: ``pruned`` for prune's, ``recovered`` for recover's (a folder
    read like prune's, keyed by its own key), ``quantized`` for quantize's."""
    if result.stage == "quantize":
        return {"kind": "quantized", "quantize": result, "model": model}
    return {"kind": "recovered" if result.stage == "recover" else "pruned", "prune": result, "model": model}


def target_id(target: Mapping[str, Any], dtype: str) -> dict[str, Any]:
    """The target of an evaluation: ``{"kind": "dense", "model": FetchResult}``, ``{"kind": "pruned",
    "prune": PruneResult, "model": FetchResult}`` or ``{"kind": "quantized", "quantize": QuantizeResult,
    "model": FetchResult}``, as it enters a cache key."""
    if target["kind"] == "dense":
        return {"kind": "dense", "model": target["model"].ref.fingerprint, "dtype": dtype}
    if target["kind"] == "quantized":
        return {"kind": "quantized", "quantize": target["quantize"].key, "dtype": dtype}
    return {"kind": "pruned", "prune": target["prune"].key, "dtype": dtype}


def part_keys(target: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """{"perplexity": (key, artifact_key), "zero_shot": (key, artifact_key)} for the configured parts."""
    tid = target_id(target, spec["dtype"])
    out: dict[str, tuple[str, str]] = {}
    ppl = spec.get("perplexity")
    if ppl:
        k = content_key("perplexity", target=tid, text=ppl["text_fp"], tokenizer=target["model"].tokenizer_fp,
                        seqlen=ppl["seqlen"], max_windows=ppl["max_windows"])
        out["perplexity"] = (k, f"eval/perplexity/{k}.json")
    zs = spec.get("zero_shot")
    if zs:
        k = content_key("zero_shot", target=tid, tasks=zs["tasks"], limit=zs["limit"], evalsets=zs["evalsets_fp"],
                        harness=zs["harness_version"])
        out["zero_shot"] = (k, f"eval/zero_shot/{k}.json")
    return out


def evaluation_key(target: Mapping[str, Any], spec: Mapping[str, Any]) -> str:
    parts = part_keys(target, spec)
    return content_key("evaluate", parts={k: v[0] for k, v in sorted(parts.items())})


# ============================================================================================ compute
ADAPTER_FOLDED = "adapter-folded"  # the derived-folder kind of such a checkpoint with the adapter folded in


def adapter_folded(spec: StoreSpec, manifest: Any) -> Path:
    """The recovered checkpoint with its unmerged adapter folded into a dense copy (:mod:`dlp.adapter_fold`: the
    same function the adapter computes), made once per checkpoint sha256 in ``<workdir>/cache/adapter-folded/``."""
    from dlp.adapter_fold import fold_adapter

    return derived_folder(spec, ADAPTER_FOLDED, manifest, fold_adapter)


class _TargetModel:
    """The evaluated model: its folder (a pruned checkpoint is materialised from the store on first use, never when
    every part is cached), streamed block by block for perplexity, loaded for zero-shot -- whole when it fits the
    memory budget, through accelerate's big-model inference with the rest offloaded past it."""

    def __init__(self, spec: StoreSpec, target: Mapping[str, Any], settings: Mapping[str, Any]):
        self.spec, self.target, self.settings = spec, target, settings
        self._ref = None
        self.load_seconds = 0.0

    def ref(self):
        if self._ref is None:
            from dlp.models import ModelRef

            t0 = time.perf_counter()
            if self.target["kind"] == "dense":
                self._ref = self.target["model"].ref.model_ref()
            elif self.target["kind"] == "quantized":  # packed weights do not stream: evaluate the load-back
                from pipeline.stages.quantize import loaded_back

                quantized = self.target["quantize"]
                folder = loaded_back(self.spec, quantized.manifest)
                self._ref = ModelRef(source=str(folder), path=str(folder), revision=None,
                                     fingerprint=quantized.manifest.sha256, kind="folder")
            else:
                prune = self.target["prune"]
                folder = materialize(self.spec, prune.manifest)
                if unmerged_adapter(folder) is not None:  # merge none: evaluate what the unmerged adapter computes
                    folder = adapter_folded(self.spec, prune.manifest)
                self._ref = ModelRef(source=str(folder), path=str(folder), revision=None,
                                     fingerprint=prune.manifest.sha256, kind="folder")
            self.load_seconds += time.perf_counter() - t0
        return self._ref

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.ref().path, trust_remote_code=self.settings.get("trust_remote_code", False))

    def streamed(self):
        from dlp.streaming import open_streamed

        return open_streamed(self.ref().path, dtype=self.settings["dtype"],
                             trust_remote_code=self.settings.get("trust_remote_code", False))

    def in_memory(self):
        from dlp.models import load_model
        from dlp.resources import default_budget

        budget = self.settings.get("memory_budget") or default_budget()
        t0 = time.perf_counter()
        net, tok, _ = load_model(self.ref(), dtype=self.settings["dtype"], max_memory=budget,
                                 offload_dir=self.spec.scratch / "offload",
                                 trust_remote_code=self.settings.get("trust_remote_code", False))
        self.load_seconds += time.perf_counter() - t0
        return net, tok


def _perplexity_part(sspec: StoreSpec, stage: str, keys: tuple[str, str], target: Mapping[str, Any],
                     spec: Mapping[str, Any], model: _TargetModel) -> StageResult:
    from dlp import data
    from dlp.models import resolve_device
    from dlp.perplexity import perplexity

    key, artifact_key = keys
    ppl, logger = spec["perplexity"], stage_logger(stage)

    def compute(st):
        hook(stage, "start")
        t0 = time.perf_counter()
        ids = data.evaluation_tokens(model.tokenizer(), data.load_text(ppl["data"], spec.get("data_dir")))
        with model.streamed() as net, engine_progress(stage):
            res = perplexity(net, ids, ppl["seqlen"], max_windows=ppl["max_windows"],
                             device=resolve_device(spec.get("device")), memory_budget=spec.get("memory_budget"),
                             spill_dir=sspec.scratch / "spill")
        secs = round(time.perf_counter() - t0, 3)
        logger.info("%s: %s perplexity %.3f over %d x %d tokens (%.1fs)", stage, target["kind"], res["ppl"],
                    res["windows"], res["seqlen"], secs)
        body = {**res, "data": ppl["data"], "target": target_id(target, spec["dtype"])}
        return json_put(st, artifact_key, body), {**res, "compute_seconds": secs}

    return run_cached(sspec, "perplexity", key, artifact_key, compute)


def _zero_shot_part(sspec: StoreSpec, stage: str, keys: tuple[str, str], spec: Mapping[str, Any],
                    model: _TargetModel) -> StageResult:
    key, artifact_key = keys
    zs, logger = spec["zero_shot"], stage_logger(stage)

    def compute(st):
        from dlp.models import resolve_device
        from dlp.zeroshot import evaluate_zero_shot  # the integration point (lazy: lm-eval is heavy)

        hook(stage, "start")
        net, tok = model.in_memory()
        t0 = time.perf_counter()
        logger.info("%s: zero-shot %s (limit %s)", stage, ", ".join(zs["tasks"]), zs["limit"])
        report = evaluate_zero_shot(net, tok, zs["tasks"], limit=zs["limit"], data_dir=spec.get("data_dir"),
                                    device=resolve_device(spec.get("device")))
        secs = round(time.perf_counter() - t0, 3)
        report.pop("samples", None)
        accs = {n: t.get("acc") for n, t in report.get("tasks", {}).items()}
        logger.info("%s: zero-shot mean acc %s (%.1fs)", stage, report.get("mean_acc"), secs)
        return json_put(st, artifact_key, report), {"acc": accs, "mean_acc": report.get("mean_acc"),
                                                    "compute_seconds": secs}

    return run_cached(sspec, "zero_shot", key, artifact_key, compute)


def run_evaluation(store: StoreSpec | Mapping[str, Any], target: Mapping[str, Any], spec: Mapping[str, Any],
                   stage: str = "evaluate") -> EvaluationResult:
    """Evaluate the target; each part is read from the store when cached, the model is loaded at most once."""
    sspec = StoreSpec.of(store)
    keys = part_keys(target, spec)
    model = _TargetModel(sspec, target, spec)
    parts: dict[str, StageResult] = {}
    if "perplexity" in keys:
        parts["perplexity"] = _perplexity_part(sspec, stage, keys["perplexity"], target, spec, model)
    if "zero_shot" in keys:
        parts["zero_shot"] = _zero_shot_part(sspec, stage, keys["zero_shot"], spec, model)
    computed = any(p.computed for p in parts.values())
    hook(stage, "computed" if computed else "hit")
    main = parts.get("perplexity") or parts.get("zero_shot")
    return EvaluationResult(
        stage=stage, key=evaluation_key(target, spec), computed=computed, manifest=main.manifest if main else None,
        parts=parts, ppl=parts["perplexity"].figures["ppl"] if "perplexity" in parts else None,
        zero_shot=read_json_artifact(sspec, parts["zero_shot"].manifest) if "zero_shot" in parts else None,
        compute_seconds=round(sum(p.compute_seconds for p in parts.values()) + model.load_seconds, 3))
