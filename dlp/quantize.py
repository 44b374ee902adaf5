"""Weight quantization of a pruned model that keeps its mask: GPTQ or round-to-nearest, block by block.

:func:`quantize` fake-quantizes the decoder blocks' linears in place (weights become ``codes * scales`` on
the grid of :mod:`dlp.qgrid`, zeros kept, no zero added) and returns the scales that
:func:`dlp.export.export_compressed` needs. GPTQ (:mod:`dlp.gptq`) is a visitor of the one calibration
engine: each block's linears collect their input Hessians in one forward, are quantized, and the block
runs again so that the next block calibrates on quantized outputs. Round-to-nearest reads no data.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from . import bounds
from .decoder import DecoderLayout, find_decoder
from .engine import CalibrationEngine, InputCollector
from .errors import DLPError
from .gptq import COMPENSATIONS, gptq
from .obs import DEFAULT_PERCDAMP
from .qgrid import QuantSpec, Quantized, codes, group_scale, rtn

__all__ = ["METHODS", "COMPENSATIONS", "QuantSpec", "Quantized", "QuantResult", "quantize", "gptq", "rtn", "codes",
           "group_scale", "check_layout", "check_folder", "block_zeros"]

METHODS = bounds.QUANT_METHODS


def check_layout(layout: DecoderLayout, spec: QuantSpec) -> None:
    """Every block linear's input width must be a multiple of the group size (one line naming a fix)."""
    spec.check()
    widths = {lin.in_features for i in range(layout.num_blocks) for lin in layout.linears(i).values()}
    bad = sorted(w for w in widths if w % spec.group_size)
    if bad:
        common = math.gcd(*widths)
        fits = [g for g in (128, 64, 32, 16) if common % g == 0]
        hint = f"use --group-size {fits[0]}" if fits else "use a divisor of every input width"
        raise DLPError(f"group size {spec.group_size} does not divide in_features {bad[0]} of this model's linears; {hint}")



def check_folder(path: str, spec: QuantSpec, trust_remote_code: bool = False) -> None:
    """:func:`check_layout` on a model folder's config alone (a skeleton on the meta device): bad settings
    fail before any weight is read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec.check()
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    check_layout(find_decoder(skeleton), spec)

def block_zeros(model: nn.Module) -> tuple[int, int]:
    """``(exactly-zero weights, all weights)`` of the decoder blocks' linears of an in-memory model: the
    figure that must not change through quantize -> export -> load-back."""
    layout = find_decoder(model)
    zeros = total = 0
    for i in range(layout.num_blocks):
        for lin in layout.linears(i).values():
            zeros += int((lin.weight == 0).sum())
            total += lin.weight.numel()
    return zeros, total


# ------------------------------------------------------------------ the model
@dataclass
class QuantResult:
    method: str
    spec: QuantSpec
    compensation: str | None = None  # GPTQ's solver
    scales: dict[str, torch.Tensor] = field(default_factory=dict)  # weight name -> [rows, groups] in spec.scale_dtype
    zeros_before: int = 0
    zeros_after: int = 0
    total: int = 0
    block_passes: float = 0.0
    seconds: float = 0.0

    @property
    def sparsity_before(self) -> float:
        return self.zeros_before / max(self.total, 1)

    @property
    def sparsity_after(self) -> float:
        return self.zeros_after / max(self.total, 1)

    def to_json(self) -> dict:
        return {"method": self.method, "compensation": self.compensation, "bits": self.spec.bits, "group_size": self.spec.group_size,
                "scale_dtype": str(self.spec.scale_dtype).removeprefix("torch."), "quantized_linears": len(self.scales),
                "quantized_weights": self.total, "sparsity_before": self.sparsity_before,
                "sparsity_after": self.sparsity_after, "block_passes": self.block_passes, "seconds": self.seconds}


class _Quantizer:
    """Quantizes block by block; the calibration engine's visitor for GPTQ (input Hessians per linear)."""

    def __init__(self, layout: DecoderLayout, result: QuantResult, device: torch.device,
                 solve: Callable[[torch.Tensor, InputCollector | None], Quantized], hessians: bool):
        self.layout, self.result, self.device, self.solve, self.hessians = layout, result, device, solve, hessians

    def collectors(self, index, linears):
        if not self.hessians:
            return {}
        return {n: InputCollector(l.in_features, self.device, hessian=True) for n, l in linears.items()}

    def after_forward(self, index, block, collectors) -> bool:
        self.quantize_block(index, collectors)
        return True

    def quantize_block(self, index: int, collectors: dict[str, InputCollector] | None = None) -> None:
        for name, linear in self.layout.linears(index).items():
            W = linear.weight.data
            q = self.solve(W, collectors[name] if collectors else None)
            self.result.zeros_before += int((W == 0).sum())
            W.copy_(q.weight.to(W.dtype))
            self.result.zeros_after += int((W == 0).sum())
            self.result.total += W.numel()
            self.result.scales[self.layout.param_name(index, name)] = q.scale.to(self.result.spec.scale_dtype).cpu()


def quantize(model: nn.Module, *, bits: int = bounds.DEFAULT_QUANT_BITS, group_size: int = bounds.DEFAULT_GROUP_SIZE,
             method: str = "gptq", windows: torch.Tensor | None = None, device: str = "cpu",
             batch_size: int | None = None, percdamp: float = DEFAULT_PERCDAMP, compensation: str = bounds.DEFAULT_COMPENSATION,
             scale_dtype: torch.dtype | None = None) -> QuantResult:
    """Fake-quantize the decoder blocks' linears of ``model`` in place and return the scales (module
    docstring). ``compensation``: GPTQ's ``exact`` or ``shared`` solver (:mod:`dlp.gptq`); ``scale_dtype``
    defaults to the weights' dtype. Every setting is checked before the model is touched."""
    if method not in METHODS:
        raise DLPError(f"unknown quantization method '{method}'; use one of: {', '.join(METHODS)}")
    if compensation not in COMPENSATIONS:
        raise DLPError(f"unknown GPTQ compensation '{compensation}'; use one of: {', '.join(COMPENSATIONS)}")
    layout = find_decoder(model)
    spec = QuantSpec(bits, group_size, scale_dtype or next(iter(layout.linears(0).values())).weight.dtype)
    check_layout(layout, spec)
    if method == "gptq" and windows is None:
        raise DLPError("GPTQ needs calibration windows; pass them or use method 'rtn'")
    result = QuantResult(method, spec, compensation if method == "gptq" else None)
    start = time.perf_counter()
    if method == "gptq":
        engine = CalibrationEngine(model, windows, device=device, batch_size=batch_size, layout=layout)
        solve = lambda W, c: gptq(W, c.hessian, spec, percdamp, compensation)  # noqa: E731
        engine.walk(_Quantizer(layout, result, engine.device, solve, hessians=True), sequential=True)
        result.block_passes = engine.counters.passes_per_block()
    else:
        visitor = _Quantizer(layout, result, torch.device(device), lambda W, c: rtn(W, spec), hessians=False)
        with torch.no_grad():
            for index in range(layout.num_blocks):
                visitor.quantize_block(index)
    result.seconds = time.perf_counter() - start
    return result
