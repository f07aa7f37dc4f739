"""Write a model and its reports atomically, in one of the registered output formats.

A format is a writer that fills a directory from the model and tokenizer. Whatever the format,
:func:`save_model` writes into a temporary sibling directory (:class:`StagedOutput`), adds the
reports, and renames it into place at the end, so a crash never leaves a half-written model
behind. Out-of-core pruning (:mod:`sparsellm.offload`) fills such a directory block by block.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from sparsellm.errors import UserError
from sparsellm.stopping import raise_if_stopped

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


def _exchange(a: Path, b: Path) -> bool:
    """Swap the directories ``a`` and ``b`` in one step (Linux ``renameat2``); False where the
    system cannot, so the caller falls back to two renames."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_cwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
    return renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), exchange) == 0


def _replace(staging: Path, output: Path) -> None:
    """Put ``staging`` at ``output``: a rename, or an atomic swap with an existing output, so
    at every instant ``output`` is either the old directory or the new one, whole."""
    if not output.exists():
        staging.rename(output)
    elif _exchange(staging, output):
        shutil.rmtree(staging, ignore_errors=True)  # now the old output
    else:
        # Move the old directory aside first so the rename below cannot fail half-way.
        retired = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(retired)
        staging.rename(output)
        shutil.rmtree(retired, ignore_errors=True)


def _staging_prefix(output: Path) -> str:
    return f".{output.name}.staging-"


def _owner_alive(name: str, prefix: str) -> bool:
    """Whether the process that made the temporary ``name`` (``PREFIX HOST-PID-RANDOM``) may
    still run: on another host we cannot tell, so it counts as alive."""
    host, pid, _ = (name.removeprefix(prefix).rsplit("-", 2) + ["", ""])[:3]
    if not pid.isdigit() or host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(output: str | Path) -> list[Path]:
    """Remove what killed runs left next to ``output`` (staging directories of processes that
    no longer exist); the paths removed, for the caller to report."""
    output = Path(output).resolve()
    if not output.parent.is_dir():
        return []
    prefix = _staging_prefix(output)
    stale = [
        path
        for path in output.parent.iterdir()
        if path.name.startswith(prefix) and not _owner_alive(path.name, prefix)
    ]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


class StagedOutput:
    """A temporary sibling directory of ``output``, filled at once or piece by piece (the
    out-of-core path writes each pruned block as soon as it is done), then renamed into place
    by :meth:`commit`. Used as a context manager, an exception discards it.

    The temporary's name carries host and process id, so a later run can tell that a
    ``kill -9`` left it (:func:`remove_stale_temporaries`). Its mode follows the umask, as
    a directory made by ``mkdir`` would (``mkdtemp`` alone makes it private, 0700).
    """

    def __init__(self, output: str | Path):
        self.output = Path(output).resolve()
        self.output.parent.mkdir(parents=True, exist_ok=True)
        prefix = f"{_staging_prefix(self.output)}{socket.gethostname()}-{os.getpid()}-"
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=self.output.parent))
        self.path.chmod(0o777 & ~_umask())

    def commit(self, reports: dict[str, Any] | None = None) -> Path:
        """Add ``reports`` (file name -> an object with ``save(path)``, or JSON-able data) and
        put the directory in place of ``output``, replacing it whole."""
        for name, report in (reports or {}).items():
            _write_report(self.path / name, report)
        _follow_umask(self.path)
        raise_if_stopped()  # Ctrl-C / SIGTERM swallowed by a finalizer: still nothing in place
        _replace(self.path, self.output)
        return self.output

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> StagedOutput:
        return self

    def __exit__(self, kind: type | None, *_: object) -> None:
        if kind is not None:
            self.discard()


def _follow_umask(directory: Path) -> None:
    """Give everything under ``directory`` the modes ``open`` / ``mkdir`` would under the
    umask: some writers (``save_pretrained``'s safetensors files) create theirs private."""
    mask = _umask()
    for path in directory.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
    with StagedOutput(output) as staged, output_errors(output):
        writer(model, tokenizer, staged.path)
        return staged.commit(reports)


class OutputError(UserError):
    """The output could not be written (disk full, permissions, ...); nothing was left."""


@contextlib.contextmanager
def output_errors(output: str | Path) -> Iterator[None]:
    """Turn an ``OSError`` while writing ``output`` into one line (the staged directory is
    discarded by the caller, so nothing is left behind)."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OutputError(f"cannot write {str(output)!r}: {reason}; nothing was written") from None


# Formats defined in their own modules register themselves when imported; importing them here
# makes FORMATS complete wherever it is read (config.py builds --save-format's choices from it).
from sparsellm import compressed  # noqa: E402, F401
