"""SparseGPT (Frantar & Alistarh, 2023): OBS mask selection with lazy error compensation.

Minimises ``‖W X − Ŵ X‖²`` column by column. With ``U`` the upper Cholesky factor of
``H⁻¹`` (``H = X Xᵀ`` damped), pruning column ``j`` of a row changes the row by
``−(w_j / U_jj) · U_j,j:``, which keeps the remaining columns optimal for the columns already
fixed. Columns are processed in blocks: inside a block updates are applied eagerly, the block's
accumulated error is pushed to later columns with one matrix product.

``U`` depends on ``H`` alone, so layers sharing their inputs (q/k/v, gate/up) share it: it is
computed once per statistics object (:func:`inverse_factor`, kept in ``stats.memo``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sparsellm.masks import SparsityTarget, nm_mask, prune_counts, smallest_mask
from sparsellm.solvers.base import LayerStatistics, SolveResult, inverse_hessian_cholesky


def sparsegpt(
    weight: torch.Tensor,
    stats: LayerStatistics,
    target: SparsityTarget,
    *,
    blocksize: int = 128,
    dampening: float = 0.01,
) -> SolveResult:
    """Prune ``weight`` [out, in] to ``target`` given the input Gram matrix ``stats.hessian``.

    The inverse factor is taken from ``stats.memo`` when a layer sharing ``stats`` left it there
    (it is the same computation on the same matrix, so the numbers do not change).
    """
    key = ("sparsegpt.inverse_factor", dampening)
    factor = stats.memo.get(key)
    if factor is None:
        factor = stats.memo[key] = inverse_factor(stats.hessian, dampening)
    return obs_prune(
        weight, stats.hessian, target, blocksize=blocksize, dampening=dampening, factor=factor
    )


class InverseFactor(NamedTuple):
    """What an OBS sweep needs of ``H``: see :func:`inverse_factor`."""

    upper: torch.Tensor  # U, upper Cholesky factor of the damped H⁻¹ (float32)
    damping: float  # the damping fraction used
    retries: int  # how often the damping was raised


def inverse_factor(hessian: torch.Tensor, dampening: float) -> InverseFactor:
    """``U`` of ``(H + λ·mean(diag H)·I)⁻¹`` with dead inputs (zero diagonal) given a unit
    diagonal, as in SparseGPT (:func:`~sparsellm.solvers.base.inverse_hessian_cholesky`)."""
    H = hessian.detach().to(torch.float32).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    return InverseFactor(*inverse_hessian_cholesky(H, dampening))


def obs_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    target: SparsityTarget,
    *,
    blocksize: int = 128,
    dampening: float = 0.01,
    factor: InverseFactor | None = None,
) -> SolveResult:
    """Sparse least squares ``min ‖(W − Ŵ) A‖²`` for ``H = A Aᵀ`` by one OBS sweep.

    ``factor``: :func:`inverse_factor` of ``hessian`` and ``dampening`` when the caller already
    has it (layers sharing ``H``); computed here otherwise.
    """
    W = weight.detach().to(torch.float32).clone()
    rows, cols = W.shape
    if target.is_nm and blocksize % target.m:
        raise ValueError(f"blocksize {blocksize} is not a multiple of M={target.m}")

    W[:, hessian.diagonal().to(torch.float32) == 0] = 0.0  # dead inputs
    if factor is None:
        factor = inverse_factor(hessian, dampening)
    U, damping, retries = factor

    starts = list(range(0, cols, blocksize))
    if not target.is_nm:
        counts = prune_counts(
            [rows * (min(s + blocksize, cols) - s) for s in starts], target.sparsity
        )
    mask = torch.zeros_like(W, dtype=torch.bool)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)

    for b, i1 in enumerate(starts):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal()
        err = torch.zeros_like(W1)
        if target.is_nm:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            mask1 = smallest_mask(W1.square() / d.square(), int(counts[b]))
        for j in range(i2 - i1):
            if target.is_nm and j % target.m == 0:
                group = slice(j, j + target.m)
                mask1[:, group] = nm_mask(
                    W1[:, group].square() / d[group].square(), target.n, target.m
                )
            w = W1[:, j]
            e = torch.where(mask1[:, j], w, torch.zeros_like(w)) / d[j]
            loss += e.square().sum()
            # w − e·U_jj is exactly the pruned column; later columns absorb the error.
            W1[:, j:].addr_(e, U1[j, j:], alpha=-1.0)
            err[:, j] = e
        W1[mask1] = 0.0
        W[:, i1:i2] = W1
        mask[:, i1:i2] = mask1
        if i2 < cols:
            W[:, i2:].addmm_(err, U[i1:i2, i2:], alpha=-1.0)

    return SolveResult(weight=W, loss=float(loss) / 2, damping=damping, damping_retries=retries)
