"""Per-layer sparsity allocation: which share of the target's zeros each pruned layer takes.

Rules (``--allocation``):

- ``uniform``: every layer at the target (no pre-pass; the engine's behaviour before rules).
- ``owl``: OWL (Yin et al., 2023). A block's *outlier ratio* is the fraction of its Wanda
  scores ``|W_ij|·‖x_j‖`` above ``OWL_OUTLIER_FACTOR`` times their mean (pooled over the
  block's pruned layers); ratios are normalised to [0, 1] over the blocks and a block gets
  ``target − 2·spread·(ratio − mean ratio)``: blocks with more outliers keep more weights.
  Every layer of a block gets the block's sparsity.
- ``error``: each layer by the output error its zeros cause. Removing ``w_ij`` alone costs
  ``w_ij²·‖x_j‖²`` of ``‖W X‖²`` (the diagonal of the layer's Hessian); divided by the
  layer's total ``Σ w_ij²·‖x_j‖²`` (the diagonal proxy of its dense output energy) this is a
  *relative* cost. One threshold over every layer's relative costs, chosen so the total count
  of zeros is the target's, gives each layer the zeros below it: the sum over layers of their
  relative diagonal errors is the least any allocation with the same total reaches (a
  separable problem whose per-layer costs, sorted, are convex), within the spread bounds.

Whatever the rule, the per-layer sparsities are projected onto the constraints (each within
``target ± spread`` clipped to [0, 0.99]; the counts of zeros summing to ``round(target ·
weights)`` exactly, each layer within one weight of its real-valued share), and the engine
prunes each layer at its own sparsity with the chosen method.

The statistics come from one dense pre-pass (:func:`sparsellm.engine.dense_pass`): each
block is streamed once over the calibration windows, its Linear inputs' squared norms
``‖x_j‖²`` collected by the statistics pass Wanda uses, and only a per-layer summary is kept
(``_BINS`` counts for ``error``, two numbers for ``owl``), never a weight or a token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparsellm.engine import BlockJob
from sparsellm.masks import SparsityTarget
from sparsellm.models import linear_weight
from sparsellm.solvers import Statistic

RULES = ("uniform", "owl", "error")
OWL_OUTLIER_FACTOR = 5.0  # OWL's M: a score above M x the block's mean score is an outlier
MAX_SPARSITY = 0.99  # no layer is pruned beyond this, whatever the spread allows
# The error rule's summary of a layer: counts (and cost sums) of its relative costs in
# log-spaced bins. A relative cost is at most 1; below 1e-24 it is zero for any purpose.
_BINS = 4800
_LOG_LOW, _LOG_HIGH = -24.0, 0.0
_BISECTIONS = 100  # halvings of the threshold's or shift's interval (float64: exact enough)


@dataclass
class LayerProfile:
    """What the pre-pass keeps of one dense layer."""

    name: str  # full module name
    block: int
    numel: int
    counts: torch.Tensor | None = None  # error: weights per log bin of relative cost (float64)
    sums: torch.Tensor | None = None  # error: their relative costs summed per bin (float64)

    def relative_cost(self, sparsity: float) -> float:
        """The layer's relative diagonal error ``Σ_pruned w²‖x‖² / Σ w²‖x‖²`` when its
        ``sparsity`` smallest costs are pruned (from the bins, linear inside a bin)."""
        wanted = sparsity * self.numel
        cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), self.counts.cumsum(0)])
        b = int(torch.searchsorted(cumulative, torch.tensor(wanted, dtype=torch.float64)))
        b = min(max(b, 1), _BINS)
        inside = self.counts[b - 1]
        share = float((wanted - cumulative[b - 1]) / inside) if inside > 0 else 0.0
        return float(self.sums[: b - 1].sum()) + share * float(self.sums[b - 1])


@dataclass
class LayerAllocation:
    """One layer's sparsity and why."""

    sparsity: float  # zeros / weights the layer is pruned to
    zeros: int
    score: float  # owl: the block's outlier ratio; error: relative diagonal error at target


