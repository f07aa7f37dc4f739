"""Checks run before the model loads (seconds, not the length of a prune), from the model's
config and tokenizer and the files the run reads and writes, never its weights:

- the model source: pickle and remote-code refusals, truncated safetensors files
  (:func:`check_model_source`), then its config;
- every window the run will feed the model fits its positions (``max_position_embeddings``)
  and holds ids below its vocabulary size; text is long enough for the windows asked for;
- the output: the nearest existing directory takes a new file, and its file system has room
  for the model (:func:`check_output_location`, :func:`check_free_disk`).

Each failure is the one-line ``UserError`` the run would otherwise raise later, or a
traceback it would end in (an ``IndexError`` in the embedding, a disk full after the prune).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from sparsellm.data import check_token_ids, load_token_tensor
from sparsellm.errors import UserError
from sparsellm.loading import (
    check_checkpoint,
    check_remote_code,
    check_shapes,
    code_references,
    pretrained,
    refuse_remote_code,
)
from sparsellm.settings import ConfigError

if TYPE_CHECKING:
    from sparsellm.config import EvalConfig, FinetuneConfig, PruneConfig

Windows = tuple[torch.Tensor, torch.Tensor]


def load_config(spec: str, trust_remote_code: bool = False) -> object:
    """The model's ``transformers`` config (no weights); a model that needs its own code is
    refused without ``trust_remote_code`` before any of it is imported."""
    from transformers import AutoConfig

    check_remote_code(spec, trust_remote_code)
    config = pretrained(AutoConfig, spec, "config", trust_remote_code=trust_remote_code)
    if not trust_remote_code:  # a hub id's config.json is only seen now
        references = code_references(getattr(config, "auto_map", None))
        refuse_remote_code(spec, references, getattr(config, "model_type", None))
    return config


def load_tokenizer(spec: str, trust_remote_code: bool = False) -> object:
    """The model's tokenizer (no weights)."""
    from transformers import AutoTokenizer

    return pretrained(AutoTokenizer, spec, "tokenizer", trust_remote_code=trust_remote_code)


def check_model_source(spec: str, allow_pickle: bool, trust_remote_code: bool) -> object:
    """The checks of the model's files that need no loading (a pickle-only checkpoint without
    ``allow_pickle``, truncated safetensors), then its config (code refused without
    ``trust_remote_code``), returned, and the checkpoint's tensor shapes against it."""
    check_checkpoint(spec, allow_pickle)
    config = load_config(spec, trust_remote_code)
    check_shapes(spec, config, trust_remote_code)
    return config


def _text_config(config: object) -> object:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def max_positions(config: object) -> int | None:
    """The longest sequence the model's config allows, if it says."""
    config = _text_config(config)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def vocab_size(config: object) -> int | None:
    """The number of token ids the model's embedding has, if its config says."""
    value = getattr(_text_config(config), "vocab_size", None)
    return value if isinstance(value, int) and value > 0 else None


def check_length(name: str, length: int, config: object) -> None:
    """``ConfigError`` when windows of ``length`` tokens (the setting ``name``) are longer than
    the model's positions: OPT and GPT-2 would fail with an ``IndexError`` in their position
    table, rotary models would run on positions they were never trained on."""
    limit = max_positions(config)
    if limit is not None and length > limit:
        raise ConfigError(
            f"{name} {length} is longer than the model's max_position_embeddings {limit}; "
            f"use {name} {limit} or less"
        )


def check_windows(windows: torch.Tensor, source: str, config: object) -> None:
    """Windows ``[n, length]`` the run will feed the model, from ``source``: within its
    positions and its vocabulary."""
    limit = max_positions(config)
    if limit is not None and windows.shape[1] > limit:
        raise ConfigError(
            f"the windows of {source!r} have {windows.shape[1]} tokens, more than the model's "
            f"max_position_embeddings {limit}; cut them to {limit} or fewer"
        )
    size = vocab_size(config)
    if size is not None:
        check_token_ids(windows, size, source)


def _tensor_windows(source: str, config: object) -> torch.Tensor:
    """A ``.pt`` token tensor, checked as :func:`check_windows` does."""
    windows = load_token_tensor(source)
    check_windows(windows, source, config)
    return windows


