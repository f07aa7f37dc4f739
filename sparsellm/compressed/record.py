"""The compression record of ``config.json`` and the checks every compressed layer passes
before a byte of it is used.

The record (``"sparsellm_compression"``) names the format and version and, per compressed
weight, its form, its ``[out, in]`` shape, dtype, whether the stored dense tensor is the
transpose (GPT-2's ``Conv1D``) and, for N:M, the pattern. Everything in the files is checked
against it: first the headers (every part present with the dtype and shape the record implies),
then the data (:func:`check_bitmask`, :func:`check_nm`). A checkpoint comes from the internet:
each failure is one :class:`~sparsellm.compressed.files.CompressedCheckpointError` line naming
the file and the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparsellm.compressed.files import (
    CONFIG,
    RECORD_KEY,
    CompressedCheckpointError,
    Shards,
    dtype_name,
)
from sparsellm.compressed.packing import (
    BITMASK_PARTS,
    NM_PARTS,
    index_bits,
    nm_positions,
    row_popcounts,
    stray_bits,
    unpack_indices,
)

FORMAT = "sparse-bitmask"
VERSION = 1
FORMS = {"bitmask": BITMASK_PARTS, "nm": NM_PARTS}
# The dtypes a compressed weight's values may have.
VALUE_DTYPES = {
    dtype_name(d): d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16)
}


@dataclass(frozen=True)
class LayerRecord:
    """One compressed weight: ``name`` is its checkpoint name; ``shape`` is ``[out, in]``
    (the stored dense tensor is its transpose when ``transposed``)."""

    name: str
    form: str
    shape: tuple[int, int]
    dtype: torch.dtype
    transposed: bool = False
    pattern: tuple[int, int] | None = None

    def part(self, suffix: str) -> str:
        return f"{self.name}.{suffix}"

    def parts(self) -> list[str]:
        """The checkpoint names of this layer's tensors."""
        return [self.part(suffix) for suffix in FORMS[self.form]]

    @property
    def stored_shape(self) -> tuple[int, int]:
        """The shape of the dense tensor in the model's state dict."""
        return self.shape[::-1] if self.transposed else self.shape  # type: ignore[return-value]

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "form": self.form,
            "shape": list(self.shape),
            "dtype": dtype_name(self.dtype),
            "transposed": self.transposed,
        }
        if self.pattern is not None:
            entry["pattern"] = list(self.pattern)
        return entry