@dataclass
class Allocation:
    """The per-layer sparsities of a run and the rule's figures."""

    rule: str
    target: float
    spread: float
    layers: dict[str, LayerAllocation]  # by full module name
    figures: dict[str, float] = field(default_factory=dict)

    def sparsities(self) -> dict[str, float]:
        """Each layer's sparsity by full name (what the engine prunes to)."""
        return {name: layer.sparsity for name, layer in self.layers.items()}

    def summary(self) -> dict:
        """The report's ``allocation`` entry (without the per-layer rows)."""
        values = [layer.sparsity for layer in self.layers.values()]
        zeros = sum(layer.zeros for layer in self.layers.values())
        return {
            "rule": self.rule,
            "target": self.target,
            "spread": self.spread,
            "bounds": list(bounds(self.target, self.spread)),
            "zeros": zeros,
            "min_sparsity": min(values),
            "max_sparsity": max(values),
            **self.figures,
        }


def bounds(target: float, spread: float) -> tuple[float, float]:
    """The range every layer's sparsity stays in: ``target ± spread`` within [0, 0.99]."""
    return max(0.0, target - spread), min(MAX_SPARSITY, target + spread)


class Allocator:
    """Collects the rule's statistics block by block in the dense pre-pass, then allocates.

    ``visit`` is called by :func:`sparsellm.engine.dense_pass` with each dense block (on the
    device, its inputs in ``job.inputs``); it returns the block's dense outputs when asked.
    ``sparsities`` then allocates (a :class:`~sparsellm.engine.SparsityAllocator`).
    """

    def __init__(self, rule: str, target: SparsityTarget, spread: float):
        if rule not in RULES[1:]:
            raise ValueError(f"unknown allocation rule {rule!r}")
        self.rule, self.target, self.spread = rule, target.sparsity, spread
        self.profiles: list[LayerProfile] = []
        self.block_ratios: dict[int, float] = {}  # owl
        self.allocation: Allocation | None = None  # once :meth:`sparsities` ran

    def visit(self, job: BlockJob, keep_outputs: bool) -> list[torch.Tensor]:
        """Profile the prunable layers of one dense block; its outputs with ``keep_outputs``."""
        from sparsellm.pruners.layerwise import collect_statistics

        stats, outputs = collect_statistics(job, job.layers, Statistic.NORMS, keep_outputs)
        scores = {}
        for name, module in job.layers.items():
            weight = linear_weight(module).detach()
            # Squared Wanda score: w_ij² ‖x_j‖², the diagonal cost of removing w_ij (a new
            # float32 tensor: the weight itself is not touched).
            cost = weight.to(torch.float32, copy=True).square_()
            scores[name] = cost.mul_(stats[name].sq_norms.unsqueeze(0))
        names = {name: job.full_name(name) for name in job.layers}
        if self.rule == "owl":
            self.block_ratios[job.index] = _outlier_ratio(list(scores.values()))
            self.profiles += [
                LayerProfile(names[n], job.index, s.numel()) for n, s in scores.items()
            ]
        else:
            self.profiles += [_cost_profile(names[n], job.index, s) for n, s in scores.items()]
        return outputs

    def sparsities(self) -> dict[str, float]:
        """Each layer's sparsity by full name, after the pre-pass (kept in ``allocation``)."""
        self.allocation = self._owl() if self.rule == "owl" else self._error()
        return self.allocation.sparsities()

    def _owl(self) -> Allocation:
        ratios = self.block_ratios
        low, high = min(ratios.values()), max(ratios.values())
        span = high - low if high > low else 1.0
        normalised = {block: (ratio - low) / span for block, ratio in ratios.items()}
        mean = sum(normalised.values()) / len(normalised)
        # OWL: the normalised ratios spread over 2·spread around the target, outliers kept.
        desired = [
            self.target - 2 * self.spread * (normalised[p.block] - mean) for p in self.profiles
        ]
        limits = bounds(self.target, self.spread)
        sparsities = _project(torch.tensor(desired), self._sizes(), *limits, self._total())
        scores = [ratios[p.block] for p in self.profiles]
        return self._allocation(sparsities, scores, {"outlier_factor": OWL_OUTLIER_FACTOR})

    def _error(self) -> Allocation:
        low, high = bounds(self.target, self.spread)
        counts = torch.stack([p.counts for p in self.profiles])  # [layers, bins]
        sizes, total = self._sizes(), self._total()

        def shares(log_threshold: float) -> torch.Tensor:
            return (_below(counts, log_threshold) / sizes).clamp_(low, high)

        lo, hi = _LOG_LOW, _LOG_HIGH
        for _ in range(_BISECTIONS):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if float((shares(mid) * sizes).sum()) < total else (lo, mid)
        sparsities = _project(shares(hi), sizes, low, high, total)
        scores = [p.relative_cost(self.target) for p in self.profiles]
        return self._allocation(sparsities, scores, {"log10_threshold": hi})

    def _sizes(self) -> torch.Tensor:
        return torch.tensor([p.numel for p in self.profiles], dtype=torch.float64)

    def _total(self) -> int:
        """Zeros over all pruned layers: the target's share of their weights, rounded."""
        return round(self.target * sum(p.numel for p in self.profiles))

    def _allocation(
        self, sparsities: torch.Tensor, scores: list[float], figures: dict[str, float]
    ) -> Allocation:
        zeros = exact_counts(sparsities * self._sizes(), self._total())
        layers = {
            p.name: LayerAllocation(z / p.numel, z, score)
            for p, z, score in zip(self.profiles, zeros, scores, strict=True)
        }
        if self.rule == "error":
            figures["relative_error_sum"] = sum(
                p.relative_cost(layers[p.name].sparsity) for p in self.profiles
            )
            figures["relative_error_sum_uniform"] = sum(scores)
        return Allocation(self.rule, self.target, self.spread, layers, figures)


