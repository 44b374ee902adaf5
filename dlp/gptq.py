"""GPTQ (Frantar et al. 2022) for pruned weights: round the surviving weights to the grid of
:mod:`dlp.qgrid` one column at a time, moving the survivors not yet rounded to absorb each error, while
every pruned weight stays exactly 0.

For one output row ``w`` with surviving set ``S`` (the pruned entries fixed at 0), the error on the layer's
calibration outputs is ``(q - w)^T H (q - w)`` with ``H = X^T X``. Rounding survivor ``j`` and letting
the survivors ``F`` after it move, Optimal Brain Surgeon gives ``d_F = -(w_j - q_j) [H_FF'^-1]_Fj /
[H_FF'^-1]_jj`` (``F' = F + {j}``); walking the survivors in column order, those are the rows of ``U``,
the upper Cholesky factor of ``(H_SS)^-1`` (:mod:`dlp.obs`).

Two ways to get ``U``:

- ``exact``: per output row, from the Hessian restricted to that row's survivors -- the compensation
  moves surviving weights only, and pruned ones never receive an update. One ``|S| x |S|`` factorisation
  per row (batched): ``O(rows * |S|^3)`` per linear.
- ``shared``: SparseGPT's joint prune-and-quantize rule -- one ``U`` from the full ``H`` for all rows. A
  pruned entry counts as free until its own column, where it is set back to 0 and what the earlier updates
  moved it by is pushed on to the columns after it. The zeros still end exactly 0, but the compensation is
  only approximately restricted to the survivors. ``O(cols^3)`` per linear, as in plain GPTQ.

Dead inputs (never active in calibration) keep their weights and are simply rounded.
"""
from __future__ import annotations

import torch

from .bounds import DEFAULT_COMPENSATION, QUANT_COMPENSATIONS
from .obs import DEFAULT_PERCDAMP, dampen, inverse_factor
from .qgrid import QuantSpec, Quantized, codes, group_scale

COMPENSATIONS = QUANT_COMPENSATIONS
#: the exact solver's working set (Hessians and factors of a chunk of rows), in float32 elements
_CHUNK_ELEMENTS = 2**26


def gptq(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, percdamp: float = DEFAULT_PERCDAMP,
         compensation: str = DEFAULT_COMPENSATION) -> Quantized:
    """Quantize ``weight`` (pruned entries exactly 0) given its inputs' Hessian (module docstring)."""
    H = dampen(hessian, percdamp)[0]
    W = weight.detach().to(torch.float32)
    return _exact(W, H, spec) if compensation == "exact" else _shared(W.clone(), H, spec)


def _shared(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec) -> Quantized:
    """One factor for every row; lazy batch updates in blocks of whole groups, so each group's scale is
    taken from its columns with every earlier update applied."""
    rows, cols = W.shape
    keep = W != 0
    U = inverse_factor(H, "GPTQ")
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


def _exact(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec) -> Quantized:
    """Per row, the survivors compacted to the front (column order kept) and padded to the longest row;
    padding positions get an identity Hessian, weight 0 and code 0, so they neither move nor are moved."""
    rows, cols = W.shape
    keep = W != 0
    count = keep.sum(dim=1)
    width = int(count.max()) if rows else 0
    out = torch.zeros_like(W)
    scales = torch.ones(rows, cols // spec.group_size, dtype=torch.float32, device=W.device)
    if width == 0:
        return Quantized(out, scales)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]  # survivors first, in column order
    valid = torch.arange(width, device=W.device).unsqueeze(0) < count.unsqueeze(1)
    chunk = max(1, _CHUNK_ELEMENTS // (3 * width * width))
    for r0 in range(0, rows, chunk):
        r1 = min(r0 + chunk, rows)
        idx, ok = order[r0:r1], valid[r0:r1]
        Ws, s = _exact_rows(W[r0:r1].gather(1, idx) * ok, _restricted(H, idx, ok), idx // spec.group_size, ok, spec,
                            scales.shape[1])
        out[r0:r1].scatter_(1, idx, Ws * ok)
        scales[r0:r1] = s
    return Quantized(out, scales)


def _restricted(H: torch.Tensor, idx: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``U`` per row from ``H`` restricted to that row's survivors (identity on the padding)."""
    Hs = H[idx.unsqueeze(2), idx.unsqueeze(1)]
    eye = torch.eye(idx.shape[1], dtype=H.dtype, device=H.device).expand_as(Hs)
    return inverse_factor(torch.where(ok.unsqueeze(2) & ok.unsqueeze(1), Hs, eye), "GPTQ")


def _exact_rows(Ws: torch.Tensor, U: torch.Tensor, group: torch.Tensor, ok: torch.Tensor, spec: QuantSpec,
                groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The GPTQ sweep over compacted survivors, every row with its own factor; a group's scale is taken
    when the row reaches the group's first survivor, from the group's current (updated) values."""
    n, width = Ws.shape
    starts = ok.clone()
    starts[:, 1:] &= group[:, 1:] != group[:, :-1]
    scales = torch.ones(n, groups, dtype=torch.float32, device=Ws.device)
    s = torch.ones(n, dtype=torch.float32, device=Ws.device)
    Ut = U.transpose(0, 1).contiguous()
    del U
    for i in range(width):
        rows = starts[:, i].nonzero().squeeze(1)
        if rows.numel():
            ahead = (group[rows, i:] == group[rows, i:i + 1]) & ok[rows, i:]
            s[rows] = group_scale(Ws[rows, i:], ahead, spec)
            scales[rows, group[rows, i]] = s[rows]
        w = Ws[:, i]
        q = codes(w, s, ok[:, i], spec) * s
        row = Ut[i]  # [n, width]: row i of every row's factor, contiguous
        err = (w - q) / row[:, i]
        Ws[:, i:] -= err.unsqueeze(1) * row[:, i:]
        Ws[:, i] = q
    return Ws, scales