def make_record(layers: list[LayerRecord]) -> dict[str, Any]:
    """The ``config.json`` entry for ``layers``."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "layers": {layer.name: layer.to_json() for layer in layers},
    }


# ----------------------------------------------------------------------------- reading it


def parse_record(config: dict, directory: Path) -> dict[str, LayerRecord]:
    """The layers of ``config``'s compression record, each entry's structure checked."""
    where = str(directory / CONFIG)
    record = config.get(RECORD_KEY)
    if record is None:
        raise CompressedCheckpointError(
            f"{str(directory)!r} is not a compressed checkpoint (its {CONFIG} has no "
            f"{RECORD_KEY} record)"
        )
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CompressedCheckpointError(f"{where!r}: {RECORD_KEY} is not a {FORMAT} record")
    if record.get("version") != VERSION:
        raise CompressedCheckpointError(
            f"{where!r}: {FORMAT} version {record.get('version')!r} is not supported (this "
            f"sparsellm reads version {VERSION}; a newer one may read it)"
        )
    layers = record.get("layers")
    if not isinstance(layers, dict):
        raise CompressedCheckpointError(f"{where!r}: {RECORD_KEY}.layers is not an object")
    return {name: _layer(name, entry, where) for name, entry in layers.items()}


def _pair(value: object) -> tuple[int, int] | None:
    ok = isinstance(value, list) and len(value) == 2
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    return (value[0], value[1]) if ok else None  # type: ignore[index]


def _layer(name: str, entry: object, where: str) -> LayerRecord:
    """One entry of the record, or a one-line error saying which field is wrong."""

    def bad(what: str) -> CompressedCheckpointError:
        return CompressedCheckpointError(f"{where!r}: the record of {name!r} {what}")

    if not isinstance(entry, dict):
        raise bad("is not an object")
    form = entry.get("form")
    if form not in FORMS:
        raise bad(f"has form {form!r}, not one of {', '.join(FORMS)}")
    shape, pattern = _pair(entry.get("shape")), _pair(entry.get("pattern"))
    if shape is None:
        raise bad("has no shape [rows, cols] of non-negative integers")
    dtype = VALUE_DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise bad(f"has dtype {entry.get('dtype')!r}, not one of {', '.join(VALUE_DTYPES)}")
    transposed = entry.get("transposed", False)
    if not isinstance(transposed, bool):
        raise bad("has a 'transposed' that is not true or false")
    if form == "nm":
        if pattern is None or not 0 < pattern[0] < pattern[1] <= 256:
            raise bad("has no pattern [N, M] with 0 < N < M <= 256")
        if shape[1] % pattern[1]:
            raise bad(f"has {shape[1]} columns, not a multiple of M = {pattern[1]}")
    return LayerRecord(name, form, shape, dtype, transposed, pattern if form == "nm" else None)


# ----------------------------------------------------------------------------- headers


def expected_parts(layer: LayerRecord) -> dict[str, tuple[torch.dtype, tuple[int, ...] | None]]:
    """Part name -> (dtype, shape) the record implies (shape ``None``: 1-D of any length,
    checked against the bitmask's popcount once read)."""
    rows, cols = layer.shape
    shape = {layer.part("shape"): (torch.int64, (2,))}
    if layer.form == "bitmask":
        return {
            layer.part("bitmask"): (torch.uint8, (rows, (cols + 7) // 8)),
            layer.part("compressed"): (layer.dtype, None),
            layer.part("row_offsets"): (torch.int64, (rows,)),
            **shape,
        }
    n, m = layer.pattern  # type: ignore[misc]
    kept = cols // m * n
    return {
        layer.part("nm_values"): (layer.dtype, (rows, kept)),
        layer.part("nm_indices"): (torch.uint8, (rows, -(-kept // (8 // index_bits(m))))),
        layer.part("nm_pattern"): (torch.int64, (2,)),
        **shape,
    }


def check_headers(layer: LayerRecord, shards: Shards) -> None:
    """Every part of ``layer`` is in the checkpoint with the dtype and shape it must have."""
    for name, (dtype, shape) in expected_parts(layer).items():
        entry = shards.tensors.get(name)
        if entry is None:
            raise CompressedCheckpointError(
                f"{str(shards.directory)!r}: tensor {name!r} is missing (the record in "
                f"{CONFIG} lists {layer.name!r} as {layer.form}-compressed)"
            )
        where = f"{str(entry.file)!r}: tensor {name!r}"
        if entry.dtype != dtype:
            code = "unknown" if entry.dtype is None else dtype_name(entry.dtype)
            raise CompressedCheckpointError(f"{where} is {code}, expected {dtype_name(dtype)}")
        if shape is None and len(entry.shape) != 1:
            raise CompressedCheckpointError(f"{where} has shape {list(entry.shape)}, not 1-D")
        if shape is not None and entry.shape != shape:
            raise CompressedCheckpointError(
                f"{where} has shape {list(entry.shape)}, expected {list(shape)} for a "
                f"{list(layer.shape)} weight"
            )


# ----------------------------------------------------------------------------- data


def _fail(shards: Shards, tensor: str, what: str) -> CompressedCheckpointError:
    where = str(shards.tensors[tensor].file)
    return CompressedCheckpointError(f"{where!r}: tensor {tensor!r} {what}")


def _check_shape(layer: LayerRecord, parts: dict[str, Tensor], shards: Shards) -> None:
    held = parts["shape"].tolist()
    if held != list(layer.shape):
        raise _fail(shards, layer.part("shape"), f"holds {held}, the record {list(layer.shape)}")


def check_bitmask(layer: LayerRecord, parts: dict[str, Tensor], shards: Shards) -> Tensor:
    """The bitmask parts agree with each other; the per-row non-zero counts."""
    _check_shape(layer, parts, shards)
    rows, cols = layer.shape
    bitmask, offsets = parts["bitmask"], parts["row_offsets"]
    stray = stray_bits(bitmask, cols)
    if bool(stray.any()):
        row = int(stray.nonzero()[0])
        raise _fail(
            shards, layer.part("bitmask"), f"has bits set beyond its {cols} columns (row {row})"
        )
    counts = row_popcounts(bitmask)
    total, held = int(counts.sum()), parts["compressed"].numel()
    if total != held:
        raise _fail(
            shards, layer.part("compressed"), f"holds {held} values, the bitmask marks {total}"
        )
    _check_offsets(layer, offsets, counts, held, shards)
    return counts


def _check_offsets(
    layer: LayerRecord, offsets: Tensor, counts: Tensor, values: int, shards: Shards
) -> None:
    """Offsets within [0, values], never decreasing, each row's start where the counts put it."""
    tensor = layer.part("row_offsets")
    if offsets.numel() == 0:
        return
    outside = (offsets < 0) | (offsets > values)
    if bool(outside.any()):
        row = int(outside.nonzero()[0])
        where = f"row {row} starts at {int(offsets[row])}, outside 0..{values}"
        raise _fail(shards, tensor, f"is out of range: {where}")
    falling = offsets[1:] < offsets[:-1]
    if bool(falling.any()):
        row = int(falling.nonzero()[0]) + 1
        raise _fail(shards, tensor, f"decreases at row {row}")
    starts = torch.cumsum(counts, 0) - counts
    wrong = starts != offsets
    if bool(wrong.any()):
        row = int(wrong.nonzero()[0])
        raise _fail(
            shards,
            tensor,
            f"puts row {row} at {int(offsets[row])}, the bitmask's counts at {int(starts[row])}",
        )


def check_nm(layer: LayerRecord, parts: dict[str, Tensor], shards: Shards) -> None:
    """The N:M parts agree: the pattern is the record's, each group's positions are below M
    and strictly increasing, the padding after the last position is zero."""
    _check_shape(layer, parts, shards)
    held = parts["nm_pattern"].tolist()
    if held != list(layer.pattern):  # type: ignore[arg-type]
        raise _fail(
            shards, layer.part("nm_pattern"), f"holds {held}, the record {list(layer.pattern)}"
        )
    n, m = layer.pattern  # type: ignore[misc]
    cols = layer.shape[1]
    indices, tensor = parts["nm_indices"], layer.part("nm_indices")
    padding = unpack_indices(indices, index_bits(m))[:, cols // m * n :]
    if bool(padding.any()):
        raise _fail(shards, tensor, "has bits set in the padding after the last position")
    positions = nm_positions(indices, n, m, cols)
    if bool((positions >= m).any()):
        raise _fail(shards, tensor, f"holds a position beyond the group of {m}")
    if n > 1 and bool((positions[..., 1:] <= positions[..., :-1]).any()):
        raise _fail(shards, tensor, "holds positions that do not increase within a group")
