"""Sparsity targets and mask selection.

A mask is a boolean tensor shaped like the weight where ``True`` marks a weight to *prune*.
Selection is by rank (stable sort), never by ``<= threshold``: quantised checkpoints have many
tied magnitudes, and a threshold would overshoot the target. Ties go to the lower index.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class SparsityTarget:
    """What to reach in each pruned weight matrix.

    Either ``sparsity`` (unstructured fraction of zeros) or an N:M pattern: in every group of
    ``m`` consecutive weights along the input dimension at most ``n`` stay non-zero (the
    hardware convention: 2:4 keeps 2 of every 4, i.e. 50% sparsity).
    """

    sparsity: float = 0.0
    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    @property
    def fraction(self) -> float:
        """Fraction of zeros this target produces."""
        return 1.0 - self.n / self.m if self.is_nm else self.sparsity

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:.0%}"

    @classmethod
    def parse(cls, sparsity: float | None = None, pattern: str | None = None) -> SparsityTarget:
        """Build a target from a ``sparsity`` fraction or an ``"N:M"`` string, validating both."""
        if pattern is not None and sparsity is not None:
            raise ValueError("give either sparsity or pattern, not both")
        if pattern is not None:
            match = _PATTERN.match(str(pattern))
            if not match:
                raise ValueError(f"pattern {pattern!r} is not of the form N:M (e.g. 2:4)")
            n, m = int(match.group(1)), int(match.group(2))
            if n <= 0 or m <= 0 or n >= m:
                raise ValueError(f"pattern {pattern!r} needs 0 < N < M")
            return cls(n=n, m=m)
        if sparsity is None:
            raise ValueError("give a sparsity or a pattern")
        sparsity = float(sparsity)
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity {sparsity} is outside [0, 1)")
        return cls(sparsity=sparsity)


def prune_counts(sizes: list[int] | torch.Tensor, sparsity: float) -> torch.Tensor:
    """How many entries to prune in each of consecutive groups of the given sizes.

    Cumulative rounding makes the counts add up to exactly ``round(sparsity * sum(sizes))``
    while every group stays within one of its own share.
    """
    sizes = torch.as_tensor(sizes, dtype=torch.float64)
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), sizes.cumsum(0)])
    targets = torch.round(cumulative * sparsity).long()
    return targets[1:] - targets[:-1]


# Below this many entries a plain kthvalue is as fast as the band search.
_BAND_MIN = 1 << 16
_BAND_SAMPLE = 1 << 14  # entries of the random sample that brackets the k-th value
_BAND_WIDTH = 0.01  # the bracket: the sample's quantiles at count/n ± this


def kth_smallest(flat: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count``-th smallest entry of the 1-D ``flat`` (1-based), exactly
    ``flat.kthvalue(count).values``.

    ``kthvalue`` is one thread over the whole tensor (14 ms for 0.9 M entries, half of an ADMM
    iteration). Here a sample brackets the value, the entries inside the bracket (~2 %) are
    selected in parallel passes, and ``kthvalue`` runs on those alone (:func:`band_kth`); if
    the bracket misses, the whole tensor is searched.
    """
    n = flat.numel()
    if n < _BAND_MIN or flat.is_floating_point() and not bool(torch.isfinite(flat).all()):
        return flat.kthvalue(count).values
    found = band_kth(flat, count)
    return flat.kthvalue(count).values if found is None else found


@functools.lru_cache(maxsize=16)
def sample_positions(n: int) -> torch.Tensor:
    """The positions :func:`band_kth` samples in a tensor of ``n`` entries: random, seeded by
    ``n``, so every call on that size draws the same ones (an ADMM loop asks each iteration).

    Not strided: a strided sample aliases with the row length of a flattened matrix (stride
    54 over a [1536, 576] weight visits 32 of its columns), and where columns differ in scale
    its bracket missed three ADMM projections in four."""
    return torch.randint(n, (_BAND_SAMPLE,), generator=torch.Generator().manual_seed(n))


def band_kth(flat: torch.Tensor, count: int) -> torch.Tensor | None:
    """The ``count``-th smallest entry of ``flat`` found among the entries between two
    quantiles of a sample, or None when that bracket does not hold it."""
    n = flat.numel()
    sample = flat[sample_positions(n).to(flat.device)]
    size, share = sample.numel(), count / n
    low = sample.kthvalue(max(1, int((share - _BAND_WIDTH) * size))).values
    high = sample.kthvalue(min(size, int((share + _BAND_WIDTH) * size) + 1)).values
    below = int((flat < low).sum())
    band = flat[(flat >= low) & (flat <= high)]
    if below < count <= below + band.numel():
        return band.kthvalue(count - below).values
    return None


def smallest_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the ``count`` smallest entries of ``scores`` (any shape), ties to lower index."""
    flat = scores.reshape(-1)
    if count <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if count >= flat.numel():
        return torch.ones_like(scores, dtype=torch.bool)
    # A linear-time selection of the k-th value, then ties at that value by index: the same
    # result as a stable sort, several times faster on the large blocks SparseGPT scores.
    kth = kth_smallest(flat, count)
    mask = flat < kth
    missing = count - int(mask.sum())
    if missing > 0:
        ties = (flat == kth).nonzero().squeeze(1)[:missing]
        mask[ties] = True
    return mask.view_as(scores)


def rowwise_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the smallest scores of every row; rows share the layer's exact total."""
    rows, cols = scores.shape
    counts = prune_counts([cols] * rows, sparsity).to(scores.device)
    order = torch.sort(scores, dim=1, stable=True).indices
    ranks = torch.arange(cols, device=scores.device).expand(rows, cols)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(1, order, ranks < counts.unsqueeze(1))
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the ``m - n`` smallest scores in every group of ``m`` consecutive columns."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} input features are not a multiple of M={m}")
    groups = scores.reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=2, stable=True).indices
    ranks = torch.arange(m, device=scores.device).expand_as(groups)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, order, ranks < (m - n))
    return mask.reshape(rows, cols)


def select_mask(
    scores: torch.Tensor, target: SparsityTarget, per_row: bool = False
) -> torch.Tensor:
    """Mask for a whole matrix: N:M groups, per-row top-k, or whole-matrix top-k."""
    if target.is_nm:
        return nm_mask(scores, target.n, target.m)
    if per_row:
        return rowwise_mask(scores, target.sparsity)
    return smallest_mask(scores, int(prune_counts([scores.numel()], target.sparsity)[0]))


def is_valid_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive input weights has at most ``n`` non-zeros."""
    rows, cols = weight.shape
    if cols % m:
        return False
    nonzero = (weight.reshape(rows, cols // m, m) != 0).sum(dim=2)
    return bool((nonzero <= n).all())
