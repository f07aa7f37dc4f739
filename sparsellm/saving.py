"""Write a pruned model atomically: a temporary sibling directory renamed at the end."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn


def save_model(
    model: nn.Module, tokenizer: object | None, reports: dict[str, dict], output: str | Path
) -> Path:
    """Save model (safetensors), tokenizer and JSON ``reports`` (file name -> content) into
    ``output``, replacing it whole.

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
        for name, content in reports.items():
            (staging / name).write_text(json.dumps(content, indent=2, default=str) + "\n")
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
