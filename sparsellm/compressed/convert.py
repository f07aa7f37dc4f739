"""Writing compressed checkpoints (from a model in memory, or from a dense directory) and
turning one back into a dense directory. Tensors are compressed or restored one at a time and
written a shard at a time, so only one shard's worth of output is ever held."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from tqdm.auto import tqdm

from sparsellm.compressed.checkpoint import CompressedCheckpoint
from sparsellm.compressed.files import (
    RECORD_KEY,
    CompressedCheckpointError,
    Shards,
    ShardWriter,
    copy_side_files,
    dtype_name,
    read_config,
    write_config,
)
from sparsellm.compressed.packing import choose_form, encode, survey
from sparsellm.compressed.record import VALUE_DTYPES, LayerRecord, make_record
from sparsellm.compressed.skeleton import Layout, build_skeleton
from sparsellm.saving import StagedOutput, output_errors

# The largest shard written: bounds the output held in memory before it goes to disk.
DEFAULT_SHARD_BYTES = 5 * 1024**3
_GIB = 1024**3


@dataclass
class Sizes:
    """Bytes before and after: every tensor, and the compressed Linear weights alone."""

    dense: int = 0
    stored: int = 0
    layers_dense: int = 0
    layers_stored: int = 0
    forms: Counter = field(default_factory=Counter)
    files_before: int = 0
    files_after: int = 0
    negative_zeros: int = 0  # -0.0 entries of compressed weights, stored as values

    def add(self, dense: int, stored: int, layer: LayerRecord | None) -> None:
        self.dense += dense
        self.stored += stored
        if layer is not None:
            self.layers_dense += dense
            self.layers_stored += stored
            self.forms[_form_label(layer)] += 1

    def summary(self, restored: bool = False) -> str:
        """Lines for the user: the compressed weights' bytes dense and compressed, every
        tensor's, the files' (``restored``: after a decompression, so the files grew)."""
        forms = ", ".join(f"{count} {label}" for label, count in sorted(self.forms.items()))
        layers = f"{sum(self.forms.values())} ({forms or 'none'})"
        verb = "restored" if restored else "compressed"
        lines = [
            f"{verb} weights: {layers}: dense {_size(self.layers_dense)}, compressed "
            f"{_size(self.layers_stored)} ({_ratio(self.layers_stored, self.layers_dense)})",
            f"all tensors: dense {_size(self.dense)}, compressed {_size(self.stored)} "
            f"({_ratio(self.stored, self.dense)})",
        ]
        if self.negative_zeros:
            lines.append(
                f"note: {self.negative_zeros:,} weights are -0.0 (masked by multiplying?); they "
                "are stored as values to keep the exact bits"
            )
        if self.files_before and self.files_after:
            lines.append(
                f"safetensors files: {_size(self.files_before)} -> {_size(self.files_after)} "
                f"({_ratio(self.files_after, self.files_before)})"
            )
        return "\n".join(lines)


def _form_label(layer: LayerRecord) -> str:
    return "bitmask" if layer.pattern is None else f"{layer.pattern[0]}:{layer.pattern[1]}"


def _size(nbytes: int) -> str:
    return f"{nbytes / _GIB:.3f} GiB" if nbytes >= _GIB else f"{nbytes / 1024**2:.2f} MiB"


def _ratio(part: int, whole: int) -> str:
    return f"{part / whole:.3f}x" if whole else "n/a"


def _nbytes(tensors: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ----------------------------------------------------------------------------- compressing


def pack(
    name: str, tensor: Tensor, transposed: bool | None, sizes: Sizes
) -> tuple[dict[str, Tensor], LayerRecord | None]:
    """``{name: tensor}`` as stored: the parts of its smallest form when it is a Linear weight
    (``transposed`` not ``None``) of a value dtype and some sparse form is smaller than dense;
    otherwise the tensor itself. The layer's record, when compressed; ``sizes`` counts it."""
    tensor = tensor.detach().cpu()
    if transposed is None or tensor.ndim != 2 or tensor.dtype not in VALUE_DTYPES.values():
        return {name: tensor}, None
    weight = tensor.t() if transposed else tensor
    found = survey(weight)
    form = choose_form(found)
    if form.kind == "dense":
        return {name: tensor}, None
    sizes.negative_zeros += found.negative_zeros
    shape = (weight.shape[0], weight.shape[1])
    layer = LayerRecord(name, form.kind, shape, tensor.dtype, transposed, form.pattern)
    parts = encode(weight, form, found)
    return {layer.part(suffix): part for suffix, part in parts.items()}, layer