def _outlier_ratio(scores: list[torch.Tensor]) -> float:
    """Fraction of a block's Wanda scores ``|w|·‖x‖`` above OWL's factor times their mean,
    pooled over the block's layers (``scores`` are the squared scores)."""
    count = sum(s.numel() for s in scores)
    mean = sum(float(s.sqrt().sum(dtype=torch.float64)) for s in scores) / count
    limit = (OWL_OUTLIER_FACTOR * mean) ** 2
    return sum(int((s > limit).sum()) for s in scores) / count


def _cost_profile(name: str, block: int, costs: torch.Tensor) -> LayerProfile:
    """The layer's relative costs binned on the log grid: counts and sums per bin."""
    costs = costs.reshape(-1)
    total = float(costs.sum(dtype=torch.float64))
    relative = costs.div_(total) if total > 0 else costs
    position = relative.log10().sub_(_LOG_LOW).mul_(_BINS / (_LOG_HIGH - _LOG_LOW))
    bins = position.nan_to_num_(0.0, 0.0, 0.0).floor_().clamp_(0, _BINS - 1).long()
    counts = torch.bincount(bins, minlength=_BINS).double().cpu()
    sums = torch.bincount(bins, weights=relative.double(), minlength=_BINS).cpu()
    return LayerProfile(name, block, costs.numel(), counts, sums)


def _below(counts: torch.Tensor, log_threshold: float) -> torch.Tensor:
    """Weights below the threshold in each row of ``counts`` [..., bins], counting a bin's
    weights as spread evenly over it."""
    position = (log_threshold - _LOG_LOW) * _BINS / (_LOG_HIGH - _LOG_LOW)
    position = min(max(position, 0.0), float(_BINS))
    whole = int(position)
    below = counts[..., :whole].sum(-1)
    return below + counts[..., whole] * (position - whole) if whole < _BINS else below


def _project(
    desired: torch.Tensor, sizes: torch.Tensor, low: float, high: float, total: int
) -> torch.Tensor:
    """``clip(desired + c, low, high)`` with the shift ``c`` that makes the weighted sum
    ``total`` (the rule's shape kept, the overall sparsity exact)."""
    desired = desired.double()
    lo, hi = -1.0, 1.0
    for _ in range(_BISECTIONS):
        mid = (lo + hi) / 2
        reached = float(((desired + mid).clamp(low, high) * sizes).sum())
        lo, hi = (mid, hi) if reached < total else (lo, mid)
    return (desired + hi).clamp(low, high)


def exact_counts(shares: torch.Tensor, total: int) -> list[int]:
    """Integers within one of each real ``shares`` entry summing to ``total`` (largest
    remainders first, ties to the lower index)."""
    floors = shares.floor()
    counts = floors.long().tolist()
    missing = total - sum(counts)
    remainders = (shares - floors).tolist()
    order = sorted(range(len(counts)), key=lambda i: (-remainders[i], i))
    if missing >= 0:
        for i in order[:missing]:
            counts[i] += 1
    else:  # the shares summed a little above ``total``: take from the smallest remainders
        for i in order[::-1][:-missing]:
            counts[i] -= 1
    return counts


def allocator(rule: str, target: SparsityTarget, spread: float) -> Allocator | None:
    """The pre-pass collector of ``rule``, or ``None`` for ``uniform`` (no pre-pass)."""
    if rule == "uniform":
        return None
    return Allocator(rule, target, spread)
