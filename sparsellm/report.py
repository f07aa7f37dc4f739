"""What a pruning run did: per-layer figures, totals, timings and the configuration used."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path


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

    def block_postfix(self, block: int) -> dict[str, str]:
        errors = [
            layer.relative_error
            for layer in self.layers
            if layer.block == block and layer.relative_error is not None
        ]
        return {"mean_err": f"{sum(errors) / len(errors):.3g}"} if errors else {}

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
