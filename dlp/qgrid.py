"""The integer grid of weight quantization: symmetric codes per group of inputs, and round-to-nearest.

``w ~ c * s`` with ``c`` in ``[-2^(b-1), 2^(b-1) - 1]`` and one scale per ``group_size`` consecutive inputs of
each output row (the compressed-tensors W4A16 / W8A16 layout). ``s = max|w| / ((2^b - 1) / 2)`` over the
group's *surviving* weights (GPTQ's and compressed-tensors' rule), rounded to ``scale_dtype`` -- the dtype
the checkpoint stores it in -- before it is used, so fake-quantized weights are exactly what the exported
checkpoint dequantizes to.

The mask is kept exactly, both ways: a pruned weight (exactly 0) gets code 0 (zero is on the symmetric
grid), and a surviving weight never gets code 0 -- rounding picks the nearest *nonzero* code -- so the
sparsity measured after quantization equals the sparsity before, exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import bounds


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


@dataclass
class Quantized:
    weight: torch.Tensor  # float32, fake-quantized: codes * scales
    scale: torch.Tensor  # [rows, in_features // group_size], float32 values representable in spec.scale_dtype


def group_scale(W: torch.Tensor, keep: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The scale of each group laid along the last dimension of ``W``, from the entries ``keep`` marks;
    a group with nothing kept gets scale 1 (every code is 0 there)."""
    amax = torch.where(keep, W.abs(), torch.zeros((), dtype=W.dtype, device=W.device)).amax(dim=-1)
    scale = (amax / ((spec.qmax - spec.qmin) / 2)).to(spec.scale_dtype).to(torch.float32)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def codes(w: torch.Tensor, scale: torch.Tensor, keep: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes (as floats): 0 where pruned, the nearest nonzero code on the grid where kept."""
    c = torch.clamp(torch.round(w / scale), spec.qmin, spec.qmax)
    c = torch.where(c == 0, torch.where(w < 0, -1.0, 1.0), c)
    return torch.where(keep, c, torch.zeros((), dtype=c.dtype, device=c.device))


def rtn(weight: torch.Tensor, spec: QuantSpec) -> Quantized:
    """Round-to-nearest per group (no data): the baseline."""
    W = weight.detach().to(torch.float32)
    rows, cols = W.shape
    groups = W.reshape(rows, cols // spec.group_size, spec.group_size)
    kept = groups != 0
    scale = group_scale(groups, kept, spec)
    q = codes(groups, scale.unsqueeze(-1), kept, spec) * scale.unsqueeze(-1)
    return Quantized(q.reshape(rows, cols), scale)
