"""Write a pruned model atomically: a temporary sibling directory renamed at the end."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from sparsellm.report import PruneReport

REPORT_NAME = "sparsity_report.json"


def save_pruned(
    model: nn.Module, tokenizer: object | None, report: PruneReport, output: str | Path
) -> Path:
    """Save model (safetensors), tokenizer and report into ``output``, replacing it whole.

    Nothing appears at ``output`` until everything is written, so a crash never leaves a
    half-written model behind.
    """
    output = Path(output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        report.save(staging / REPORT_NAME)
        if output.exists():
            # Move the old directory aside first so the rename below cannot fail half-way.
            retired = output.with_name(f".{output.name}.old-{os.getpid()}")
            output.rename(retired)
            staging.rename(output)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output
