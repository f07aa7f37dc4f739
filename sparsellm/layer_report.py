"""``sparsellm report``: what pruning did across depth, read back from saved reports.

A pruned output's ``sparsity_report.json`` (:class:`sparsellm.report.PruneReport`) holds a row
per layer (sparsity, zeros, relative output error on the calibration inputs) and a row per
block (output error against the dense block, fallback). Here they become one row per block
for each output, printed side by side, and optionally drawn (:func:`sparsellm.plots.depth_plot`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparsellm.errors import UserError
from sparsellm.jsonfile import read_json_object

REPORT = "sparsity_report.json"


class ReportError(UserError):
    """A pruned output without a readable sparsity report."""


def load_report(path: str | Path) -> dict[str, Any]:
    """The report of a pruned output directory, or of a ``sparsity_report.json`` path."""
    path = Path(path)
    file = path / REPORT if path.is_dir() else path
    if not file.is_file():
        raise ReportError(f"{str(path)!r} is neither a pruned output with {REPORT} nor a report")
    report = read_json_object(file, ReportError)
    if not isinstance(report.get("layers"), list):
        raise ReportError(f"{str(file)!r} has no per-layer rows ('layers'): not a {REPORT}")
    return report


def label_of(path: str | Path, report: dict[str, Any]) -> str:
    """A short name for an output: its method and target, or its path."""
    if report.get("method") and report.get("target"):
        return f"{report['method']} {report['target']}"
    return str(path)


def block_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per block: sparsity of its pruned layers, mean relative layer error (``None``
    for data-free methods), block output error and whether the block fell back."""
    layers: dict[int, list[dict]] = {}
    for layer in report["layers"]:
        layers.setdefault(int(layer["block"]), []).append(layer)
    blocks = {int(b["block"]): b for b in report.get("blocks", []) if "block" in b}
    rows = []
    for index in sorted(set(layers) | set(blocks)):
        own = layers.get(index, [])
        numel = sum(layer["numel"] for layer in own)
        errors = [layer["relative_error"] for layer in own if _finite(layer.get("relative_error"))]
        block = blocks.get(index, {})
        rows.append(
            {
                "block": index,
                "sparsity": sum(layer["zeros"] for layer in own) / numel if numel else None,
                "layer_error": sum(errors) / len(errors) if errors else None,
                "output_error": block.get("output_error"),
                "fallback": bool(block.get("fallback")),
            }
        )
    return rows


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _cell(value: Any, kind: str) -> str:
    if not _finite(value):
        return "-"
    return f"{value:.2%}" if kind == "sparsity" else f"{value:.3g}"


def depth_table(outputs: Sequence[tuple[str, Sequence[dict[str, Any]]]]) -> str:
    """Block rows of each labelled output side by side: sparsity, mean layer error, block
    output error (``*``: the block was re-done by the fallback method)."""
    header = ["block"]
    for label, _ in outputs:
        header += [f"{label}: sparsity", "layer err", "block err"]
    table = [header]
    indices = sorted({row["block"] for _, rows in outputs for row in rows})
    for index in indices:
        line = [str(index)]
        for _, rows in outputs:
            row = next((r for r in rows if r["block"] == index), {})
            error = _cell(row.get("output_error"), "error") + ("*" if row.get("fallback") else "")
            line += [
                _cell(row.get("sparsity"), "sparsity"),
                _cell(row.get("layer_error"), "error"),
                error,
            ]
        table.append(line)
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    text = [
        "  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)) for line in table
    ]
    if any(row.get("fallback") for _, rows in outputs for row in rows):
        text.append("*: block re-done by the fallback method (see the report's 'blocks')")
    return "\n".join(text)


def summary_line(label: str, report: dict[str, Any]) -> str:
    """The output's totals in one line."""
    totals = report.get("totals", {})
    fallbacks = sum(1 for b in report.get("blocks", []) if b.get("fallback"))
    sparsity = totals.get("sparsity")
    shown = f"{sparsity:.2%}" if _finite(sparsity) else "?"
    return (
        f"{label}: {totals.get('layers', len(report['layers']))} layers, {shown} zeros, "
        f"{fallbacks} block(s) fell back"
    )