def _is_local_text(source: str) -> bool:
    """A text file or directory (not a named dataset, which preflight does not download)."""
    from sparsellm.data import BUILTIN, NAMED_DATASETS

    return source not in NAMED_DATASETS and (source in BUILTIN or Path(source).exists())


# ---------------------------------------------------------------------------- the output


def _nearest_existing(path: Path) -> Path:
    """``path`` or the closest of its ancestors that exists."""
    return next((p for p in (path, *path.parents) if p.exists()), Path(path.anchor))


def check_output_location(output: str) -> Path:
    """The directory the output will be created in (the output is staged next to itself and
    renamed into place): its nearest existing ancestor must be a directory that takes a new
    file, tried with a probe file created and removed there. Returns that ancestor."""
    parent = Path(output).resolve().parent
    ancestor = _nearest_existing(parent)
    if not ancestor.is_dir():
        raise ConfigError(
            f"output {output!r} cannot be created: {str(ancestor)!r} is a file, not a directory"
        )
    try:
        handle, probe = tempfile.mkstemp(prefix=".sparsellm-probe-", dir=ancestor)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(
            f"output {output!r} is not writable: cannot create a file in {str(ancestor)!r} "
            f"({exc.strerror}); choose another --output or change its permissions"
        ) from None
    return ancestor


def _size(count: int) -> str:
    value, unit = float(count), "bytes"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{count} bytes" if unit == "bytes" else f"{value:.1f} {unit}"


def weight_bytes(config: object, dtype: str, device: str | None, spec: str) -> int | None:
    """The bytes of the model's weights as the run will save them: its parameter count from
    the config (:func:`~sparsellm.shapes.config_sizes`) x the bytes of the dtype it loads in
    (``auto``: float32 on the CPU and for ``.gguf``, else the config's). ``None`` when the
    config does not say how large the model is."""
    from sparsellm.loading import DTYPES
    from sparsellm.plan import plan_dtype
    from sparsellm.shapes import config_sizes

    try:
        sizes = config_sizes(config)
    except UserError:  # a family whose config names its sizes differently: no estimate
        return None
    on_cpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu")
    if dtype != "auto":
        weight = DTYPES[dtype]
    elif on_cpu or spec.endswith(".gguf"):
        weight = torch.float32
    else:
        weight = plan_dtype(config, "auto")
    params = sizes.layers * sizes.block_params + sizes.other_params
    return params * weight.itemsize


def record_bytes(config: object, prune: PruneConfig, offload: bool) -> int:
    """Disk the resume record (:mod:`sparsellm.resume`) adds beside the output at its peak:
    the pruned blocks' weights (in memory; offloaded, the output shards are the record) and
    two generations of one rank's activations while a block is committed."""
    from sparsellm.pruners import get_method
    from sparsellm.shapes import config_sizes

    try:
        sizes = config_sizes(config)
    except UserError:
        return 0
    itemsize = (weight_bytes(config, prune.dtype, prune.device, prune.model) or 0) // max(
        1, sizes.layers * sizes.block_params + sizes.other_params
    )
    blocks = 0 if offload else sizes.layers * sizes.block_params * itemsize
    calibrated = get_method(prune.method).needs_calibration
    activations = prune.nsamples * prune.seqlen * sizes.hidden * itemsize if calibrated else 0
    return blocks + 2 * activations


def check_free_disk(output: str, needed: int | None, what: str = "the model") -> None:
    """``ConfigError`` when the file system the output goes to has fewer than ``needed``
    bytes free (the save would fail with a full disk after the whole run)."""
    if needed is None:
        return
    ancestor = _nearest_existing(Path(output).resolve().parent)
    free = shutil.disk_usage(ancestor).free
    if needed > free:
        raise ConfigError(
            f"output {output!r} needs about {_size(needed)} for {what} but "
            f"{str(ancestor)!r} has {_size(free)} free; free some space or choose another "
            "--output"
        )


def check_output(output: str, config: object, dtype: str, device: str | None, spec: str) -> None:
    """The output location takes files and has room for the model's weights."""
    check_output_location(output)
    check_free_disk(output, weight_bytes(config, dtype, device, spec))


