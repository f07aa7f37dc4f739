"""``sparsellm.load_model``: a dense or compressed directory as a ``transformers`` model.

A compressed checkpoint is opened and checked (:class:`CompressedCheckpoint`), its model built
on ``meta``, and each tensor read, checked, restored and put in place one at a time, so the
model is never held twice. With ``sparse=True`` each compressed Linear weight's packed parts
go to :class:`sparsellm.sparse.SparseLinear` as they are: the dense weight is never built.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from sparsellm.compressed.checkpoint import CompressedCheckpoint
from sparsellm.compressed.files import CompressedCheckpointError, is_compressed
from sparsellm.compressed.record import LayerRecord
from sparsellm.errors import UserError


class SparseUnavailableError(UserError):
    """``sparse=True`` without the sparse inference module."""


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``dtype`` as a torch dtype (``"bfloat16"`` -> ``torch.bfloat16``); ``None`` stays."""
    if dtype is None:
        return dtype
    resolved = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise UserError(f"dtype {dtype!r} is not a floating-point torch dtype")
    return resolved


def load_model(
    directory: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    sparse: bool = False,
    *,
    trust_remote_code: bool = False,
) -> nn.Module:
    """The causal LM in ``directory``, dense or compressed, in eval mode on ``device``.

    ``dtype``: floating-point weights are cast to it (``None``: as stored). ``sparse``: Linear
    layers become :class:`sparsellm.sparse.SparseLinear` (a compressed checkpoint's packed
    weights are handed over without building the dense ones; a dense checkpoint goes through
    ``sparsellm.sparse.to_sparse_inference``). A malformed compressed checkpoint is refused
    with one line naming the file and the tensor (:class:`CompressedCheckpointError`).
    """
    from sparsellm.config import check_device

    if not isinstance(directory, str | os.PathLike):
        raise TypeError(f"directory must be a path, got {type(directory).__name__}")
    path = Path(directory)
    wanted = _dtype(dtype)
    check_device(str(device))  # before the weights are read, not after
    if is_compressed(path):
        model = _load_compressed(path, wanted, sparse, trust_remote_code)
    else:
        model = _load_dense(path, wanted, trust_remote_code)
        if sparse:  # swaps the sparse layers in place
            _sparse_module_api("to_sparse_inference")(model)
    return model.to(device).eval()


def _load_dense(path: Path, dtype: torch.dtype | None, trust_remote_code: bool) -> nn.Module:
    """A dense directory through the toolkit's checked loader (one-line errors)."""
    from transformers import AutoModelForCausalLM

    from sparsellm.loading import check_checkpoint, check_loading_info, pretrained

    spec = str(path)
    check_checkpoint(spec)
    model, info = pretrained(
        AutoModelForCausalLM,
        spec,
        "model",
        trust_remote_code=trust_remote_code,
        output_loading_info=True,
        ignore_mismatched_sizes=True,
        use_safetensors=True,
        dtype=dtype or "auto",
    )
    check_loading_info(spec, model, info)
    return model


def _load_compressed(
    path: Path, dtype: torch.dtype | None, sparse: bool, trust_remote_code: bool
) -> nn.Module:
    """Fill the checkpoint's skeleton: stored tensors first (biases included, which a sparse
    layer takes), then the compressed weights, dense or handed to the sparse module."""
    from sparsellm.offload import _owners, place

    checkpoint = CompressedCheckpoint.open(path, dtype, trust_remote_code)
    model, layout, owners = checkpoint.model, checkpoint.layout, _owners(checkpoint.model)
    for name in checkpoint.dense_names():
        key = layout.key(name)
        place(owners[key], _cast(checkpoint.shards.read(name), dtype))  # type: ignore[index]
    for layer in checkpoint.layers.values():
        key = layout.key(layer.name)
        # A tied weight is read elsewhere as a dense tensor: it cannot become a sparse layer.
        if sparse and not layout.shared(key):  # type: ignore[arg-type]
            _swap_sparse(model, key, layer, checkpoint, dtype)  # type: ignore[arg-type]
        else:
            place(owners[key], _cast(checkpoint.dense_weight(layer), dtype))  # type: ignore[index]
    checkpoint.shards.close()
    _check_complete(model, path)
    return model


def _cast(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    """Floating tensors in ``dtype`` (the cast ``from_pretrained`` makes); others as stored."""
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _check_complete(model: nn.Module, path: Path) -> None:
    """No parameter or buffer is left on ``meta`` (the opening checks make this a safeguard)."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta:
            raise CompressedCheckpointError(
                f"{str(path)!r}: the checkpoint has no tensor {name!r}, which its config needs"
            )


def _sparse_module_api(name: str):
    """``sparsellm.sparse.<name>``, or one line saying it is not there."""
    try:
        import sparsellm.sparse as sparse_module
    except ImportError as exc:
        raise SparseUnavailableError(
            f"sparse=True needs sparsellm.sparse, which cannot be imported ({exc})"
        ) from None
    try:
        return getattr(sparse_module, name)
    except AttributeError:
        raise SparseUnavailableError(f"sparsellm.sparse has no {name}") from None


def _swap_sparse(
    model: nn.Module,
    key: str,
    layer: LayerRecord,
    checkpoint: CompressedCheckpoint,
    dtype: torch.dtype | None,
) -> None:
    """Replace the Linear (or ``Conv1D``) owning ``key`` by a sparse layer built from the
    checked packed parts (``[out, in]`` whatever the original orientation)."""
    sparse_linear = _sparse_module_api("SparseLinear")
    parts = checkpoint.read_parts(layer)
    parent_name, _, child = key.removesuffix(".weight").rpartition(".")
    parent = model.get_submodule(parent_name)
    bias = getattr(getattr(parent, child), "bias", None)
    if layer.form == "bitmask":
        values = _cast(parts["compressed"], dtype)
        module = sparse_linear.from_packed(
            parts["bitmask"], values, parts["row_offsets"], layer.shape, bias
        )
    else:
        values = _cast(parts["nm_values"], dtype)
        indices = parts["nm_indices"]
        module = sparse_linear.from_nm(values, indices, layer.pattern, layer.shape, bias)
    setattr(parent, child, module)
