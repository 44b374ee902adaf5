"""Recovery fine-tuning of a pruned checkpoint: LoRA through peft, merged so the sparsity stays exact.

Two calls, so a command can refuse bad input before any expensive work:

- :func:`plan_recovery` checks the settings, the checkpoint, the target modules (on a weightless copy of the
  model built from its config) and draws the training windows -- from the calibration source named in the
  checkpoint's ``dlp_report.json`` unless ``settings.data`` says otherwise, disjoint from the calibration
  windows (see :func:`dlp.data.training_windows`);
- :func:`run_recovery` loads the model, trains (:mod:`dlp.recovery_train`, resumable through a
  :class:`~dlp.recovery_state.StateSaver`), merges (:mod:`dlp.recovery_merge`) and writes a standard HF
  checkpoint with ``recovery_report.json`` beside ``dlp_report.json`` (and ``adapter/`` for merge ``none``).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import data
from .adapter_fold import ADAPTER_DIR
from .checkpoint import REPORT_NAME, save_checkpoint
from .decoder import find_decoder
from .errors import DLPError
from .models import DTYPES, ModelRef, load_model, native_dtype_name, resolve_model
from .recovery_merge import block_sparsity, cast_keeping_support_, merge, prunable_weights, zero_counts
from .recovery_settings import RecoverySettings
from .recovery_state import StateSaver
from .recovery_train import add_lora, check_targets, train

RECOVERY_REPORT = "recovery_report.json"
CODE_VERSION = "recovery-1"  # part of the run key: bump when training or merging changes its results


@dataclass
class RecoveryPlan:
    """A checked recovery run: the pruned checkpoint, the settings and the training windows."""

    ref: ModelRef
    settings: RecoverySettings
    tokenizer: object
    windows: torch.Tensor
    data: dict
    prune_report: dict | None = None
    trust_remote_code: bool = False
    seconds: float = 0.0
    key: str = field(init=False)

    def __post_init__(self):
        parts = [CODE_VERSION, self.ref.fingerprint, self.settings.fingerprint(), self.data["fingerprint"]]
        self.key = hashlib.sha256("\0".join(parts).encode()).hexdigest()


def read_prune_report(folder: str | Path) -> dict | None:
    path = Path(folder) / REPORT_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def block_linear_names(path: str, trust_remote_code: bool = False) -> list[str]:
    """The linears of one decoder block (``self_attn.q_proj``...), from a weightless model built on ``meta``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return list(find_decoder(skeleton).linears(0))


def plan_recovery(model: str | Path | ModelRef, settings: RecoverySettings, *, trust_remote_code: bool = False,
                  calibration: dict | None = None, data_dir: str | Path | None = None) -> RecoveryPlan:
    """Check everything a recovery run needs and draw its training windows; loads no weights.

    ``calibration`` (``{"source", "nsamples", "seqlen", "seed"}``) names the calibration draw the training
    windows avoid when the checkpoint's ``dlp_report.json`` does not (the pipeline passes its own)."""
    from transformers import AutoTokenizer

    start = time.perf_counter()
    settings.validate()
    ref = model if isinstance(model, ModelRef) else resolve_model(str(model))
    check_targets(block_linear_names(ref.path, trust_remote_code), settings.target_modules)
    report = read_prune_report(ref.path)
    calibration = calibration or (report or {}).get("calibration") or None
    source = settings.data or (calibration or {}).get("source") or "c4"
    text = data.load_text(source, data_dir)
    exclude = None
    if calibration and calibration.get("source") == source:
        exclude = (int(calibration["nsamples"]), int(calibration["seqlen"]), int(calibration["seed"]))
    tokenizer = AutoTokenizer.from_pretrained(ref.path, trust_remote_code=trust_remote_code)
    windows, info = data.training_windows(tokenizer, text, settings.windows, settings.seqlen, settings.seed, exclude)
    info.update(source=source, kind=text.kind, windows=int(windows.shape[0]), seqlen=settings.seqlen,
                fingerprint=data.fingerprint_tokens(windows),
                disjoint_from=None if exclude is None else dict(zip(("nsamples", "seqlen", "seed"), exclude)))
    return RecoveryPlan(ref, settings, tokenizer, windows, info, report, trust_remote_code,
                        time.perf_counter() - start)


