"""Stage 5 -- evaluate a model: WikiText-2 perplexity and (when configured) zero-shot accuracy.

One implementation serves the dense baseline (stage ``baseline``: the base model, cached once per base
model + evaluation settings, shared by every variant) and the pruned variant (stage ``evaluate``).
Perplexity and zero-shot are cached separately (``eval/perplexity/<key>.json``, ``eval/zero_shot/<key>.json``),
so adding zero-shot tasks never recomputes a perplexity. Keys:

- perplexity: the target (``dense``: model fingerprint + dtype; ``pruned``: the prune key + dtype), the
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
    file_set_fingerprint,
    hook,
    json_put,
    materialize,
    read_json_artifact,
    run_cached,
    stage_logger,
    text_fingerprint,
)
from tasks.stage import as_state, stage_task


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
def target_id(target: Mapping[str, Any], dtype: str) -> dict[str, Any]:
    if target["kind"] == "dense":
        return {"kind": "dense", "model": target["model"]["ref"]["fingerprint"], "dtype": dtype}
    return {"kind": "pruned", "prune": target["prune"]["key"], "dtype": dtype}


def part_keys(target: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """{"perplexity": (key, artifact_key), "zero_shot": (key, artifact_key)} for the configured parts."""
    tid = target_id(target, spec["dtype"])
    out: dict[str, tuple[str, str]] = {}
    ppl = spec.get("perplexity")
    if ppl:
        k = content_key("perplexity", target=tid, text=ppl["text_fp"], tokenizer=target["model"]["tokenizer_fp"],
                        seqlen=ppl["seqlen"], max_windows=ppl["max_windows"])
        out["perplexity"] = (k, f"eval/perplexity/{k}.json")
    zs = spec.get("zero_shot")
    if zs:
        k = content_key("zero_shot", target=tid, tasks=zs["tasks"], limit=zs["limit"], evalsets=zs["evalsets_fp"],
                        harness=zs["harness_version"])
        out["zero_shot"] = (k, f"eval/zero_shot/{k}.json")
    return out


def _keys(p: dict[str, Any]) -> list[tuple[str, str]]:
    return list(part_keys(p["target"], p["spec"]).values())


def evaluation_key(target: Mapping[str, Any], spec: Mapping[str, Any]) -> str:
    parts = part_keys(target, spec)
    return content_key("evaluate", parts={k: v[0] for k, v in sorted(parts.items())})


# ============================================================================================ compute
def run_evaluation(store: Mapping[str, Any], target: Mapping[str, Any], spec: Mapping[str, Any], stage: str = "evaluate") -> dict[str, Any]:
    """Evaluate the target; each part is read from the store when cached, the model is loaded at most once."""
    sspec = StoreSpec.of(store)
    logger = stage_logger(stage)
    parts = part_keys(target, spec)
    loaded: dict[str, Any] = {}

    def model_and_tokenizer():
        if "net" not in loaded:
            from dlp.models import ModelRef, load_model

            if target["kind"] == "dense":
                ref = ModelRef(**target["model"]["ref"])
            else:
                folder = materialize(sspec, target["prune"]["manifest"])
                ref = ModelRef(source=str(folder), path=str(folder), revision=None,
                               fingerprint=target["prune"]["manifest"]["sha256"], kind="folder")
            t0 = time.perf_counter()
            loaded["net"], loaded["tok"], _ = load_model(ref, dtype=spec["dtype"], trust_remote_code=spec.get("trust_remote_code", False))
            loaded["load_s"] = time.perf_counter() - t0
        return loaded["net"], loaded["tok"]

    results: dict[str, Any] = {}
    computed = False
    if "perplexity" in parts:
        key, artifact_key = parts["perplexity"]
        ppl = spec["perplexity"]

        def compute_ppl(st):
            from dlp import data
            from dlp.models import resolve_device
            from dlp.perplexity import perplexity

            hook(stage, "start")
            net, tok = model_and_tokenizer()
            t0 = time.perf_counter()
            ids = data.evaluation_tokens(tok, data.load_text(ppl["data"], spec.get("data_dir")))
            total = ids.shape[1] // ppl["seqlen"]
            if ppl["max_windows"]:
                total = min(total, ppl["max_windows"])
            done = [0, time.monotonic()]

            def progress(n: int) -> None:
                done[0] += n
                if time.monotonic() - done[1] >= 5.0 or done[0] >= total:
                    done[1] = time.monotonic()
                    logger.info("%s: perplexity %d/%d windows", stage, done[0], total)

            res = perplexity(net, ids, ppl["seqlen"], max_windows=ppl["max_windows"], device=resolve_device(spec.get("device")),
                             progress=progress)
            secs = round(time.perf_counter() - t0, 3)
            logger.info("%s: %s perplexity %.3f over %d x %d tokens (%.1fs)", stage, target["kind"], res["ppl"],
                        res["windows"], res["seqlen"], secs)
            body = {**res, "data": ppl["data"], "target": target_id(target, spec["dtype"])}
            return json_put(st, artifact_key, body), {**res, "compute_seconds": secs}

        r = run_cached(sspec, "perplexity", key, artifact_key, compute_ppl)
        computed |= r["computed"]
        results["perplexity"] = r
    if "zero_shot" in parts:
        key, artifact_key = parts["zero_shot"]
        zs = spec["zero_shot"]

        def compute_zs(st):
            from dlp.models import resolve_device
            from dlp.zeroshot import evaluate_zero_shot  # the integration point (lazy: lm-eval is heavy)

            hook(stage, "start")
            net, tok = model_and_tokenizer()
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

        r = run_cached(sspec, "zero_shot", key, artifact_key, compute_zs)
        computed |= r["computed"]
        results["zero_shot"] = r
    hook(stage, "computed" if computed else "hit")
    main = results.get("perplexity") or results.get("zero_shot")
    out: dict[str, Any] = {
        "stage": stage,
        "key": evaluation_key(target, spec),
        "computed": computed,
        "manifest": main["manifest"] if main else None,
        "parts": results,
        "ppl": results["perplexity"]["manifest"]["figures"]["ppl"] if "perplexity" in results else None,
        "zero_shot": None,
        "compute_seconds": round(sum(r["manifest"]["figures"].get("compute_seconds", 0.0) for r in results.values()
                                     if r["computed"]) + loaded.get("load_s", 0.0), 3),
    }
    if "zero_shot" in results:
        out["zero_shot"] = read_json_artifact(sspec, results["zero_shot"]["manifest"])
    return out


@stage_task("evaluate")
def evaluate_task(store: dict[str, Any], target: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    return as_state(run_evaluation(store, target, spec, "evaluate"))


@stage_task("baseline")
def baseline_task(store: dict[str, Any], target: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    return as_state(run_evaluation(store, target, spec, "baseline"))
