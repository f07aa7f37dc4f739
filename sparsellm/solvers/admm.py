"""ADMM layer solver with a rising penalty, then conjugate-gradient refinement on the support.

Same objective as SparseGPT, ``min ‖(W − Ŵ) X‖²`` under a sparsity constraint, read as a
row-wise quadratic ``Σ_rows (w − ŵ) H (w − ŵ)ᵀ`` with ``H = X Xᵀ``; solved the way ALPS (Meng
et al., 2024) proposes instead of one greedy OBS sweep:

1. Scale. Inputs are normalised to unit energy (``H ← E H E``, ``W ← W E⁻¹`` with
   ``E = diag(H)^-½``), so one penalty schedule suits every layer and a weight's magnitude in
   the scaled space is its Wanda score ``|w|·‖x‖``.
2. ADMM on ``W = D``, ``D`` sparse. With penalty ``ρ``:
   ``W ← (Ŵ H + ρ (D − V)) (H + ρ I)⁻¹`` (least squares pulled towards ``D − V``),
   ``D ← P(W + V)`` (the largest entries: the layer's top-k, or N of every M),
   ``V ← V + W − D``. ``H = Q Λ Qᵀ`` is decomposed once, so every ``ρ`` costs two products
   with ``Q`` and no factorisation. ``ρ`` rises geometrically: early iterations move the
   support freely, late ones freeze it; we stop when the support has not changed for a while.
3. Refine. On the final support the problem is an unconstrained least squares per row:
   conjugate gradients, all rows at once (one ``P H`` product an iteration), started from the
   ADMM weights, so the kept weights compensate for the pruned ones as well as they can.

The eigenbasis depends on ``H`` alone, so layers sharing their inputs (q/k/v, gate/up) share it
through ``stats.memo`` like SparseGPT's factor.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sparsellm.linalg import one_thread
from sparsellm.masks import SparsityTarget, nm_mask, prune_counts, smallest_mask
from sparsellm.solvers.base import LayerStatistics, SolveResult

RHO = 0.1  # first penalty, for H scaled to a unit diagonal
RHO_GROWTH = 1.15  # the penalty's factor per iteration: ~25 iterations from moving to frozen
PATIENCE = 6  # iterations without a support change that end the loop


class Eigenbasis(NamedTuple):
    """What the ADMM iterations need of ``H``: see :func:`eigenbasis`."""

    scale: torch.Tensor  # E: [in], diag(H)^-½ (1 for dead inputs)
    hessian: torch.Tensor  # E H E + damping·I, float32 [in, in]
    vectors: torch.Tensor  # Q, float32 [in, in]
    values: torch.Tensor  # Λ, float32 [in], clamped at 0


def eigenbasis(hessian: torch.Tensor, dampening: float) -> Eigenbasis:
    """The scaled, damped ``H`` and its eigendecomposition (float64 ``eigh``: it is done once
    per statistics object, and float32 loses the small eigenvalues that matter here)."""
    H = hessian.detach().to(torch.float64)
    diagonal = H.diagonal().clone()
    alive = diagonal > 0
    scale = torch.where(alive, diagonal.clamp_min(1e-30).rsqrt(), torch.ones_like(diagonal))
    H = H * scale[:, None] * scale[None, :]
    H.diagonal().copy_(torch.where(alive, H.diagonal(), torch.ones_like(diagonal)))
    H.diagonal().add_(dampening)  # the scaled mean diagonal is 1: SparseGPT's damping fraction
    with one_thread(H.device):
        values, vectors = torch.linalg.eigh(H)
    return Eigenbasis(scale.float(), H.float(), vectors.float(), values.clamp_min(0).float())


def project(weight: torch.Tensor, target: SparsityTarget, count: int) -> torch.Tensor:
    """Mask (``True`` = pruned) of the sparse set's nearest point: the ``count`` smallest
    magnitudes of the layer, or the ``m - n`` smallest of every N:M group."""
    scores = weight.abs()
    if target.is_nm:
        return nm_mask(scores, target.n, target.m)
    return smallest_mask(scores, count)


def admm(
    weight: torch.Tensor,
    stats: LayerStatistics,
    target: SparsityTarget,
    *,
    iterations: int = 60,
    cg_iterations: int = 40,
    dampening: float = 0.01,
) -> SolveResult:
    """Prune ``weight`` [out, in] to ``target`` given the input Gram matrix ``stats.hessian``.

    ``iterations`` bounds the ADMM loop (it stops earlier once the support is stable);
    ``cg_iterations`` refine the weights on the final support.
    """
    key = ("admm.eigenbasis", dampening)
    basis = stats.memo.get(key)
    if basis is None:
        basis = stats.memo[key] = eigenbasis(stats.hessian, dampening)
    W0 = weight.detach().to(torch.float32) / basis.scale  # scaled: W0 · (E⁻¹ x) = Ŵ x
    W0[:, stats.hessian.diagonal() == 0] = 0.0  # dead inputs
    cross = W0 @ basis.hessian  # Ŵ H: the linear term of both the ADMM loop and the refit
    solution = sparse_least_squares(cross, W0, basis, target, iterations)
    refined = refine_on_support(cross, solution.weight, solution.mask, basis.hessian, cg_iterations)
    delta = refined - W0
    return SolveResult(
        weight=refined * basis.scale,
        loss=float(((delta @ basis.hessian) * delta).sum()) / 2,
        damping=dampening,
        extra={"admm_iterations": solution.iterations},
    )


class SparseSolution(NamedTuple):
    """The ADMM loop's result: the sparse iterate, its mask (``True`` = pruned), its length."""

    weight: torch.Tensor
    mask: torch.Tensor
    iterations: int


