"""Continue an interrupted prune from its last finished block (``sparsellm prune --resume``).

While the CLI prunes into ``--output DIR``, the engine records every finished block in the
*record* ``<parent of DIR>/.<name of DIR>.resume/`` (a name :func:`~sparsellm.saving.
remove_stale_temporaries` never touches):

- ``state.json``: how many blocks are finished, the previous block's output error (the guard's
  one piece of state carried from block to block), the number of blocks, and the fingerprint
  of everything that decides the result (:func:`fingerprint`). Rank 0 writes it last: it is the
  commit point of a block.
- ``block-K.json``: block K's report entry (its layer rows, block row and notes).
- ``block-K.safetensors``: block K's pruned tensors. With ``--offload disk`` the output shards
  in ``shards/`` are the record instead (:class:`~sparsellm.offload.ShardWriter`), so weights
  are stored once.
- ``hidden-rR-K.safetensors``: rank R's activations entering block K (what block K - 1
  output), one tensor per calibration batch, written from the host tensors as they are (no
  copy); none after the last block.
- ``dense-rR-K.safetensors``: the same for the dense model's activations, for methods that
  keep that second stream (``sparsellm`` with ``correction`` > 0).

Every file is written under a temporary name, flushed and renamed into place, the activations
before the state that names them, and the previous activations are removed only once the new
state is in place: a kill at any moment leaves the last committed record whole.

``--resume`` loads the model as usual, checks the blocks' chain and captures block 0's
arguments (masks, rotary tables: deterministic, so recomputed), then restores the finished
blocks' weights and report entries, replaces the captured hidden states with the recorded
ones and prunes on from the next block: the weights are bit-identical to an uninterrupted run.
A fingerprint that differs, or a record met without ``--resume``, is refused in one line
(nothing is reused or deleted silently). The record is removed once the output is in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sparsellm.errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: runs go unlocked
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from sparsellm.config import PruneConfig
    from sparsellm.engine import BlockInputs
    from sparsellm.models import Adapter
    from sparsellm.report import BlockResult, PruneReport

FORMAT = 1  # layout of the record; part of the fingerprint
STATE = "state.json"
# Settings that do not change a single weight: a resumed run may differ in these.
NOT_FINGERPRINTED = frozenset(
    {"output", "overwrite", "resume", "eval", "eval_seqlen", "eval_windows", "save_format"}
    | {"allow_pickle", "offload"}  # offload: the mode it resolves to is fingerprinted instead
    # model, calibration: known by their files (resolved path, sizes, times) below, so that
    # 'tests/x.txt' and './tests/x.txt' are the same source and a changed file is not
    | {"model", "calibration"}
)
_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class ResumeError(UserError):
    """A record that cannot be used as it is (other settings, incomplete, in use)."""


def record_directory(output: str | Path) -> Path:
    """Where the record of a prune into ``output`` lives: ``<parent>/.<name>.resume``."""
    output = Path(output).resolve()
    return output.parent / f".{output.name}.resume"


# --- the fingerprint -------------------------------------------------------------------------


def source_files(spec: str) -> dict[str, Any]:
    """Identity of a model or data source: a local directory's files (name -> [size, mtime]),
    a local file's; a hub id or builtin text is known by its name only."""
    path = Path(spec)
    if path.is_dir():
        files = [p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")]
    elif path.is_file():
        files = [path]
    else:
        return {"name": spec}  # a hub id, a builtin text
    stats = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
    return {"path": str(path.resolve()), "files": stats}


def fingerprint(
    config: PruneConfig, offload: bool, device: torch.device, world_size: int
) -> dict[str, Any]:
    """Everything that decides the pruned weights, as JSON data: the settings (but output,
    overwrite, resume, evaluation and save format), the offload mode, the device type, the
    number of ranks, the model's and calibration text's files, and the library versions."""
    import safetensors
    import transformers

    import sparsellm

    settings = {k: v for k, v in config.to_dict().items() if k not in NOT_FINGERPRINTED}
    values = {
        "format": FORMAT,
        "settings": settings,
        "offload": "disk" if offload else "memory",
        "device type": device.type,
        "ranks": world_size,
        "model": source_files(config.model),
        "calibration": source_files(config.calibration),
        "versions": {
            "sparsellm": sparsellm.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "safetensors": safetensors.__version__,
        },
    }
    return json.loads(json.dumps(values, default=str))  # tuples as lists, as read back


def _flat(values: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(values, dict):
        return {prefix: values}
    flat: dict[str, Any] = {}
    for key, value in values.items():
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def differences(recorded: dict, now: dict, shown: int = 3) -> str:
    """What differs between two fingerprints, in words (empty when nothing does)."""
    old, new = _flat(recorded), _flat(now)
    keys = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]

    def short(value: Any) -> str:
        text = "absent" if value is None else repr(value)
        return text if len(text) <= 40 else text[:37] + "..."

    parts = [
        f"{k.removeprefix('settings.')}: {short(old.get(k))} then, {short(new.get(k))} now"
        for k in keys[:shown]
    ]
    if len(keys) > shown:
        parts.append(f"and {len(keys) - shown} more")
    return "; ".join(parts)


# --- safetensors files written from the tensors' own memory ----------------------------------


def _raw(tensor: torch.Tensor) -> memoryview:
    """The bytes of ``tensor`` (on the host, contiguous), without copying when it is both."""
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.numel() == 0:
        return memoryview(b"")
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def write_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """A safetensors file at ``path``, written tensor by tensor from the tensors' own memory
    (``save_file`` would first copy all of them), under a temporary name flushed to disk and
    renamed into place, so ``path`` is always absent, the old file or the new one, whole."""
    header: dict[str, Any] = {}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        entry = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape)}
        header[name] = {**entry, "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as file:
            file.write(struct.pack("<Q", len(encoded)))
            file.write(encoded)
            for tensor in tensors.values():
                file.write(_raw(tensor))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)  # a full disk gets its space back
        raise


