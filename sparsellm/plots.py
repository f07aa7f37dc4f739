"""Pictures of what pruning did (the optional ``plot`` extra, matplotlib).

* :func:`sweep_plot`: perplexity (log scale) and each task's accuracy against sparsity, one
  line per method, the dense model as a dashed line.
* :func:`depth_plot`: per-block sparsity, layer reconstruction error and block output error
  (fallbacks marked) across depth, one line per pruned output.

Figures are written with the non-interactive Agg backend (no display needed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparsellm.lm_tasks import MissingExtraError

PLOT_HINT = "pip install 'sparsellm[plot]'"
DPI = 110  # the README's figures stay well under 300 KB


def require_matplotlib(what: str = "--plot") -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or one line saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        message = f"{what} needs matplotlib, which is not installed: {PLOT_HINT}"
        raise MissingExtraError(message) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def sweep_plot(
    rows: Sequence[dict[str, Any]],
    path: str | Path,
    accuracy: Sequence[str] = (),
    title: str = "",
) -> Path:
    """Perplexity and the ``accuracy`` columns (``task/metric``) of sweep ``rows`` against
    sparsity, one line per method; the ``dense`` row as a dashed horizontal line."""
    plt = require_matplotlib()
    columns = ["perplexity", *accuracy]
    figure, axes = plt.subplots(1, len(columns), figsize=(5.2 * len(columns), 4.0), squeeze=False)
    dense = next((row for row in rows if row["method"] == "dense"), None)
    methods = list(dict.fromkeys(row["method"] for row in rows if row["method"] != "dense"))
    for ax, column in zip(axes[0], columns, strict=True):
        for index, method in enumerate(methods):
            points = sorted(
                (float(row["sparsity"]) * 100, float(row[column]))
                for row in rows
                if row["method"] == method and _finite(_float(row.get(column)))
            )
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", label=method, color=f"C{index}")  # one per method
        if dense is not None and _finite(_float(dense.get(column))):
            ax.axhline(float(dense[column]), color="grey", linestyle="--", label="dense")
        if column == "perplexity":
            ax.set_yscale("log")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel(column)
        ax.set_title(column if column == "perplexity" else column.replace("/", ": "))
        ax.grid(True, alpha=0.3)
    axes[0][0].legend()
    if title:
        figure.suptitle(title)
    return _save(plt, figure, path)


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def depth_plot(
    outputs: Sequence[tuple[str, Sequence[dict[str, Any]]]], path: str | Path, title: str = ""
) -> Path:
    """Per-block rows (:func:`sparsellm.layer_report.block_rows`) of each labelled output
    across depth: sparsity, mean layer error, block output error; fallbacks as red crosses."""
    plt = require_matplotlib()
    panels = (
        ("sparsity", "sparsity of the block's layers", False),
        ("layer_error", "layer reconstruction error (mean)", True),
        ("output_error", "block output error", True),
    )
    figure, axes = plt.subplots(len(panels), 1, figsize=(9.0, 8.0), sharex=True)
    for index, (label, blocks) in enumerate(outputs):
        for ax, (key, _, _) in zip(axes, panels, strict=True):
            points = [(b["block"], b[key]) for b in blocks if _finite(b.get(key))]
            if points:
                xs, ys = zip(*points, strict=True)
                # one colour per output in every panel (a panel may lack some outputs)
                ax.plot(xs, ys, marker=".", label=label, color=f"C{index}")
        fallbacks = [(b["block"], b["output_error"]) for b in blocks if b.get("fallback")]
        if fallbacks:
            xs, ys = zip(*fallbacks, strict=True)
            axes[2].scatter(xs, ys, marker="x", color="red", s=60, zorder=3)
    for ax, (_, name, log) in zip(axes, panels, strict=True):
        ax.set_ylabel(name if len(name) < 20 else name.replace(" (", "\n("), fontsize=9)
        if log and ax.get_lines():
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("block (depth)")
    axes[0].legend(fontsize=8)
    if any(b.get("fallback") for _, blocks in outputs for b in blocks):
        axes[2].set_title("x: block re-done by the fallback method", fontsize=9)
    if title:
        figure.suptitle(title)
    return _save(plt, figure, path)


def _save(plt: Any, figure: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return path