def write_tensors(
    items: Iterable[tuple[str, Tensor]],
    transposed: Callable[[str, Tensor], bool | None],
    directory: Path,
    max_shard_bytes: int,
) -> tuple[list[LayerRecord], Sizes]:
    """Compress what can be and write everything into ``directory``'s shards, one tensor at a
    time; ``transposed(name, tensor)`` says whether a tensor is a Linear weight (see
    :func:`pack`). The compressed layers' records and the sizes."""
    writer = ShardWriter(directory, max_shard_bytes)
    layers, sizes = [], Sizes()
    for name, tensor in items:
        stored, layer = pack(name, tensor, transposed(name, tensor), sizes)
        writer.add(stored)
        sizes.add(tensor.numel() * tensor.element_size(), _nbytes(stored), layer)
        if layer is not None:
            layers.append(layer)
    writer.finish()
    return layers, sizes


def _state_to_save(model: nn.Module) -> dict[str, Tensor]:
    """The tensors ``save_pretrained`` would write: tied copies and ignored keys removed,
    transformers' own weight renamings reverted (so the names load with ``from_pretrained``)."""
    state = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:  # older transformers: keep the first name of each shared tensor
        seen: set[int] = set()
        state = {k: v for k, v in state.items() if not (id(v) in seen or seen.add(id(v)))}
    else:
        state = remove_tied_weights_from_state_dict(state, model)
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return state
    return revert_weight_conversion(model, state)


def _drain(state: dict[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
    """``state``'s items, each dropped from it once handed out (copies made for saving are
    then freed as they are written)."""
    for name in list(state):
        yield name, state.pop(name)


def write_compressed(
    model: nn.Module,
    tokenizer: Any,
    directory: Path,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> None:
    """The ``compressed`` output format: ``model`` as a compressed checkpoint in
    ``directory`` (config with the record, generation config, tokenizer)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layout = Layout.of(model)

    def transposed(name: str, tensor: Tensor) -> bool | None:
        return layout.transposed(name, tuple(tensor.shape))

    state = _state_to_save(model)
    layers, _ = write_tensors(_drain(state), transposed, directory, max_shard_bytes)
    model.config.architectures = [type(model).__name__]  # as save_pretrained records them
    model.config.dtype = dtype_name(model.dtype)
    model.config.save_pretrained(directory)
    config = read_config(directory)
    write_config(directory, {**config, RECORD_KEY: make_record(layers)})
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def _bar(names: list[str], what: str, progress: bool) -> Iterable[str]:
    return tqdm(names, what, disable=not progress, unit="tensor", leave=False)


def compress_directory(
    source: str | Path,
    output: str | Path,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    trust_remote_code: bool = False,
    progress: bool = False,
) -> Sizes:
    """Compress the dense safetensors checkpoint ``source`` into ``output`` (staged, renamed
    into place), tensor by tensor; tokenizer and other files are copied. The sizes."""
    source = Path(source)
    config = read_config(source)
    if RECORD_KEY in config:
        raise CompressedCheckpointError(f"{str(source)!r} is already compressed")
    shards = Shards.open(source)
    layout = Layout.of(build_skeleton(source, None, trust_remote_code))

    def transposed(name: str, tensor: Tensor) -> bool | None:
        return layout.transposed(name, tuple(tensor.shape))

    names = _bar(list(shards.tensors), "compressing", progress)
    items = ((name, shards.read(name)) for name in names)
    with StagedOutput(output) as staged, output_errors(output):
        layers, sizes = write_tensors(items, transposed, staged.path, max_shard_bytes)
        write_config(staged.path, {**config, RECORD_KEY: make_record(layers)})
        copy_side_files(source, staged.path)
        sizes.files_before, sizes.files_after = shards.nbytes(), _shard_bytes(staged.path)
        staged.commit()
    return sizes


def _shard_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.glob("*.safetensors"))


def decompress_directory(
    source: str | Path,
    output: str | Path,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    trust_remote_code: bool = False,
    progress: bool = False,
) -> Sizes:
    """Restore the compressed checkpoint ``source`` as a dense one in ``output``, bit for bit,
    every layer checked before it is used; config without the record, other files copied."""
    checkpoint = CompressedCheckpoint.open(source, None, trust_remote_code)
    with StagedOutput(output) as staged, output_errors(output):
        writer = ShardWriter(staged.path, max_shard_bytes)
        sizes = Sizes()
        for name in _bar(list(checkpoint.names()), "restoring", progress):
            layer = checkpoint.layers.get(name)
            if layer is None:
                tensor = checkpoint.shards.read(name)
            else:
                tensor = checkpoint.dense_weight(layer)
            writer.add({name: tensor})
            names = layer.parts() if layer is not None else [name]
            stored = sum(checkpoint.shards.entry_nbytes(part) for part in names)
            sizes.add(tensor.numel() * tensor.element_size(), stored, layer)
        writer.finish()
        config = {k: v for k, v in checkpoint.config.items() if k != RECORD_KEY}
        write_config(staged.path, config)
        copy_side_files(checkpoint.directory, staged.path)
        sizes.files_before = checkpoint.shards.nbytes()
        sizes.files_after = _shard_bytes(staged.path)
        staged.commit()
    return sizes