def run_recovery(plan: RecoveryPlan, out: str | Path, *, saver: StateSaver | None = None, device: str = "cpu",
                 log: Callable[[str], None] | None = None) -> dict:
    """Train, merge and write the recovered checkpoint to ``out``; returns the recovery report."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DLPError(f"--out {out} exists and is not empty; choose a new folder")
    start = time.perf_counter()
    native = DTYPES[native_dtype_name(plan.ref.path)]  # trained in float32, written in the checkpoint's dtype
    model, _, _ = load_model(plan.ref, dtype="float32", trust_remote_code=plan.trust_remote_code)
    before = zero_counts(model)
    peft_model = add_lora(model, plan.settings)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    t = time.perf_counter()
    state, resumed = train(peft_model, plan.windows, plan.settings, key=plan.key, saver=saver, device=device, log=log)
    train_seconds = time.perf_counter() - t
    peft_model.to("cpu")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-recovering-", dir=out.parent))
    try:
        if plan.settings.merge == "none":
            peft_model.save_pretrained(str(staging / ADAPTER_DIR))
        t = time.perf_counter()
        recovered = merge(peft_model, plan.settings.merge)
        moved = cast_keeping_support_(recovered, native)
        merge_seconds = time.perf_counter() - t
        after = zero_counts(recovered)
        report = _report(plan, state, resumed, before, after, prunable_weights(recovered), block_sparsity(recovered),
                         trainable,
                         {"plan": plan.seconds, "train": train_seconds, "merge": merge_seconds,
                          "total": plan.seconds + time.perf_counter() - start})
        report["written"] = {"dtype": str(native).removeprefix("torch."), "kept_from_underflow": moved}
        _check_zeros(plan.settings.merge, before, after)
        _write(recovered, plan, staging, out, report)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def recover(model: str | ModelRef, out: str | Path, settings: RecoverySettings | None = None, **kwargs) -> dict:
    """:func:`plan_recovery` then :func:`run_recovery` (keyword arguments: saver, device, log)."""
    return run_recovery(plan_recovery(model, settings or RecoverySettings()), out, **kwargs)


def _check_zeros(mode: str, before: dict[str, int], after: dict[str, int]) -> None:
    if mode != "plain" and before != after:
        changed = [name for name in before if before[name] != after[name]]
        raise RuntimeError(f"merge '{mode}' changed the zeros of {len(changed)} linears (first: {changed[0]})")


def _report(plan: RecoveryPlan, state, resumed, before, after, prunable, per_block, trainable, seconds) -> dict:
    import peft

    zb, za = sum(before.values()), sum(after.values())
    return {
        "model": plan.ref.source, "model_fingerprint": plan.ref.fingerprint, "key": plan.key,
        "settings": plan.settings.to_json(), "data": plan.data, "trainable_parameters": trainable,
        "steps": state.step, "resumed_from_step": resumed, "loss": state.losses,
        "sparsity": {"before": zb / prunable, "after": za / prunable, "zeros_before": zb, "zeros_after": za,
                     "prunable_weights": prunable, "exact": zb == za, "per_block_after": per_block},
        "seconds": seconds, "versions": {"peft": peft.__version__, "torch": torch.__version__},
    }


def _write(model, plan: RecoveryPlan, staging: Path, out: Path, report: dict) -> None:
    """The checkpoint (via :func:`save_checkpoint`) plus the recovery report, then one rename into ``out``."""
    summary = {k: report[k] for k in ("settings", "steps", "sparsity", "key")}
    prune_report = {**(plan.prune_report or {}), "recovery": {**summary, "report": RECOVERY_REPORT}}
    folder = staging / "checkpoint"
    save_checkpoint(model, plan.tokenizer, folder, prune_report)
    if (staging / ADAPTER_DIR).exists():
        os.replace(staging / ADAPTER_DIR, folder / ADAPTER_DIR)
    (folder / RECOVERY_REPORT).write_text(json.dumps(report, indent=1))
    if out.exists():
        out.rmdir()  # checked empty above
    os.replace(folder, out)