# ---------------------------------------------------------------------------- subcommands


class PreparedInputs(NamedTuple):
    """What :func:`check_prune_inputs` read to check them, handed on so the run does not read
    and tokenize them again: the tokenizer and the windows of text sources (``None`` where
    nothing was read: token tensors, which are cheap to load, and hub datasets)."""

    tokenizer: object | None
    calibration: torch.Tensor | None
    evaluation: torch.Tensor | None


def check_prune_inputs(config: PruneConfig, offload: bool = False) -> PreparedInputs:
    """Before the model loads: the model source, the output, every window within the model's
    positions and vocabulary, and the calibration text holding ``nsamples x seqlen`` tokens
    (token tensors are used as they are). Raises the one-line ``UserError`` the run would
    raise later, or instead of the traceback it would end in; returns what it read."""
    from sparsellm.data import calibration_windows, evaluation_windows

    model_config = check_model_source(config.model, config.allow_pickle, config.trust_remote_code)
    calibrated = config.uses_calibration
    text_calibration = calibrated and not config.calibration.endswith(".pt")
    eval_seqlen = config.eval_seqlen or config.seqlen
    if text_calibration:
        check_length("seqlen", config.seqlen, model_config)
    if config.eval and not config.eval.endswith(".pt"):
        check_length("eval_seqlen", eval_seqlen, model_config)
    check_output_location(config.output)
    weights = weight_bytes(model_config, config.dtype, config.device, config.model)
    if weights is not None:
        needed = weights + record_bytes(model_config, config, offload)
        check_free_disk(config.output, needed, "the model and its resume record")
    tokenizer = None
    if text_calibration or (config.eval and _is_local_text(config.eval)):
        tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    calibration = evaluation = None
    if calibrated:
        source = config.calibration
        if source.endswith(".pt"):
            _tensor_windows(source, model_config)
        else:  # drawing the windows is the check (its DataError)
            calibration = calibration_windows(
                source, tokenizer, config.nsamples, config.seqlen, config.seed
            )
            check_windows(calibration, source, model_config)
    if config.eval and config.eval.endswith(".pt"):
        _tensor_windows(config.eval, model_config)
    elif config.eval and _is_local_text(config.eval):
        evaluation = evaluation_windows(config.eval, tokenizer, eval_seqlen, config.eval_windows)
        check_windows(evaluation, config.eval, model_config)
    return PreparedInputs(tokenizer, calibration, evaluation)


def check_eval_inputs(config: EvalConfig) -> PreparedInputs:
    """Before the model loads: the model source, ``seqlen`` within its positions, and the
    evaluation windows (read, tokenized and checked here, so the run does not read the text
    again). Returns them, and the tokenizer if one was loaded."""
    from sparsellm.data import evaluation_windows

    model_config = check_model_source(config.model, config.allow_pickle, config.trust_remote_code)
    if config.dataset.endswith(".pt"):
        windows = _tensor_windows(config.dataset, model_config)[: config.max_windows]
        return PreparedInputs(None, None, windows)
    check_length("seqlen", config.seqlen, model_config)
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    windows = evaluation_windows(config.dataset, tokenizer, config.seqlen, config.max_windows)
    check_windows(windows, config.dataset, model_config)
    return PreparedInputs(tokenizer, None, windows)


def check_finetune_inputs(
    config: FinetuneConfig, make_windows: Callable[[FinetuneConfig, object], Windows]
) -> tuple[Windows, object]:
    """Before the model loads: the model source, ``seqlen`` within its positions, the output,
    and the training and held-out windows (``make_windows(config, tokenizer)``, made here so
    a text too short or not UTF-8 fails now), which are returned with the tokenizer."""
    model_config = check_model_source(config.model, config.allow_pickle, config.trust_remote_code)
    check_length("seqlen", config.seqlen, model_config)
    check_output(config.output, model_config, config.dtype, config.device, config.model)
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    train, held_out = make_windows(config, tokenizer)
    check_windows(train, config.data, model_config)
    check_windows(held_out, config.eval or config.data, model_config)
    return (train, held_out), tokenizer
