"""Checks that need the model's config or tokenizer but not its weights, run before the model
loads: a plan's config, and whether the calibration text is long enough for
``nsamples x seqlen`` and ``seqlen`` within the model's positions."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sparsellm.loading import ModelLoadError

if TYPE_CHECKING:
    from sparsellm.config import PruneConfig


def model_location(spec: str) -> tuple[str, dict]:
    """Where ``transformers`` finds ``spec`` (hub id, directory, ``.gguf`` file) and the extra
    keyword a ``.gguf`` file needs; the same one-line errors as :mod:`sparsellm.loading`."""
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


def _load(loader: object, spec: str, what: str) -> object:
    location, kwargs = model_location(spec)
    try:
        return loader.from_pretrained(location, **kwargs)
    except (OSError, ValueError, ImportError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = (
            ""
            if Path(spec).exists()
            else "; it is not a local path and could not be loaded from the Hugging Face Hub "
            "or its cache (offline?) — download it first or pass a local directory or .gguf file"
        )
        raise ModelLoadError(f"cannot load the {what} of {spec!r}: {reason}{hint}") from None


def load_config(spec: str) -> object:
    """The model's ``transformers`` config (no weights)."""
    from transformers import AutoConfig

    return _load(AutoConfig, spec, "config")


def load_tokenizer(spec: str) -> object:
    """The model's tokenizer (no weights)."""
    from transformers import AutoTokenizer

    return _load(AutoTokenizer, spec, "tokenizer")


def max_positions(config: object) -> int | None:
    """The longest sequence the model's config allows, if it says."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _window_lengths(config: PruneConfig, calibrated: bool) -> dict[str, int]:
    """The window lengths the run will feed the model, by setting name."""
    from sparsellm.data import load_token_tensor

    lengths = {}
    if calibrated:
        source = config.calibration
        pt = source.endswith(".pt")
        lengths["seqlen"] = load_token_tensor(source).shape[1] if pt else config.seqlen
    if config.eval and not config.eval.endswith(".pt"):
        lengths["eval_seqlen"] = config.eval_seqlen or config.seqlen
    return lengths


def check_prune_inputs(config: PruneConfig) -> None:
    """Before the model loads (seconds, not minutes): every window fits the model's positions,
    and the calibration text holds ``nsamples x seqlen`` tokens (token tensors are used as
    they are). Raises the one-line ``ConfigError`` / ``DataError`` the run would raise later."""
    from sparsellm.data import calibration_windows
    from sparsellm.pruners import get_method
    from sparsellm.settings import ConfigError

    calibrated = get_method(config.method).needs_calibration
    limit = max_positions(load_config(config.model))
    for name, length in _window_lengths(config, calibrated).items():
        if limit is not None and length > limit:
            raise ConfigError(
                f"{name} {length} is longer than the model's max_position_embeddings {limit}"
            )
    if calibrated and not config.calibration.endswith(".pt"):
        tokenizer = load_tokenizer(config.model)
        # The windows themselves are cheap; drawing them is the check (its DataError).
        calibration_windows(
            config.calibration, tokenizer, config.nsamples, config.seqlen, config.seed
        )
