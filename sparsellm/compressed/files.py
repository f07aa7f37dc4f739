"""The files of a checkpoint directory: safetensors shards read one tensor at a time, shards
written one at a time, ``config.json`` and its compression record, the files copied along.

A checkpoint is untrusted input: its index may name files outside the directory or tensors
that are not there, its headers may promise more bytes than the files hold. Every such fault
is one line (:class:`CompressedCheckpointError`) naming the file and the tensor.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparsellm.errors import UserError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CONFIG = "config.json"
RECORD_KEY = "sparsellm_compression"
# Not copied along by compress/decompress: the weights are rewritten, pickles never travel.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
# safetensors dtype codes <-> torch dtypes (those a Linear weight or a part can have).
DTYPE_CODES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CompressedCheckpointError(UserError):
    """A checkpoint whose files do not hold what they claim (sizes, offsets, names): refused in
    one line naming the file and the tensor."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (the spelling of the compression record)."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TensorEntry:
    """Where a tensor is and what its header says (dtype ``None``: one torch cannot hold)."""

    file: Path
    dtype: torch.dtype | None
    shape: tuple[int, ...]


@dataclass
class Shards:
    """The safetensors files of a directory and every tensor they hold, from the headers;
    tensors are read one at a time, each file opened once (memory-mapped, so nothing else is
    read)."""

    directory: Path
    tensors: dict[str, TensorEntry]
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, directory: Path) -> Shards:
        """The checkpoint in ``directory`` (an index json, or one ``model.safetensors``)."""
        index, single = directory / INDEX, directory / SINGLE
        if index.is_file():
            files = _index_files(index)
            headers = {path: _header(path) for path in sorted(set(files.values()))}
        elif single.is_file():
            headers = {single: _header(single)}
            files = dict.fromkeys(headers[single], single)
        else:
            raise CompressedCheckpointError(
                f"{str(directory)!r} holds no safetensors checkpoint ({SINGLE} or {INDEX})"
            )
        tensors = {}
        for name, path in files.items():
            if name not in headers[path]:
                raise CompressedCheckpointError(
                    f"{str(index)!r} places tensor {name!r} in {path.name!r}, which has no "
                    "such tensor"
                )
            tensors[name] = headers[path][name]
        return cls(directory, tensors)

    def read(self, name: str) -> Tensor:
        """The tensor ``name`` (a copy in memory)."""
        entry = self.tensors[name]
        handle = self._handles.get(entry.file)
        if handle is None:
            from safetensors import safe_open

            handle = self._handles[entry.file] = _safe(entry.file, safe_open)
        try:
            return handle.get_tensor(name)
        except Exception as exc:  # safetensors raises its own types for a bad file
            raise CompressedCheckpointError(
                f"{str(entry.file)!r}: tensor {name!r} cannot be read ({_first_line(exc)})"
            ) from None

    def entry_nbytes(self, name: str) -> int:
        """Bytes of the tensor ``name``'s data, from its header."""
        entry = self.tensors[name]
        itemsize = entry.dtype.itemsize if entry.dtype is not None else 1
        return math.prod(entry.shape) * itemsize

    def nbytes(self) -> int:
        """Bytes of the shard files on disk."""
        return sum(path.stat().st_size for path in {e.file for e in self.tensors.values()})

    def close(self) -> None:
        self._handles.clear()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _safe(path: Path, safe_open: Any) -> Any:
    """``safe_open(path)``; a file safetensors refuses is one line naming it."""
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as exc:
        raise CompressedCheckpointError(
            f"{str(path)!r} is not a valid safetensors file ({_first_line(exc)})"
        ) from None


