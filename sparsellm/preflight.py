"""Checks that need the model's config or tokenizer but not its weights, run before the model
loads: a plan's config, and whether the calibration text is long enough for
``nsamples x seqlen`` and ``seqlen`` within the model's positions."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sparsellm.loading import load_failure, model_location

if TYPE_CHECKING:
    from sparsellm.config import PruneConfig


def _load(loader: object, spec: str, what: str) -> object:
    location, kwargs = model_location(spec)
    try:
        return loader.from_pretrained(location, **kwargs)
    except Exception as exc:  # a corrupt file fails in the parser's own terms (struct.error)
        raise load_failure(spec, what, exc) from None


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
