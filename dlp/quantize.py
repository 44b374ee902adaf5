"""Weight quantization that keeps a pruned model's mask: GPTQ with OBS compensation, or round-to-nearest.

Integer codes, symmetric, one scale per ``group_size`` consecutive inputs of each output row (the
compressed-tensors W4A16 / W8A16 layout): ``w ~ c * s`` with ``c`` in ``[-2^(b-1), 2^(b-1) - 1]`` and
``s = max|w| / ((2^b - 1) / 2)`` over the group's surviving weights (GPTQ's and compressed-tensors' rule).

The mask is kept exactly, both ways:

- a pruned weight (exactly 0) gets code 0: zero is representable because the scheme is symmetric;
- a surviving weight never gets code 0: rounding picks the nearest *nonzero* code, so quantization adds
  no zeros and the sparsity measured after quantization equals the sparsity before, exactly.

GPTQ (Frantar et al. 2022) rounds the columns in order and moves the later columns to absorb each
column's error (:mod:`dlp.obs`). The pruned entries are constrained to 0 the same way the survivors are
constrained to the grid -- SparseGPT's joint prune-and-quantize rule: a pruned entry's "rounded" value
is 0, so when its column comes, whatever the earlier updates moved it by is taken back out and pushed
onto the later surviving columns. The zeros end exactly 0 (they are written, not computed), and the
compensation lands on the surviving weights, the only ones left free at the end. Dead inputs (never
active in calibration) keep their weights and are simply rounded.

Scales are rounded to ``scale_dtype`` (the dtype the checkpoint stores them in) before they are used, so
the fake-quantized weights here are exactly what the exported checkpoint dequantizes to.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from . import bounds
from .decoder import DecoderLayout, find_decoder
from .engine import CalibrationEngine, InputCollector
from .errors import DLPError
from .obs import DEFAULT_PERCDAMP, dampen, inverse_factor

METHODS = ("gptq", "rtn")


@dataclass(frozen=True)
class QuantSpec:
    bits: int = bounds.DEFAULT_QUANT_BITS
    group_size: int = bounds.DEFAULT_GROUP_SIZE
    scale_dtype: torch.dtype = torch.float32

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def check(self) -> None:
        bounds.check_quant(self.bits, self.group_size)


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

# ------------------------------------------------------------------ rounding
def group_scale(W: torch.Tensor, keep: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """One scale per row of ``W`` (one group's columns), from the surviving weights; an all-pruned row gets
    scale 1 (every code is 0 there)."""
    amax = torch.where(keep, W.abs(), torch.zeros((), dtype=W.dtype, device=W.device)).amax(dim=1)
    scale = (amax / ((spec.qmax - spec.qmin) / 2)).to(spec.scale_dtype).to(torch.float32)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def codes(w: torch.Tensor, scale: torch.Tensor, keep: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes (as floats): 0 where pruned, the nearest nonzero code on the grid where kept."""
    c = torch.clamp(torch.round(w / scale), spec.qmin, spec.qmax)
    c = torch.where(c == 0, torch.where(w < 0, -1.0, 1.0), c)
    return torch.where(keep, c, torch.zeros((), dtype=c.dtype, device=c.device))


@dataclass
class Quantized:
    weight: torch.Tensor  # float32, fake-quantized: codes * scales
    scale: torch.Tensor  # [rows, in_features // group_size], float32 values representable in spec.scale_dtype


def rtn(weight: torch.Tensor, spec: QuantSpec) -> Quantized:
    """Round-to-nearest per group (no data): the baseline."""
    W = weight.detach().to(torch.float32)
    rows, cols = W.shape
    keep = W != 0
    groups = W.reshape(rows, cols // spec.group_size, spec.group_size)
    kept = keep.reshape(groups.shape)
    scale = group_scale(groups.reshape(-1, spec.group_size), kept.reshape(-1, spec.group_size), spec).reshape(rows, -1)
    q = codes(groups, scale.unsqueeze(-1), kept, spec) * scale.unsqueeze(-1)
    return Quantized(q.reshape(rows, cols), scale)


def gptq(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, percdamp: float = DEFAULT_PERCDAMP) -> Quantized:
    """GPTQ over the columns in order with the pruned entries held at 0 (see the module docstring).

    Lazy batch updates in blocks of whole groups, so each group's scale is taken from its columns with
    every earlier update applied."""
    W = weight.detach().to(torch.float32).clone()
    rows, cols = W.shape
    keep = W != 0
    U = inverse_factor(dampen(hessian, percdamp)[0], "GPTQ")
    gs = spec.group_size
    block = gs * max(1, 128 // gs)
    scales = torch.empty(rows, cols // gs, dtype=torch.float32, device=W.device)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, K1, U1 = W[:, i1:i2].clone(), keep[:, i1:i2], U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if i % gs == 0:
                s = group_scale(W1[:, i:i + gs], K1[:, i:i + gs], spec)
                scales[:, (i1 + i) // gs] = s
            w = W1[:, i]
            q = codes(w, s, K1[:, i], spec) * s
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return Quantized(W, scales)


# ------------------------------------------------------------------ the model
@dataclass
class QuantResult:
    method: str
    spec: QuantSpec
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
        return {"method": self.method, "bits": self.spec.bits, "group_size": self.spec.group_size,
                "scale_dtype": str(self.spec.scale_dtype).removeprefix("torch."), "quantized_linears": len(self.scales),
                "quantized_weights": self.total, "sparsity_before": self.sparsity_before,
                "sparsity_after": self.sparsity_after, "block_passes": self.block_passes, "seconds": self.seconds}


class _Quantizer:
    """Quantizes block by block; the calibration engine's visitor for GPTQ (Hessians per linear)."""

    def __init__(self, layout: DecoderLayout, method: str, spec: QuantSpec, result: QuantResult,
                 device: torch.device, percdamp: float):
        self.layout, self.method, self.spec, self.result = layout, method, spec, result
        self.device, self.percdamp = device, percdamp

    def collectors(self, index, linears):
        if self.method == "rtn":
            return {}
        return {n: InputCollector(l.in_features, self.device, hessian=True) for n, l in linears.items()}

    def after_forward(self, index, block, collectors) -> bool:
        self.quantize_block(index, collectors)
        return True

    def quantize_block(self, index: int, collectors: dict[str, InputCollector] | None = None) -> None:
        for name, linear in self.layout.linears(index).items():
            W = linear.weight.data
            if self.method == "gptq":
                q = gptq(W, collectors[name].hessian, self.spec, self.percdamp)
            else:
                q = rtn(W, self.spec)
            self.result.zeros_before += int((W == 0).sum())
            W.copy_(q.weight.to(W.dtype))
            self.result.zeros_after += int((W == 0).sum())
            self.result.total += W.numel()
            self.result.scales[self.layout.param_name(index, name)] = q.scale.to(self.spec.scale_dtype).cpu()


def quantize(model: nn.Module, *, bits: int = bounds.DEFAULT_QUANT_BITS, group_size: int = bounds.DEFAULT_GROUP_SIZE,
             method: str = "gptq", windows: torch.Tensor | None = None, device: str = "cpu",
             batch_size: int | None = None, percdamp: float = DEFAULT_PERCDAMP,
             scale_dtype: torch.dtype | None = None) -> QuantResult:
    """Fake-quantize the decoder blocks' linears of ``model`` in place (weights become ``codes * scales``)
    and return the scales; GPTQ walks ``windows`` through the calibration engine, sequentially (each
    block calibrated on the quantized outputs of the blocks before it). ``scale_dtype`` defaults to the
    weights' dtype."""
    if method not in METHODS:
        raise DLPError(f"unknown quantization method '{method}'; use one of: {', '.join(METHODS)}")
    layout = find_decoder(model)
    dtype = scale_dtype or next(iter(layout.linears(0).values())).weight.dtype
    spec = QuantSpec(bits, group_size, dtype)
    check_layout(layout, spec)
    result = QuantResult(method, spec)
    start = time.perf_counter()
    if method == "gptq":
        if windows is None:
            raise DLPError("GPTQ needs calibration windows; pass them or use method 'rtn'")
        engine = CalibrationEngine(model, windows, device=device, batch_size=batch_size, layout=layout)
        engine.walk(_Quantizer(layout, method, spec, result, engine.device, percdamp), sequential=True)
        result.block_passes = engine.counters.passes_per_block()
    else:
        visitor = _Quantizer(layout, method, spec, result, torch.device(device), percdamp)
        with torch.no_grad():
            for index in range(layout.num_blocks):
                visitor.quantize_block(index)
    result.seconds = time.perf_counter() - start
    return result
