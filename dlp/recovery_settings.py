"""The settings of a recovery fine-tuning run (LoRA on a pruned checkpoint) and their checks.

Bounds and defaults live in :mod:`dlp.bounds`; the pipeline's ``recovery:`` job block derives from them too.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from . import bounds as B
from .errors import DLPError


def _check_int(value, rng: B.Range) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DLPError(f"{rng.name} must be an integer in {rng.text()}, got {value!r}")
    rng.check(value)


@dataclass(frozen=True)
class RecoverySettings:
    """What a recovery run depends on (besides the pruned checkpoint and the training text itself).

    ``data`` None trains on the pruned model's calibration source (from its ``dlp_report.json``), or C4 when
    the checkpoint does not say. ``merge``: ``masked`` (default) trains through the mask and adds
    ``M * (scale B A)`` to each weight, M the pruned weight's non-zero mask, so every zero stays; ``none``
    trains plain LoRA and keeps the adapter beside the unchanged pruned weights; ``plain`` merges a plain
    LoRA update in full (densifies: for comparison only). See :mod:`dlp.recovery_merge`.
    """

    steps: int = B.DEFAULT_RECOVERY_STEPS
    lr: float = B.DEFAULT_RECOVERY_LR
    rank: int = B.DEFAULT_LORA_RANK
    alpha: float = B.DEFAULT_LORA_ALPHA
    dropout: float = B.DEFAULT_LORA_DROPOUT
    target_modules: tuple[str, ...] = field(default=B.DEFAULT_RECOVERY_TARGETS)
    seqlen: int = B.DEFAULT_RECOVERY_SEQLEN
    batch: int = B.DEFAULT_RECOVERY_BATCH
    data: str | None = None
    seed: int = B.DEFAULT_RECOVERY_SEED
    save_every: int = B.DEFAULT_SAVE_EVERY
    merge: str = B.DEFAULT_MERGE

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", parse_targets(self.target_modules))
        else:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))

    def validate(self) -> "RecoverySettings":
        """Raise :class:`DLPError` (one line naming the fix) on the first bad value; return self."""
        _check_int(self.steps, B.RECOVERY_STEPS)
        B.RECOVERY_LR.check(self.lr)
        _check_int(self.rank, B.LORA_RANK)
        B.LORA_ALPHA.check(self.alpha)
        B.LORA_DROPOUT.check(self.dropout)
        _check_int(self.seqlen, B.SEQLEN)
        _check_int(self.batch, B.RECOVERY_BATCH)
        _check_int(self.save_every, B.SAVE_EVERY)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise DLPError(f"recovery seed must be an integer, got {self.seed!r}")
        if self.merge not in B.MERGE_MODES:
            raise DLPError(f"unknown merge '{self.merge}'; use one of: {', '.join(B.MERGE_MODES)}")
        if not self.target_modules:
            raise DLPError("target modules are empty; name at least one linear, e.g. q_proj,v_proj")
        return self

    @property
    def windows(self) -> int:
        """Training windows one run reads: one batch per step."""
        return self.steps * self.batch

    def to_json(self) -> dict:
        out = asdict(self)
        out["target_modules"] = list(self.target_modules)
        return out

    @property
    def mask_aware(self) -> bool:
        """The masked merge trains through the mask; ``none`` and ``plain`` train a plain LoRA adapter."""
        return self.merge == "masked"

    def training_key(self) -> dict:
        """The settings the trained adapter depends on: all but how often state is saved, and of the merge
        mode only whether training was mask-aware."""
        out = {k: v for k, v in self.to_json().items() if k not in ("merge", "save_every")}
        return {**out, "mask_aware": self.mask_aware}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.training_key(), sort_keys=True).encode()).hexdigest()


def parse_targets(text: str) -> tuple[str, ...]:
    """``"q_proj, v_proj"`` -> ``("q_proj", "v_proj")``."""
    return tuple(t.strip() for t in text.split(",") if t.strip())