def sparse_least_squares(
    cross: torch.Tensor,
    start: torch.Tensor,
    basis: Eigenbasis,
    target: SparsityTarget,
    iterations: int,
    *,
    rho: float = RHO,
    growth: float = RHO_GROWTH,
    patience: int = PATIENCE,
) -> SparseSolution:
    """ADMM for ``min ⟨W, W H⟩ − 2⟨W, C⟩`` over ``W`` meeting ``target``, in the scaled
    space of ``basis`` (``cross`` = C there); ``start`` gives the first support.

    ``rho`` is the first penalty (``H`` has a unit diagonal here) and ``growth`` its factor
    an iteration; the loop stops once the support has not changed for ``patience`` iterations.
    """
    count = 0 if target.is_nm else int(prune_counts([start.numel()], target.fraction)[0])
    Q, values = basis.vectors, basis.values
    cross_q = cross @ Q  # C in the eigenbasis, fixed over the iterations
    mask = project(start, target, count)
    D = start.masked_fill(mask, 0.0)
    V = torch.zeros_like(start)
    stable = done = 0
    while done < iterations and stable < patience:
        W = ((cross_q + rho * ((D - V) @ Q)) / (values + rho)) @ Q.T  # (C + ρ(D − V))(H + ρI)⁻¹
        shifted = W + V
        new_mask = project(shifted, target, count)
        stable = stable + 1 if torch.equal(new_mask, mask) else 0
        mask = new_mask
        D = shifted.masked_fill_(mask, 0.0)
        V += W - D
        rho *= growth
        done += 1
    return SparseSolution(D, mask, done)


def refine_on_support(
    cross: torch.Tensor, start: torch.Tensor, mask: torch.Tensor, H: torch.Tensor, steps: int
) -> torch.Tensor:
    """``argmin ⟨W, W H⟩ − 2⟨W, C⟩`` over weights zero where ``mask``, by conjugate gradients
    from ``start``, every row its own system (all rows in one product a step)."""
    keep = (~mask).to(start.dtype)
    W = start * keep
    residual = (cross - W @ H) * keep  # minus half the gradient, on the support
    direction = residual.clone()
    rr = (residual * residual).sum(1)
    tolerance = float(rr.max()) * 1e-10  # the relative accuracy float32 products still give
    for _ in range(steps):
        Hp = (direction @ H) * keep
        curvature = (direction * Hp).sum(1)
        alpha = torch.where(curvature > 0, rr / curvature.clamp_min(1e-30), torch.zeros_like(rr))
        W += alpha[:, None] * direction
        residual -= alpha[:, None] * Hp
        rr_new = (residual * residual).sum(1)
        beta = torch.where(rr > 0, rr_new / rr.clamp_min(1e-30), torch.zeros_like(rr))
        direction = residual + beta[:, None] * direction
        rr = rr_new
        if float(rr.max()) <= tolerance:
            break
    return W
