"""What a pruning run did: per-layer figures, totals, timings and the configuration used."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class LayerReport:
    """One pruned Linear layer."""

    name: str
    block: int
    shape: list[int]
    sparsity: float
    zeros: int
    numel: int
    relative_error: float | None = None  # ‖(W−Ŵ)X‖² / ‖WX‖² on the calibration inputs
    damping: float | None = None
    damping_retries: int = 0
    # --allocation owl|error: the sparsity the rule gave this layer and its score (owl: the
    # block's outlier ratio; error: the layer's relative diagonal error at the target)
    allocated: float | None = None
    allocation_score: float | None = None


@dataclass
class BlockResult:
    """What a block pruner did to one decoder block.

    The pruner fills the layer rows, the path it took and why, and its solver's figures; it may
    hand over the block's outputs with the pruned weights (when it can form them cheaper than a
    forward pass) and the dense block's outputs on the same inputs. The engine completes
    ``output_error`` and ``fallback``; the report takes the rest as it is.
    """

    layers: list[LayerReport] = field(default_factory=list)
    path: str = "layerwise"
    reason: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    outputs: list[torch.Tensor] | None = None
    dense_outputs: list[torch.Tensor] | None = None
    output_error: float | None = None  # ‖B − B₀‖² / ‖B₀‖², block outputs on the same inputs
    fallback: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def row(self, index: int) -> dict[str, Any]:
        """The report's entry for this block (no tensors)."""
        entry = {
            "block": index,
            "path": self.path,
            "reason": self.reason,
            "output_error": self.output_error,
        }
        if self.fallback:
            entry["fallback"] = self.fallback
        return {**entry, **self.figures}


@dataclass
class PruneReport:
    """Returned by :func:`sparsellm.prune_model` and saved as ``sparsity_report.json``."""

    model: str
    architecture: str
    method: str
    target: str
    config: dict = field(default_factory=dict)
    layers: list[LayerReport] = field(default_factory=list)
    blocks: list[dict] = field(default_factory=list)  # per-block figures from block solvers
    timings: dict[str, float] = field(default_factory=dict)
    perplexity: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    allocation: dict[str, Any] | None = None  # the rule's summary (None: uniform)

    def set_allocation(self, summary: dict[str, Any], layers: dict[str, Any]) -> None:
        """Take a non-uniform allocation: its summary, and each layer row's sparsity and score
        (``layers``: :class:`~sparsellm.allocation.LayerAllocation` by full name)."""
        self.allocation = summary
        for row in self.layers:
            if row.name in layers:
                row.allocated = layers[row.name].sparsity
                row.allocation_score = layers[row.name].score

    def add_block(self, index: int, result: BlockResult) -> None:
        """Take one block's result: its layer rows, its summary row and its notes."""
        self.layers.extend(result.layers)
        self.blocks.append(result.row(index))
        self.notes.extend(result.notes)

    def finish(self) -> None:
        """Add the notes drawn from all blocks: the paths taken (first), Hessian damping."""
        paths = self.paths_note()
        if paths:
            self.notes.insert(0, paths)
        retried = [layer.name for layer in self.layers if layer.damping_retries]
        if retried:
            self.notes.append(
                f"{len(retried)} layer(s) needed more Hessian damping than requested: "
                + ", ".join(retried)
            )

    def paths_note(self) -> str | None:
        """One line saying which path each block took, grouped by path and reason."""
        groups: dict[tuple[str, str], list[int]] = {}
        for block in self.blocks:
            groups.setdefault((block["path"], block["reason"]), []).append(block["block"])
        if all(not reason for _, reason in groups):  # layer-wise methods: nothing to say
            return None
        parts = [
            f"{path} in block(s) {_ranges(indices)}" + (f" ({reason})" if reason else "")
            for (path, reason), indices in groups.items()
        ]
        return "paths: " + "; ".join(parts)

    @property
    def zeros(self) -> int:
        return sum(layer.zeros for layer in self.layers)

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over every pruned layer."""
        return self.zeros / self.numel if self.numel else 0.0

    def block_postfix(self) -> dict[str, str]:
        """Progress-bar figures of the last block taken."""
        if not self.blocks or self.blocks[-1]["output_error"] is None:
            return {}
        return {"block_err": f"{self.blocks[-1]['output_error']:.3g}"}

    def to_dict(self) -> dict:
        retries = [layer.name for layer in self.layers if layer.damping_retries]
        return {
            "model": self.model,
            "architecture": self.architecture,
            "method": self.method,
            "target": self.target,
            "totals": {
                "layers": len(self.layers),
                "parameters": self.numel,
                "zeros": self.zeros,
                "sparsity": self.sparsity,
                "layers_needing_more_damping": retries,
            },
            "allocation": self.allocation or {"rule": "uniform"},
            "perplexity": self.perplexity,
            "timings_seconds": self.timings,
            "notes": self.notes,
            "config": self.config,
            "layers": [asdict(layer) for layer in self.layers],
            "blocks": self.blocks,
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")

    def summary(self) -> str:
        """A few human-readable lines for the terminal."""
        lines = [
            f"{self.method} {self.target} on {self.model} ({self.architecture}): "
            f"{len(self.layers)} layers, {self.sparsity:.2%} zeros "
            f"({self.zeros:,} of {self.numel:,} weights)",
        ]
        if self.allocation is not None:
            lines.append(_allocation_line(self))
        errors = [x.relative_error for x in self.layers if x.relative_error is not None]
        if errors:
            lines.append(
                f"relative output error per layer: mean {sum(errors) / len(errors):.4f}, "
                f"max {max(errors):.4f}"
            )
        if "prune" in self.timings:
            lines.append(f"pruning took {self.timings['prune']:.1f} s")
        for key, value in self.perplexity.items():
            lines.append(
                f"perplexity {key}: {value:.3f}"
                if math.isfinite(value)
                else f"perplexity {key}: {value}"
            )
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


def _allocation_line(report: PruneReport) -> str:
    """How the layers' sparsities spread, the extremes named."""
    allocation = report.allocation
    rows = [row for row in report.layers if row.allocated is not None]
    low = min(rows, key=lambda row: row.sparsity)
    high = max(rows, key=lambda row: row.sparsity)
    return (
        f"allocation {allocation['rule']} (spread {allocation['spread']:g}): layers from "
        f"{low.sparsity:.2%} ({low.name}) to {high.sparsity:.2%} ({high.name}); each layer's "
        "sparsity and score are in sparsity_report.json"
    )


def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    spans: list[list[int]] = []
    for i in indices:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)
