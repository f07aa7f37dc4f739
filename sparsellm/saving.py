"""Write a model and its reports atomically, in one of the registered output formats.

A format is a writer that fills a directory from the model and tokenizer. Whatever the format,
:func:`save_model` writes into a temporary sibling directory (:class:`StagedOutput`), adds the
reports, and renames it into place at the end, so a crash never leaves a half-written model
behind. Out-of-core pruning (:mod:`sparsellm.offload`) fills such a directory block by block.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

# (model, tokenizer or None, directory to fill) -> None
Writer = Callable[[nn.Module, Any, Path], None]


def _write_dense(model: nn.Module, tokenizer: Any, directory: Path) -> None:
    """A Hugging Face directory: safetensors weights (zeros stored), config, tokenizer."""
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


FORMATS: dict[str, Writer] = {"dense": _write_dense}


def register_format(name: str, writer: Writer) -> None:
    """Make ``writer`` available as ``--save-format name``."""
    if name in FORMATS:
        raise ValueError(f"output format {name!r} is already registered")
    FORMATS[name] = writer


def _write_report(path: Path, report: Any) -> None:
    if hasattr(report, "save"):
        report.save(path)
    else:
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def _replace(staging: Path, output: Path) -> None:
    if output.exists():
        # Move the old directory aside first so the rename below cannot fail half-way.
        retired = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(retired)
        staging.rename(output)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(output)


class StagedOutput:
    """A temporary sibling directory of ``output``, filled at once or piece by piece (the
    out-of-core path writes each pruned block as soon as it is done), then renamed into place
    by :meth:`commit`. Used as a context manager, an exception discards it."""

    def __init__(self, output: str | Path):
        self.output = Path(output).resolve()
        self.output.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{self.output.name}."
        self.path = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=self.output.parent))

    def commit(self, reports: dict[str, Any] | None = None) -> Path:
        """Add ``reports`` (file name -> an object with ``save(path)``, or JSON-able data) and
        put the directory in place of ``output``, replacing it whole."""
        for name, report in (reports or {}).items():
            _write_report(self.path / name, report)
        _replace(self.path, self.output)
        return self.output

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> StagedOutput:
        return self

    def __exit__(self, kind: type | None, *_: object) -> None:
        if kind is not None:
            self.discard()


def save_model(
    model: nn.Module,
    tokenizer: Any,
    output: str | Path,
    *,
    save_format: str = "dense",
    reports: dict[str, Any] | None = None,
) -> Path:
    """Save ``model`` and ``tokenizer`` in ``save_format`` plus ``reports`` (file name -> an
    object with ``save(path)``, or JSON-able data) into ``output``, replacing it whole."""
    writer = FORMATS[save_format]
    with StagedOutput(output) as staged:
        writer(model, tokenizer, staged.path)
        return staged.commit(reports)
