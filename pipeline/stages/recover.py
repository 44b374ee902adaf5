"""Stage 4b (optional) -- LoRA recovery fine-tuning of the pruned checkpoint, stored as a checkpoint folder.

Thin over :mod:`dlp.recovery`: the pruned checkpoint is materialised from the store, trained with peft LoRA
on windows of the training text disjoint from the calibration windows, merged (``masked``: every pruned weight
stays exactly zero) and written as ``recover/<key>/checkpoint`` -- a standard HF folder like the prune stage's,
so evaluation and registration read it the same way. Training state (adapter, optimizer, data position, RNG)
goes to the store every ``save_every`` steps under ``recover/<key>/state/`` (:class:`StoreSaver`; local or
s3://) and a rerun after a kill resumes from it; it is deleted once the checkpoint is stored.

Key: the prune stage's key and its checkpoint's sha256, the recovery settings (all but ``save_every``), the
training text's content hash, the tokenizer hash, the calibration draw the windows avoid, the code version.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

from pipeline.cache import (
    StoreSpec,
    content_key,
    hook,
    json_put,
    materialize,
    run_cached,
    stage_logger,
    text_fingerprint,
)
from pipeline.results import FetchResult, PruneResult, RecoverResult
from pipeline.stages.prune import store_checkpoint
from pipeline.store import ArtifactMissing, hash_dir

__all__ = ["StoreSaver", "check_recovery", "recover_key", "recovery_params", "run_recover"]


# ============================================================================================ inputs
def recovery_params(cfg) -> dict[str, Any] | None:
    """What the recover stage is given from the job (plain JSON values); None without a ``recovery:`` block."""
    if cfg.recovery is None:
        return None
    c = cfg.calibration
    return {"settings": cfg.recovery.model_dump(mode="json"), "data_dir": cfg.data_dir,
            "calibration": {"source": c.source, "nsamples": c.nsamples, "seqlen": c.seqlen, "seed": c.seed},
            "device": cfg.model.device, "trust_remote_code": cfg.model.trust_remote_code}


def _settings(params: Mapping[str, Any]):
    from dlp.recovery_settings import RecoverySettings

    return RecoverySettings(**{**params["settings"], "target_modules": tuple(params["settings"]["target_modules"])})


def _plan(ref, params: Mapping[str, Any]):
    from dlp.recovery import plan_recovery

    return plan_recovery(ref, _settings(params), trust_remote_code=params.get("trust_remote_code", False),
                         calibration=params["calibration"], data_dir=params.get("data_dir"))


def check_recovery(params: Mapping[str, Any], model_path: str) -> str:
    """Plan the recovery on the base model (same architecture and tokenizer as the pruned one): bad settings,
    a target module the model lacks or a training text without a window raise :class:`DLPError` (one line)
    before calibration, pruning or training. Returns a one-line description."""
    from dlp.models import ModelRef

    ref = ModelRef(source=model_path, path=model_path, revision=None, fingerprint="preflight", kind="folder")
    plan = _plan(ref, params)
    d = plan.data
    return (f"recovery: {d['windows']} training windows of {d['seqlen']} tokens from {d['source']} "
            f"({d['distinct']} distinct, disjoint from the calibration by {d['rule']})")


def recover_key(model: FetchResult, prune: PruneResult, params: Mapping[str, Any]) -> str:
    from dlp import data
    from dlp.recovery import CODE_VERSION

    settings = {k: v for k, v in params["settings"].items() if k != "save_every"}
    source = settings["data"] or params["calibration"]["source"]
    text = data.load_text(source, params.get("data_dir"))
    return content_key("recover", prune=prune.key, checkpoint=prune.manifest.sha256 if prune.manifest else None,
                       settings=settings, text=text_fingerprint(text), tokenizer=model.tokenizer_fp,
                       calibration=params["calibration"], code=CODE_VERSION)


# ============================================================================================ training state
class StoreSaver:
    """:class:`dlp.recovery_state.StateSaver` on the artifact store: each state is a folder
    ``recover/<key>/state/step-NNNNNNNN``; ``latest.json`` beside them names the newest (written after its folder
    is complete, so a kill at any moment leaves a readable state) and the older one is deleted after it."""

    def __init__(self, spec: StoreSpec, key: str):
        self.spec, self.prefix = spec, f"recover/{key}/state"
        self.local = spec.scratch / "recover-state" / key[:32]

    def _pointer(self, st) -> dict[str, Any] | None:
        try:
            return json.loads(st.read_bytes(f"{self.prefix}/latest.json"))
        except (ArtifactMissing, ValueError):
            return None

    def save(self, step: int, folder: Path) -> None:
        st = self.spec.open()
        previous = self._pointer(st)
        put = st.put_dir(folder, f"{self.prefix}/step-{step:08d}")
        json_put(st, f"{self.prefix}/latest.json", {"step": step, "key": put.key, "sha256": put.sha256})
        if previous and previous.get("key") != put.key:
            st.delete_prefix(previous["key"])
        hook("recover", "state_saved")

    def latest(self) -> Path | None:
        st = self.spec.open()
        pointer = self._pointer(st)
        if pointer is None:
            return None
        shutil.rmtree(self.local, ignore_errors=True)
        st.get_dir(pointer["key"], self.local, verify=True)
        if hash_dir(self.local).sha256 != pointer["sha256"]:
            stage_logger("recover").warning("recover: stored training state %s is damaged; training from step 0",
                                            pointer["key"])
            return None
        stage_logger("recover").info("recover: resuming from the training state of step %d", pointer["step"])
        return self.local

    def clear(self) -> None:
        self.spec.open().delete_prefix(self.prefix)
        shutil.rmtree(self.local, ignore_errors=True)


# ============================================================================================ the stage
def run_recover(store: StoreSpec | Mapping[str, Any], model: FetchResult, prune: PruneResult,
                params: Mapping[str, Any]) -> RecoverResult:
    spec = StoreSpec.of(store)
    key = recover_key(model, prune, params)
    artifact_key = f"recover/{key}/checkpoint"

    def compute(st):
        t0 = time.perf_counter()
        out = spec.scratch / "tmp" / f"recovered-{key[:16]}"
        shutil.rmtree(out, ignore_errors=True)  # a killed run's output; its training state is in the store
        saver = StoreSaver(spec, key)
        report = _train(spec, key, prune, params, out, saver)
        hook("recover", "save")
        put, weights_sha = store_checkpoint(spec, st, out, artifact_key)
        saver.clear()
        return put, _figures(report, weights_sha, time.perf_counter() - t0)

    return run_cached(spec, "recover", key, artifact_key, compute).typed(RecoverResult)


def _train(spec: StoreSpec, key: str, prune: PruneResult, params: Mapping[str, Any], out: Path,
           saver: StoreSaver) -> dict:
    from dlp.models import ModelRef, resolve_device
    from dlp.recovery import run_recovery

    logger = stage_logger("recover")
    folder = str(materialize(spec, prune.manifest))
    ref = ModelRef(source=folder, path=folder, revision=None, fingerprint=prune.manifest.sha256, kind="folder")
    plan = _plan(ref, params)
    s = plan.settings
    logger.info("recover: LoRA r=%d alpha=%g on %s, %d steps x %d windows of %d tokens, lr %g, merge %s",
                s.rank, s.alpha, ",".join(s.target_modules), s.steps, s.batch, s.seqlen, s.lr, s.merge)
    hook("recover", "compute")
    report = run_recovery(plan, out, saver=saver, device=resolve_device(params.get("device")),
                          log=lambda line: logger.info("recover: %s", line))
    sp = report["sparsity"]
    logger.info("recover: loss %.4f -> %.4f; sparsity %.6f -> %.6f (%s)", report["loss"][0], report["loss"][-1],
                sp["before"], sp["after"], "exact" if sp["exact"] else "changed")
    return report


def _figures(report: Mapping[str, Any], weights_sha: Mapping[str, str], seconds: float) -> dict[str, Any]:
    sp = report["sparsity"]
    return {"achieved_sparsity": sp["after"], "sparsity_before": sp["before"], "zeros_before": sp["zeros_before"],
            "zeros_after": sp["zeros_after"], "exact": sp["exact"],
            "achieved_per_block": [float(a) for a in sp["per_block_after"]],
            "loss": [float(x) for x in report["loss"]], "steps": report["steps"],
            "resumed_from_step": report["resumed_from_step"], "settings": report["settings"],
            "data": report["data"], "trainable_parameters": report["trainable_parameters"],
            "train_seconds": round(report["seconds"]["train"], 3), "compute_seconds": round(seconds, 3),
            "weights_sha256": dict(weights_sha)}
