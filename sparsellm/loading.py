"""Load a causal LM and its tokenizer from a hub id, a local directory or a ``.gguf`` file."""

from __future__ import annotations

from pathlib import Path

import torch

from sparsellm.errors import UserError

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class ModelLoadError(UserError):
    """The model could not be found or loaded."""


def resolve_dtype(name: str, device: torch.device) -> torch.dtype | str:
    """``auto`` keeps the checkpoint's dtype on accelerators and uses float32 on the CPU,
    where half-precision matmuls are slow or missing."""
    if name == "auto":
        return "auto" if device.type != "cpu" else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}") from None


def _drop_gguf_flag(model: torch.nn.Module) -> torch.nn.Module:
    """Make a GGUF-loaded model a plain one: its weights are already dequantised, but the
    quantiser flag makes ``save_pretrained`` refuse. Done in place to avoid a second copy."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model


def model_location(spec: str) -> tuple[str, dict]:
    """Where ``transformers`` finds ``spec`` (hub id, directory, ``.gguf`` file) and the extra
    keyword a ``.gguf`` file needs; a one-line :class:`ModelLoadError` for a path that cannot
    be a model."""
    path = Path(spec)
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"model file {spec!r} does not exist")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory {spec!r} has no config.json")
        return str(path), {}
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelLoadError(f"model path {spec!r} does not exist")
    return spec, {}


def load_failure(spec: str, what: str, exc: BaseException) -> ModelLoadError:
    """The one-line error for ``what`` ("model", "config", ...) of ``spec`` failing to load,
    with a hint when ``spec`` is no local path (so it was looked up on the hub)."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    hint = (
        ""
        if Path(spec).exists()
        else "; it is not a local path and could not be loaded from the Hugging Face Hub "
        "or its cache (offline?) — download it first or pass a local directory or .gguf file"
    )
    subject = "model" if what == "model" else f"the {what} of"
    return ModelLoadError(f"cannot load {subject} {spec!r}: {reason}{hint}")


def load_model_and_tokenizer(
    spec: str, dtype: str = "auto", device: torch.device | None = None
) -> tuple[torch.nn.Module, object]:
    """``(model, tokenizer)`` for a hub id, a local directory or a ``.gguf`` file, on the host.

    Raises :class:`ModelLoadError` with a one-line explanation when it cannot.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # Our own progress bars cover the long steps; the per-tensor loading bar is noise.
    hf_logging.disable_progress_bar()
    device = device or torch.device("cpu")
    torch_dtype = resolve_dtype(dtype, device)
    location, extra = model_location(spec)
    kwargs: dict = {"dtype": torch_dtype, **extra}
    if "gguf_file" in kwargs and torch_dtype == "auto":
        kwargs["dtype"] = torch.float32  # GGUF weights are dequantised anyway
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **_only_gguf(kwargs))
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise load_failure(spec, "model", exc) from None
    model.eval()
    if "gguf_file" in kwargs:
        model = _drop_gguf_flag(model)
    return model, tokenizer


def _only_gguf(kwargs: dict) -> dict:
    return {"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {}
