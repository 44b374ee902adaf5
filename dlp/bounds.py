"""The library's bounds and defaults, defined once: the allocation code checks them, and the pipeline's job
schema derives its field constraints from them, so a value the library would refuse is refused when the job
is loaded -- before any model is fetched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import DLPError


@dataclass(frozen=True)
class Range:
    """A numeric interval; ``lo``/``hi`` None means unbounded on that side, ``*_open`` excludes the end."""

    name: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        v = float(value)
        lo_ok = self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        hi_ok = self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        return lo_ok and hi_ok

    def text(self) -> str:
        """The interval in the usual notation, e.g. ``(0, 1)`` or ``[0, 0.5)``."""
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        return f"{'(' if self.lo_open or self.lo is None else '['}{lo}, {hi}{')' if self.hi_open or self.hi is None else ']'}"

    def check(self, value: Any) -> None:
        """Raise :class:`DLPError` (one line naming the range) unless ``value`` lies in it."""
        if not self.contains(value):
            why = f" ({self.why})" if self.why else ""
            raise DLPError(f"{self.name} must be in {self.text()}{why}, got {value}")

    def field(self) -> dict[str, float]:
        """pydantic ``Field`` keyword arguments (``gt``/``ge``/``lt``/``le``) for this range."""
        out: dict[str, float] = {}
        if self.lo is not None:
            out["gt" if self.lo_open else "ge"] = self.lo
        if self.hi is not None:
            out["lt" if self.hi_open else "le"] = self.hi
        return out


SPARSITY = Range("sparsity", 0.0, 1.0, lo_open=True, hi_open=True, why="e.g. 0.7")
ALPHA = Range("alpha", 0.0, 0.5, hi_open=True, why="max R - min R = 2 alpha")
OWL_LAMBDA = Range("OWL lambda", 0.0, 0.5, hi_open=True, why="max R - min R = 2 lambda")
OWL_M = Range("OWL M", 0.0, None, lo_open=True, why="outlier threshold as a multiple of the block mean")
NSAMPLES = Range("nsamples", 1, None, why="calibration windows")
SEQLEN = Range("seqlen", 2, None, why="tokens per window; one prediction needs two tokens")
HELDOUT = Range("held-out windows", 2, None, why="the alpha search's proxy windows")
BUDGET = Range("search budget", 1, None, why="screening evaluations")
WINDOWS = Range("max-windows", 1, None, why="evaluation windows")

DEFAULT_SPARSITY = 0.7
DEFAULT_ALPHA = 0.15
DEFAULT_STATISTIC = "median"
DEFAULT_OWL_M = 5.0
DEFAULT_OWL_LAMBDA = 0.08

# ---- recovery fine-tuning (LoRA through peft, dlp.recovery); the job schema's `recovery:` block derives from these
RECOVERY_STEPS = Range("recovery steps", 1, None, why="optimizer steps")
RECOVERY_LR = Range("recovery lr", 0.0, None, lo_open=True, why="AdamW learning rate, e.g. 1e-4")
LORA_RANK = Range("LoRA rank", 1, None, why="r of the low-rank update B A")
LORA_ALPHA = Range("LoRA alpha", 0.0, None, lo_open=True, why="the update B A is scaled by alpha / rank")
LORA_DROPOUT = Range("LoRA dropout", 0.0, 1.0, hi_open=True, why="dropout on the adapter's input")
RECOVERY_BATCH = Range("recovery batch", 1, None, why="training windows per optimizer step")
SAVE_EVERY = Range("save-every", 1, None, why="optimizer steps between saved training states")
MERGE_MODES = ("masked", "none", "plain")  # masked keeps every zero; none keeps the adapter; plain densifies

#: CPU defaults, chosen to run in minutes on a 2-core CPU for the bundled SmolLM2-135M (not yet measured:
#: benchmarks/bench_recovery.py prints the figures)
DEFAULT_RECOVERY_STEPS = 60
DEFAULT_RECOVERY_LR = 1e-3
DEFAULT_LORA_RANK = 8
DEFAULT_LORA_ALPHA = 16.0
DEFAULT_LORA_DROPOUT = 0.05
DEFAULT_RECOVERY_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_RECOVERY_SEQLEN = 256
DEFAULT_RECOVERY_BATCH = 4
DEFAULT_RECOVERY_SEED = 0
DEFAULT_SAVE_EVERY = 10
DEFAULT_MERGE = "masked"
#: The Wanda/OWL recipe (peft LoRA on C4, fp16 on a GPU): the paper-like settings for 7B models
PAPER_RECOVERY = {"rank": 8, "alpha": 16.0, "dropout": 0.05, "target_modules": ("q_proj", "v_proj"), "lr": 1e-4}
RECOVERY_MAX_GRAD_NORM = 1.0  # gradient clipping, as the HF Trainer the Wanda/OWL recipe ran under

QUANT_BITS = (4, 8)  # the integer widths compressed-tensors packs and vLLM's W4A16 / W8A16 kernels serve
GROUP_SIZE = Range("group size", 1, None, why="inputs per quantization scale; must divide every linear's in_features")
DEFAULT_QUANT_BITS = 4
DEFAULT_GROUP_SIZE = 128
QUANT_METHODS = ("gptq", "rtn")  # GPTQ (calibrated, mask kept) | round-to-nearest (no data)
QUANT_COMPENSATIONS = ("exact", "shared")  # GPTQ's solvers (dlp.gptq)
#: shared (SparseGPT's rule): on SmolLM2-135M at 70 %, 4-bit, it quantized the whole model in 663 s where exact had
#: not finished after 31 CPU-minutes (docs/RESULTS.md); exact stays an option (lower error per block)
DEFAULT_COMPENSATION = "shared"
QUANT_EXPORT_DTYPES = ("bfloat16", "float16", "float32")  # scales and unquantized tensors of the export


def check_quant(bits: Any, group_size: Any) -> None:
    """Quantization settings the exporter can write: 4 or 8 bits, a positive integer group size."""
    if isinstance(bits, bool) or bits not in QUANT_BITS:
        raise DLPError(f"bits must be one of {', '.join(map(str, QUANT_BITS))} (W4A16 / W8A16), got {bits}")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise DLPError(f"group size must be a positive integer such as {DEFAULT_GROUP_SIZE}, got {group_size}")
    GROUP_SIZE.check(group_size)
