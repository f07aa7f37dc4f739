"""Small dense linear-algebra helpers shared by the statistics collector and the solvers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch

from sparsellm.errors import NumericalError

GRAM_BLOCK = 256


@contextlib.contextmanager
def one_thread(device: torch.device) -> Iterator[None]:
    """Run what is inside on one CPU thread (a no-op elsewhere, or with one thread already).

    For LAPACK's factorisations (Cholesky, its inverse, triangular solves, eigh): with 1 and 2
    threads they round differently, matrix products do not. On one thread they give the same
    bits whatever ``torch.get_num_threads()`` is, so one process using every core and torchrun
    ranks with one thread each prune alike. They run once per layer group (d³/3), a small
    cost next to a solve's products.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# The damping rule of every damped Cholesky factorisation (:func:`damped_cholesky`).
# A requested damping of 0 is tried as asked (``--dampening 0`` means none); when that fails
# the damping continues from here, so with the retries below the last try is 0.1.
DAMPING_FLOOR = 1e-6
# Tenfold increases after a failed factorisation, before giving up.
DAMPING_RETRIES = 6
# Widest Gram factorised in float64 on the CPU: wider ones cost too much memory and time.
FLOAT64_MAX_WIDTH = 4096


def gram_blocks(size: int, block: int = GRAM_BLOCK) -> list[tuple[int, int]]:
    """Column ranges splitting ``size`` into blocks of ``block``."""
    return [(i, min(i + block, size)) for i in range(0, size, block)]


def add_gram_upper(gram: torch.Tensor, a: torch.Tensor, blocks: list[tuple[int, int]]) -> None:
    """``gram += aᵀa`` on the upper block triangle only: a Gram matrix is symmetric, so the
    lower blocks are a transpose away (:func:`mirror_upper`), which saves up to half the
    FLOPs of the dominant statistics cost.

    A ``gram`` wider than ``a`` (float64 sums of float32 products) gets each block row's
    product formed in ``a``'s dtype and then added: the sum of a few such products is then
    exact in float64 for practically every entry, so it does not depend on the order of the
    additions (:class:`~sparsellm.statistics.StatisticsCollector`). Otherwise the product
    accumulates into ``gram`` directly (one fused ``addmm`` per block)."""
    if gram.dtype != a.dtype:
        for i0, i1 in blocks:
            gram[i0:i1, i0:] += a[:, i0:i1].T @ a[:, i0:]
        return
    for bi, (i0, i1) in enumerate(blocks):
        ai = a[:, i0:i1]
        for j0, j1 in blocks[bi:]:
            gram[i0:i1, j0:j1].addmm_(ai.T, a[:, j0:j1])


def mirror_upper(gram: torch.Tensor, blocks: list[tuple[int, int]]) -> None:
    """Copy the upper block triangle of ``gram`` onto its lower one, in place."""
    for bi, (i0, i1) in enumerate(blocks):
        for j0, j1 in blocks[bi + 1 :]:
            gram[j0:j1, i0:i1] = gram[i0:i1, j0:j1].T


def sq_norm(x: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norm as a float64 scalar (one fused reduction, no temporary)."""
    return torch.linalg.vector_norm(x).to(torch.float64).square()


def factor_dtype(gram: torch.Tensor) -> torch.dtype:
    """The dtype to factorise ``gram`` in: float64 on the CPU up to :data:`FLOAT64_MAX_WIDTH`
    (where it costs twice float32 and every CPU number stays as recorded), float32 elsewhere:
    GPUs run float64 at a small fraction of their float32 speed (1/64 on consumer cards), and
    :func:`damped_cholesky`'s damping fallback covers what float32 cannot factor."""
    if gram.device.type == "cpu" and gram.shape[0] <= FLOAT64_MAX_WIDTH:
        return torch.float64
    return torch.float32


class DampedCholesky(NamedTuple):
    """Result of :func:`damped_cholesky`."""

    factor: torch.Tensor  # lower L with L Lᵀ = H + fraction·mean(diag H)·I, in H's dtype
    fraction: float  # the damping fraction that was used
    retries: int  # how often the damping was raised before the factorisation succeeded


def damped_cholesky(
    gram: torch.Tensor, dampening: float, *, max_retries: int = DAMPING_RETRIES
) -> DampedCholesky:
    """Lower Cholesky factor of ``H + λ·mean(diag H)·I``, the one damping rule of every solver.

    λ starts at ``dampening`` and grows tenfold after each failed factorisation, to no less
    than :data:`DAMPING_FLOOR` (a zero or vanishing ``dampening`` would never get there),
    at most ``max_retries`` times. A mean diagonal that is not
    positive (a zero or broken Gram) is taken as 1 so that the damping still adds something.
    The factorisation runs in ``gram``'s dtype: callers choose it with :func:`factor_dtype`.

    Raises:
        NumericalError: ``gram`` holds NaN/Inf, or no damping of the schedule made it factor
            (the message names the last damping tried).
    """
    if not torch.isfinite(gram).all():
        raise NumericalError("Gram matrix to factor contains NaN or Inf")
    mean = gram.diagonal().mean()
    if not mean > 0:
        mean = torch.ones((), dtype=gram.dtype, device=gram.device)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    fraction = dampening
    for retries in range(max_retries + 1):
        if retries:
            fraction = max(fraction * 10, DAMPING_FLOOR)
        with one_thread(gram.device):
            factor, failed = torch.linalg.cholesky_ex(gram + fraction * mean * eye)
        if not failed:
            return DampedCholesky(factor, fraction, retries)
    raise NumericalError(f"Gram matrix not positive definite even with damping {fraction:g}")
