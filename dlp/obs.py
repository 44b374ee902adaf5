"""The Optimal Brain Surgeon pieces SparseGPT and GPTQ share: Hessian dampening and the upper Cholesky
factor of the inverse Hessian.

Both walk the columns of a weight matrix in order; removing (or rounding) column ``i`` with error ``e``
moves the later columns by ``e / U[i, i] * U[i, i:]``, where ``U`` is the upper Cholesky factor of
``H^-1`` (``H^-1 = U^T U``). Each row of ``U`` is the OBS update for the columns still free at that point,
so one factorisation serves the whole sweep.

Everything here also takes a batch of Hessians ``[..., n, n]`` (one per output row when each row has
its own free set).
"""
from __future__ import annotations

import torch

from .errors import DLPError

DEFAULT_PERCDAMP = 0.01


def dampen(hessian: torch.Tensor, percdamp: float = DEFAULT_PERCDAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 copy of ``hessian`` with dead inputs (zero diagonal: the input never fired) set to 1 on
    the diagonal and ``percdamp * mean(diag H)`` added to the diagonal. Returns ``(H, dead)``; the
    caller decides what a dead input's weights become."""
    H = hessian.to(torch.float32).clone()
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    dead = diag == 0
    diag[dead] = 1
    diag += percdamp * diag.mean(dim=-1, keepdim=True)
    return H, dead


def inverse_factor(hessian: torch.Tensor, what: str) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``H^-1`` (``H`` already dampened); ``what`` names the caller in
    the error raised when ``H`` is not positive definite.

    With ``P`` the order reversal and ``P H P = L L^T``, ``U = P L^-1 P``: one Cholesky and one triangular
    solve, half the work of factorising, inverting and factorising again (same result to float rounding)."""
    try:
        lower = torch.linalg.cholesky(hessian.flip(-1, -2))
    except torch.linalg.LinAlgError as exc:
        raise DLPError(f"{what}: the Hessian is not positive definite even after dampening; use more calibration samples") from exc
    eye = torch.eye(hessian.shape[-1], dtype=hessian.dtype, device=hessian.device).expand_as(lower)
    return torch.linalg.solve_triangular(lower, eye, upper=False).flip(-1, -2)
