"""A compressed checkpoint directory, opened and checked: its record, its shards, the model its
config builds. Opening checks every name, header and shape against the record and the config
(no tensor data is read); each layer's data is checked when it is read."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from sparsellm.compressed.files import (
    CONFIG,
    CompressedCheckpointError,
    Shards,
    read_config,
)
from sparsellm.compressed.packing import decode_bitmask, decode_nm
from sparsellm.compressed.record import (
    FORMS,
    LayerRecord,
    check_bitmask,
    check_headers,
    check_nm,
    parse_record,
)
from sparsellm.compressed.skeleton import Layout, build_skeleton


@dataclass
class CompressedCheckpoint:
    """``directory``'s config (JSON), compressed layers, shards and the meta-built model."""

    directory: Path
    config: dict
    layers: dict[str, LayerRecord]
    shards: Shards
    model: nn.Module
    layout: Layout

    @classmethod
    def open(
        cls,
        directory: str | Path,
        dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
    ) -> CompressedCheckpoint:
        """Open and check ``directory``; the skeleton is built in ``dtype`` (``None``: the
        config's)."""
        directory = Path(directory)
        config = read_config(directory)
        layers = parse_record(config, directory)
        shards = Shards.open(directory)
        model = build_skeleton(directory, dtype, trust_remote_code)
        checkpoint = cls(directory, config, layers, shards, model, Layout.of(model))
        checkpoint._check()
        return checkpoint

    def dense_names(self) -> list[str]:
        """Checkpoint tensors stored as they are (not parts of a compressed layer)."""
        parts = {part for layer in self.layers.values() for part in layer.parts()}
        return [name for name in self.shards.tensors if name not in parts]

    def names(self) -> Iterator[str]:
        """Every weight name, dense or compressed, in a stable order."""
        yield from sorted([*self.dense_names(), *self.layers])

    def read_parts(self, layer: LayerRecord) -> dict[str, Tensor]:
        """``layer``'s parts by suffix (``bitmask``, ``compressed``, ...), their data checked."""
        parts = {suffix: self.shards.read(layer.part(suffix)) for suffix in FORMS[layer.form]}
        if layer.form == "bitmask":
            check_bitmask(layer, parts, self.shards)
        else:
            check_nm(layer, parts, self.shards)
        return parts

    def dense_weight(self, layer: LayerRecord) -> Tensor:
        """``layer``'s dense tensor as the model stores it (``[in, out]`` when transposed)."""
        parts = self.read_parts(layer)
        cols = layer.shape[1]
        if layer.form == "bitmask":
            offsets = parts["row_offsets"]
            weight = decode_bitmask(parts["bitmask"], parts["compressed"], offsets, cols)
        else:
            weight = decode_nm(parts["nm_values"], parts["nm_indices"], layer.pattern, cols)
        return weight.t().contiguous() if layer.transposed else weight

    # ------------------------------------------------------------------------- checks

    def _check(self) -> None:
        """Names, headers and shapes against the record and the config; nothing missing."""
        covered = set()
        for name in self.dense_names():
            covered.add(self._check_dense(name))
        for layer in self.layers.values():
            check_headers(layer, self.shards)
            covered.add(self._check_layer(layer))
        for group in self.layout.aliases:
            if not covered.intersection(group):
                raise CompressedCheckpointError(
                    f"{str(self.directory)!r}: the checkpoint has no tensor {group[0]!r}, which "
                    f"its {CONFIG} needs"
                )

    def _no_such(self, name: str, where: str) -> CompressedCheckpointError:
        kind = type(self.model).__name__
        return CompressedCheckpointError(
            f"{where}: tensor {name!r} matches no tensor of the {kind} its {CONFIG} describes"
        )

    def _check_dense(self, name: str) -> str:
        entry = self.shards.tensors[name]
        key = self.layout.key(name)
        if key is None:
            raise self._no_such(name, repr(str(entry.file)))
        if name in self.layers:
            raise CompressedCheckpointError(
                f"{str(entry.file)!r}: tensor {name!r} is stored dense and listed as compressed"
            )
        if entry.shape != self.layout.shapes[key]:
            raise CompressedCheckpointError(
                f"{str(entry.file)!r}: tensor {name!r} has shape {list(entry.shape)}, the "
                f"config makes it {list(self.layout.shapes[key])}"
            )
        return key

    def _check_layer(self, layer: LayerRecord) -> str:
        where = repr(str(self.directory / CONFIG))
        key = self.layout.key(layer.name)
        if key is None:
            raise self._no_such(layer.name, where)
        if key not in self.layout.linears or self.layout.linears[key] != layer.transposed:
            orientation = "[in, out]" if layer.transposed else "[out, in]"
            raise CompressedCheckpointError(
                f"{where}: {layer.name!r} is recorded as a Linear weight stored {orientation}, "
                "which the model's layer is not"
            )
        expected = self.layout.shapes[key]
        if tuple(layer.stored_shape) != expected:
            raise CompressedCheckpointError(
                f"{where}: {layer.name!r} is recorded with shape {list(layer.shape)} but the "
                f"config's layer is {list(expected[::-1] if layer.transposed else expected)}"
            )
        return key
