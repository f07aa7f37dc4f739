"""The contract every solver follows: pure tensor functions, no modules, hooks or devices.

A solver takes one weight matrix ``[out, in]`` (float32), the statistics of that layer's
inputs and a :class:`~sparsellm.masks.SparsityTarget`, and returns the new weight plus figures
for the report. It never mutates its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch


class Statistic(Enum):
    """What a solver needs to see of a layer's calibration inputs."""

    NONE = "none"  # weights alone (magnitude): no calibration pass at all
    NORMS = "norms"  # per-input-feature sum of squares, diag(X Xᵀ) (Wanda)
    HESSIAN = "hessian"  # the Gram matrix X Xᵀ / tokens (SparseGPT, SparseLLM)


@dataclass
class LayerStatistics:
    """Accumulated statistics of one Linear layer's inputs (float32)."""

    tokens: int
    sq_norms: torch.Tensor | None = None  # [in]: sum over tokens of x_j²
    hessian: torch.Tensor | None = None  # [in, in]: X Xᵀ / tokens


@dataclass
class SolveResult:
    """A solver's output for one layer."""

    weight: torch.Tensor
    loss: float | None = None  # the solver's own objective figure, if it has one
    damping: float | None = None  # damping fraction finally used for the Hessian
    damping_retries: int = 0  # how often the Cholesky factorisation had to be retried
    extra: dict = field(default_factory=dict)


class NumericalError(RuntimeError):
    """A solve that could not be completed with finite numbers."""


def inverse_hessian_cholesky(
    hessian: torch.Tensor, dampening: float, max_retries: int = 6
) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor ``U`` of ``(H + λ·mean(diag H)·I)⁻¹`` (so ``H⁻¹ = Uᵀ U``).

    On a failed factorisation the damping grows tenfold and the retry count is returned, so the
    caller can report it; an identity is never substituted.
    """
    H = hessian.to(torch.float64) if hessian.shape[0] <= 4096 else hessian
    mean_diag = H.diagonal().mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    fraction = dampening
    for attempt in range(max_retries + 1):
        L, info = torch.linalg.cholesky_ex(H + fraction * mean_diag * eye)
        if info == 0:
            inverse = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0 and torch.isfinite(U).all():
                return U.to(torch.float32), fraction, attempt
        fraction = fraction * 10 if fraction > 0 else 1e-6
    raise NumericalError(f"Hessian not positive definite even with damping {fraction:g}")


def relative_output_error(
    weight: torch.Tensor, new_weight: torch.Tensor, hessian: torch.Tensor
) -> float:
    """``‖(W − Ŵ)X‖² / ‖W X‖²`` over the calibration tokens, computed from ``H = X Xᵀ``."""
    weight, hessian = weight.detach().float(), hessian.detach().float()
    delta = weight - new_weight.detach().float()
    num = ((delta @ hessian) * delta).sum()
    den = ((weight @ hessian) * weight).sum()
    return float(num / den) if den > 0 else float(num)