def _index_files(index: Path) -> dict[str, Path]:
    """Tensor name -> shard path from an index json whose file names are plain names of files
    that exist in its directory (a name with a path in it could reach outside)."""
    try:
        weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError, OSError):
        raise CompressedCheckpointError(
            f"{str(index)!r} is not a safetensors index (JSON with a 'weight_map' object)"
        ) from None
    files = {}
    for name, file in weight_map.items():
        if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
            raise CompressedCheckpointError(
                f"{str(index)!r} places tensor {name!r} in {file!r}, which is not a file name "
                "inside the checkpoint directory"
            )
        if not (index.parent / file).is_file():
            raise CompressedCheckpointError(
                f"{str(index)!r} places tensor {name!r} in {file!r}, which does not exist"
            )
        files[name] = index.parent / file
    return files


def _header(path: Path) -> dict[str, TensorEntry]:
    """The tensors a safetensors file's header lists, checked against the file's size."""
    from sparsellm.loading import ModelLoadError, check_safetensors

    try:
        header = check_safetensors(path)
    except ModelLoadError as exc:
        raise CompressedCheckpointError(str(exc)) from None
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            shape = tuple(int(d) for d in info["shape"])
            entries[name] = TensorEntry(path, DTYPE_CODES.get(info["dtype"]), shape)
        except (TypeError, KeyError, ValueError):
            raise CompressedCheckpointError(
                f"{str(path)!r}: tensor {name!r} has a malformed header entry"
            ) from None
    return entries


class ShardWriter:
    """Writes tensors into ``directory`` a shard at a time: a group of tensors (a layer's
    parts) goes whole into one shard; a shard is written once the next group would take it
    past ``max_bytes``. Only the current shard is held. Shards get temporary names until
    :meth:`finish` knows their number (``model-K-of-N.safetensors``, or ``model.safetensors``
    alone, as ``save_pretrained`` names them); the index json is written when there are
    several."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory = directory
        self.max_bytes = max_bytes
        self.pending: dict[str, Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total_size = 0

    def add(self, tensors: dict[str, Tensor]) -> None:
        """Store ``tensors`` (one group) in the current shard, writing it first if full."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        for name, tensor in tensors.items():
            self.pending[name] = tensor.detach().contiguous()
        self.pending_bytes += size
        self.total_size += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.directory / f".shard-{len(self.written) + 1:05d}.safetensors"
        save_file(self.pending, path, metadata={"format": "pt"})
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        """Write the last shard, give the shards their names, write the index; the files."""
        if self.pending or not self.written:
            self._flush()
        count = len(self.written)
        weight_map, files = {}, []
        for number, (path, names) in enumerate(self.written, 1):
            final = self.directory / (
                SINGLE if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
            )
            os.replace(path, final)
            files.append(final)
            weight_map.update(dict.fromkeys(names, final.name))
        if count > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            text = json.dumps(index, indent=2, sort_keys=True) + "\n"
            (self.directory / INDEX).write_text(text)
        return files


def read_config(directory: Path) -> dict:
    """The JSON object in ``directory/config.json``."""
    path = directory / CONFIG
    try:
        config = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise CompressedCheckpointError(f"{str(directory)!r} has no {CONFIG}") from None
    except (ValueError, OSError) as exc:
        raise CompressedCheckpointError(f"{str(path)!r} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CompressedCheckpointError(f"{str(path)!r} is not a JSON object")
    return config


def write_config(directory: Path, config: dict) -> None:
    """``config`` as ``directory/config.json``, formatted as transformers writes it."""
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    (directory / CONFIG).write_text(text, encoding="utf-8")


def is_compressed(directory: str | Path) -> bool:
    """Whether ``directory`` holds a checkpoint whose ``config.json`` records a compression
    (cheap: reads the config only; a missing or unreadable one is not compressed)."""
    path = Path(directory) / CONFIG
    try:
        config = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and RECORD_KEY in config


def copy_side_files(source: Path, target: Path) -> None:
    """Tokenizer, generation config, reports, chat templates...: every top-level file of
    ``source`` but the weights and ``config.json`` (rewritten by the caller). Links are
    followed: a hub cache snapshot is made of them."""
    for path in sorted(source.iterdir()):
        name = path.name
        if name in (CONFIG, INDEX) or name.startswith(".") or not path.is_file():
            continue
        if name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json"):
            continue
        shutil.copyfile(path, target / name)
