"""Small dense linear-algebra helpers shared by the statistics collector and the solvers."""

from __future__ import annotations

import torch

GRAM_BLOCK = 256


def gram_blocks(size: int, block: int = GRAM_BLOCK) -> list[tuple[int, int]]:
    """Column ranges splitting ``size`` into blocks of ``block``."""
    return [(i, min(i + block, size)) for i in range(0, size, block)]


def add_gram_upper(gram: torch.Tensor, a: torch.Tensor, blocks: list[tuple[int, int]]) -> None:
    """``gram += aᵀa`` on the upper block triangle only: a Gram matrix is symmetric, so the
    lower blocks are a transpose away (:func:`mirror_upper`), which saves up to half the
    FLOPs of the dominant statistics cost."""
    if len(blocks) == 1:
        gram.addmm_(a.T, a)
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
