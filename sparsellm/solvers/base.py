"""The contract every solver follows: pure tensor functions, no modules, hooks or devices.

A solver takes one weight matrix ``[out, in]`` (float32), the statistics of that layer's
inputs and a :class:`~sparsellm.masks.SparsityTarget`, and returns the new weight plus figures
for the report. It never mutates its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch

# NumericalError lives in sparsellm.errors so that sparsellm.linalg can raise it without an
# import cycle; solvers and their callers keep importing it from here.
from sparsellm.errors import NumericalError
from sparsellm.linalg import DAMPING_RETRIES, damped_cholesky, factor_dtype, one_thread


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
    # What a solver derived from these statistics alone (SparseGPT's inverse factor), kept for
    # the other layers sharing them (q/k/v, gate/up); the pruner clears it after the group.
    memo: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass
class SolveResult:
    """A solver's output for one layer."""

    weight: torch.Tensor
    loss: float | None = None  # the solver's own objective figure, if it has one
    damping: float | None = None  # damping fraction finally used for the Hessian
    damping_retries: int = 0  # how often the Cholesky factorisation had to be retried
    extra: dict = field(default_factory=dict)


def inverse_hessian_cholesky(
    hessian: torch.Tensor, dampening: float, max_retries: int = DAMPING_RETRIES
) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor ``U`` of ``(H + λ·mean(diag H)·I)⁻¹`` (so ``H⁻¹ = Uᵀ U``).

    Returns ``U`` (float32), the damping fraction λ used and how often the damping had to be
    raised (:func:`~sparsellm.linalg.damped_cholesky`'s rule), so the caller can report it; an
    identity is never substituted. Factorised in :func:`~sparsellm.linalg.factor_dtype`
    (float64 on the CPU up to 4096 columns, float32 on GPUs and for wider Grams).
    """
    H = hessian.to(factor_dtype(hessian))
    fraction, retries = dampening, 0
    while True:
        # The inverse must factor too (in float32 it may not, for a wide ill-conditioned H):
        # if it does not, the same rule goes on, tenfold damping, from where it stopped.
        L, fraction, more = damped_cholesky(H, fraction, max_retries=max_retries - retries)
        retries += more
        with one_thread(L.device):
            U, failed = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        if not failed and torch.isfinite(U).all():
            return U.to(torch.float32), fraction, retries
        if retries >= max_retries:
            raise NumericalError(
                f"inverse of the damped Hessian (damping {fraction:g}) has no Cholesky factor"
            )
        fraction, retries = fraction * 10, retries + 1


def relative_output_error(
    weight: torch.Tensor, new_weight: torch.Tensor, hessian: torch.Tensor
) -> float:
    """``‖(W − Ŵ)X‖² / ‖W X‖²`` over the calibration tokens, computed from ``H = X Xᵀ``."""
    weight, hessian = weight.detach().float(), hessian.detach().float()
    delta = weight - new_weight.detach().float()
    num = ((delta @ hessian) * delta).sum()
    den = ((weight @ hessian) * weight).sum()
    return float(num / den) if den > 0 else float(num)