def read_header(path: Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """A safetensors file's tensor entries, metadata, and the offset where its data starts."""
    with open(path, "rb") as file:
        (size,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(size))
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata, 8 + size


def _read_exact(file: Any, tensor: torch.Tensor, path: Path) -> None:
    """Fill the contiguous host ``tensor`` with the next bytes of ``file``."""
    view = _raw(tensor) if tensor.numel() else memoryview(bytearray())
    done = 0
    while done < len(view):
        count = file.readinto(view[done:])
        if not count:
            raise ResumeError(f"{str(path)!r} is truncated; remove its record to start over")
        done += count


def read_batches_into(path: Path, targets: list[torch.Tensor]) -> dict[str, str]:
    """Fill ``targets`` (host tensors [windows, ...]) in place from the batches recorded in
    ``path``, by window: the recorded batches may be cut differently (a device budget that
    changed). Returns the file's metadata."""
    header, metadata, start = read_header(path)
    entries = sorted(header.values(), key=lambda e: e["data_offsets"][0])
    rows = sum(e["shape"][0] for e in entries)
    wanted = sum(t.shape[0] for t in targets)
    same = all(
        e["dtype"] == _DTYPES[targets[0].dtype] and e["shape"][1:] == list(targets[0].shape[1:])
        for e in entries
    ) and all(t.dtype == targets[0].dtype and t.shape[1:] == targets[0].shape[1:] for t in targets)
    if rows != wanted or not same:
        raise ResumeError(
            f"the activations in {str(path)!r} do not fit this run's calibration batches; "
            "remove the record to start over"
        )
    with open(path, "rb") as file:
        file.seek(start)  # batches are stored back to back in window order
        for target in targets:
            if target.is_contiguous():
                _read_exact(file, target, path)
            else:
                staging = torch.empty(target.shape, dtype=target.dtype)
                _read_exact(file, staging, path)
                target.copy_(staging)
    return metadata


def _write_json(path: Path, value: Any) -> None:
    """``value`` as JSON at ``path``, replaced in one step (default=str as the report does)."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "w") as file:
            file.write(json.dumps(value, indent=1, default=str) + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def windows_digest(windows: torch.Tensor) -> str:
    """sha256 of the calibration token ids (this rank's share)."""
    return hashlib.sha256(_raw(windows)).hexdigest()


# --- ranks -----------------------------------------------------------------------------------


def _all_ok(ok: bool, device: torch.device) -> bool:
    """Whether every rank is ``ok``; also a barrier (a no-op in one process)."""
    from sparsellm.distributed import all_reduce_sum_, world

    if world()[1] == 1:
        return ok
    # NCCL reduces on the device; gloo on the host.
    where = device if device.type == "cuda" else torch.device("cpu")
    failed = torch.tensor([0.0 if ok else 1.0], device=where)
    return float(all_reduce_sum_(failed)) == 0


# --- the record ------------------------------------------------------------------------------


class RunRecord:
    """The record of one prune into ``output`` (see the module docstring).

    ``done`` blocks were finished by earlier runs (0 for a fresh one). ``in_shards``: the
    weights are the offload writer's shards in :attr:`shards`, not ``block-K.safetensors``.
    """

    def __init__(
        self,
        output: str | Path,
        identity: dict[str, Any],
        state: dict[str, Any] | None,
        in_shards: bool,
        device: torch.device,
    ):
        from sparsellm.distributed import world

        self.output = Path(output)
        self.directory = record_directory(output)
        self.shards = self.directory / "shards"
        self.fingerprint = identity
        self.done = int(state["done"]) if state else 0
        self.previous_error = state.get("previous_error") if state else None
        self.blocks = int(state["blocks"]) if state else 0
        self.in_shards = in_shards
        self.device = device
        self.rank = world()[0]
        self._windows: str | None = None
        self._lock: int | None = None

    # -- opening ---------------------------------------------------------------------------

    def lock(self) -> None:
        """Hold the record for this process (rank 0): another run on it is refused. The lock
        dies with the process, so a killed run never leaves it held."""
        if self._lock is not None or self.rank != 0 or fcntl is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ResumeError(
                f"{str(self.directory)!r} is in use by another sparsellm run into the same "
                "output; wait for it to end or stop it"
            ) from None
        except OSError:  # a filesystem without locks: go on unlocked
            pass
        self._lock = fd

    def release(self) -> None:
        """Let go of the record (a run that ends without its output): it stays for
        ``--resume`` if a block was committed, else it holds nothing worth keeping."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
        if self.rank == 0 and self.done == 0:
            shutil.rmtree(self.directory, ignore_errors=True)

    def remove(self) -> None:
        """Delete the record (rank 0, once the output is in place)."""
        self.done = 0
        self.release()

    def clear(self) -> None:
        """Empty a directory with no committed state (a run killed before its first block
        finished), keeping the lock held on it."""
        for path in self.directory.iterdir():
            if path.name == "lock":
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    # -- restoring (the engine, after capture) ----------------------------------------------

    def restore(
        self,
        adapter: Adapter,
        inputs: BlockInputs | None,
        windows: torch.Tensor | None,
        report: PruneReport,
        dense_model: BlockInputs | None = None,
    ) -> tuple[int, float | None]:
        """Put the finished blocks back: their report entries, their weights (in memory), and
        the recorded activations in place of the captured ``inputs``' hidden states (and of
        ``dense_model``'s, the dense model's stream, where the method keeps one). Returns
        the first block to prune and the previous block's output error."""
        blocks = adapter.blocks()
        self.blocks = len(blocks)
        self._windows = windows_digest(windows) if windows is not None else None
        if self.done == 0:
            return 0, None
        if self.done > len(blocks):
            raise ResumeError(f"{str(self.directory)!r} records more blocks than the model has")
        for index in range(self.done):
            self._restore_entry(index, report)
            if not self.in_shards:
                self._restore_weights(index, blocks[index])
        if inputs is not None and self.done < len(blocks):
            self._restore_activations(inputs, "hidden")
        if dense_model is not None and self.done < len(blocks):
            self._restore_activations(dense_model, "dense")
        return self.done, self.previous_error

    def _restore_activations(self, inputs: BlockInputs, stream: str) -> None:
        """The recorded hidden states in place of the captured ones (same host tensors)."""
        path = self._existing(self._hidden(self.done, stream))
        with self._reading(path):
            windows = read_header(path)[1].get("windows")
        if windows != self._windows:
            raise ResumeError(
                "the calibration windows differ from those of the recorded run (was the "
                f"calibration text changed?); remove {str(self.directory)!r} to start over"
            )
        with self._reading(path):
            read_batches_into(path, inputs.hidden)

    @contextlib.contextmanager
    def _reading(self, path: Path) -> Iterator[None]:
        """A recorded file that cannot be read back (its bytes damaged after the atomic write:
        a disk fault, a hand edit) ends the run in one line naming it, not in the parser's
        traceback."""
        try:
            yield
        except ResumeError:
            raise
        except Exception as exc:  # JSON, struct, safetensors, a shape: whatever the bytes broke
            raise ResumeError(
                f"{str(self.directory)!r} is damaged ({path.name}: {type(exc).__name__}); "
                "remove it to start over"
            ) from None

    def _existing(self, path: Path) -> Path:
        if not path.is_file():
            raise ResumeError(
                f"{str(self.directory)!r} is incomplete ({path.name} is missing); remove it to "
                "start over"
            )
        return path

    def _restore_entry(self, index: int, report: PruneReport) -> None:
        from sparsellm.report import LayerReport

        path = self._existing(self.directory / f"block-{index:05d}.json")
        with self._reading(path):
            entry = json.loads(path.read_text())
            layers = [LayerReport(**layer) for layer in entry["layers"]]
            row, notes = entry["row"], list(entry["notes"])
        report.layers.extend(layers)
        report.blocks.append(row)
        report.notes.extend(notes)

    def _restore_weights(self, index: int, block: nn.Module) -> None:
        from safetensors.torch import load_file

        path = self._existing(self.directory / f"block-{index:05d}.safetensors")
        with self._reading(path):
            block.load_state_dict(load_file(path), strict=True)  # copies into the block's tensors

    def _hidden(self, index: int, stream: str = "hidden") -> Path:
        """This rank's activations entering block ``index``: the pruned model's (``hidden``)
        or the dense model's (``dense``)."""
        return self.directory / f"{stream}-r{self.rank}-{index:05d}.safetensors"

    # -- recording (the engine, after each block) -------------------------------------------

    def record(
        self,
        index: int,
        block: nn.Module,
        entry: dict[str, Any],
        hidden: list[torch.Tensor] | None,
        previous_error: float | None,
        dense_hidden: list[torch.Tensor] | None = None,
    ) -> None:
        """Record block ``index`` as finished: its entry and weights (rank 0), this rank's
        activations for the next block (``hidden``, and the dense model's ``dense_hidden``
        where the method keeps them; None after the last block), then the state that commits
        them, then drop the activations it replaces."""
        ok = False
        try:
            with self.write_errors():
                self._write(index, block, entry, {"hidden": hidden, "dense": dense_hidden})
            ok = True
        finally:
            # Every rank learns whether all wrote (else all stop: nobody waits for the state).
            all_ok = _all_ok(ok, self.device)
        if not all_ok:
            raise ResumeError("another rank could not write its part of the resume record")
        self._commit(index + 1, previous_error)

    def _write(
        self,
        index: int,
        block: nn.Module,
        entry: dict[str, Any],
        streams: dict[str, list[torch.Tensor] | None],
    ) -> None:
        """Everything block ``index``'s commit will name, each file replaced in one step."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.lock()
        if self.rank == 0:
            _write_json(self.directory / f"block-{index:05d}.json", entry)
            if not self.in_shards:
                path = self.directory / f"block-{index:05d}.safetensors"
                write_tensors(path, block.state_dict())  # on the host: no copy
        for stream, hidden in streams.items():
            if hidden is not None:
                batches = {f"batch-{i:05d}": h for i, h in enumerate(hidden)}
                metadata = {"windows": self._windows or ""}
                write_tensors(self._hidden(index + 1, stream), batches, metadata)

    def _commit(self, done: int, previous_error: float | None) -> None:
        if self.rank == 0:
            state = {
                "done": done,
                "blocks": self.blocks,
                "previous_error": previous_error,
                "fingerprint": self.fingerprint,
            }
            with self.write_errors():
                _write_json(self.directory / STATE, state)
        _all_ok(True, self.device)  # the state is in place before anyone drops the old files
        self.done = done
        for stream in ("hidden", "dense"):
            current = self._hidden(done, stream).name
            for path in self.directory.glob(f"{stream}-r{self.rank}-*.safetensors"):
                if path.name != current:
                    path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def write_errors(self) -> Iterator[None]:
        """A full disk or a permission error while recording: one line; the last committed
        record stays usable."""
        from sparsellm.saving import OutputError

        try:
            yield
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise OutputError(
                f"cannot write the resume record {str(self.directory)!r}: {reason}; make room "
                "and rerun with --resume to continue from the last finished block"
            ) from None


def block_entry(index: int, result: BlockResult) -> dict[str, Any]:
    """What the report took from block ``index``'s result, as JSON data."""
    rows = [asdict(layer) for layer in result.layers]
    return {"layers": rows, "row": result.row(index), "notes": list(result.notes)}


def _read_state(directory: Path) -> dict[str, Any] | None:
    path = directory / STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
        valid = isinstance(state["fingerprint"], dict) and int(state["done"]) > 0
    except (OSError, ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        raise ResumeError(
            f"{str(path)!r} is unreadable; remove {str(directory)!r} to start over"
        ) from None
    return state


def _say(line: str) -> None:
    print(f"sparsellm: {line}", file=sys.stderr, flush=True)


def open_record(config: PruneConfig, offload: bool, device: torch.device) -> RunRecord:
    """The record of a prune into ``config.output``, checked before the model loads.

    No record: a fresh one (``--resume`` says so in one line). A record and ``--resume``: its
    fingerprint must equal this run's, else one line names what differs. A record without
    ``--resume``: refused, naming the record (it is never reused or deleted silently).
    A directory without a state (a run killed before its first block finished) holds nothing
    worth keeping and is removed.
    """
    from sparsellm.distributed import is_main, world

    directory = record_directory(config.output)
    identity = fingerprint(config, offload, device, world()[1])
    state = _read_state(directory)
    if state is not None and not config.resume:
        raise ResumeError(
            f"{str(directory)!r} holds {state['done']} finished block(s) of an interrupted run "
            f"into {config.output!r}: pass --resume to continue it, or remove that directory "
            "to start over"
        )
    if state is not None and (diff := differences(state["fingerprint"], identity)):
        raise ResumeError(
            f"cannot resume from {str(directory)!r}, it was recorded with other settings or "
            f"sources ({diff}); rerun as recorded, or remove it to start over"
        )
    record = RunRecord(config.output, identity, state, offload, device)
    # Held from now on, so a second run into the same output is refused at once.
    with record.write_errors():
        record.lock()
    if not is_main():
        return record
    if state is None:
        record.clear()
        if config.resume:
            _say(f"--resume: no record at {directory}; starting from the first block")
    else:
        _say(f"resuming at block {record.done} of {record.blocks} from {directory}")
    return record
