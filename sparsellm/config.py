"""Pruning and evaluation settings, TOML recipes, and their validation.

A recipe holds the same keys as the command-line flags (``-`` or ``_``); flags given on the
command line override it. Every check here runs before a model is loaded or a file written.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from sparsellm.errors import UserError
from sparsellm.masks import SparsityTarget
from sparsellm.methods import METHODS


class ConfigError(UserError):
    """Invalid settings; the CLI prints the message and exits with code 2."""


@dataclass
class PruneConfig:
    """Everything a pruning run needs; field names equal CLI flags and recipe keys."""

    model: str | None = None
    output: str | None = None
    method: str = "sparsegpt"
    sparsity: float | None = None  # default 0.5 when no pattern is given
    pattern: str | None = None
    calibration: str = "builtin"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    device: str | None = None  # default: cuda if available, else cpu
    dtype: str = "auto"
    dampening: float = 0.01
    blocksize: int = 128
    batch_size: int = 32
    skip: str | None = None
    overwrite: bool = False
    guard: bool = True  # re-do a diverging block with SparseGPT, stop if still worse than zeros
    # SparseLLM: alternation epochs and penalties (None = scaled automatically from the data)
    epochs: int = 1
    alpha: float | None = None
    beta: float | None = None
    gamma: float | None = None
    eval: str | None = None  # text source for before/after perplexity
    eval_seqlen: int | None = None  # default: seqlen
    eval_windows: int | None = None

    def target(self) -> SparsityTarget:
        try:
            if self.pattern is not None and self.sparsity is not None:
                raise ValueError("give --sparsity or --pattern, not both")
            if self.pattern is None and self.sparsity is None:
                return SparsityTarget.parse(sparsity=0.5)
            return SparsityTarget.parse(sparsity=self.sparsity, pattern=self.pattern)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvalConfig:
    """Settings of ``sparsellm eval``."""

    model: str | None = None
    dataset: str = "wikitext2"
    seqlen: int = 2048
    max_windows: int | None = None
    batch_size: int = 4
    device: str | None = None
    dtype: str = "auto"


@dataclass
class FinetuneConfig:
    """Settings of ``sparsellm finetune``."""

    model: str | None = None
    output: str | None = None
    data: str = "builtin"
    eval: str | None = None  # held-out text; default: the last 10% of ``data``
    steps: int = 200
    lr: float = 1e-4
    batch_size: int = 4
    seqlen: int = 512
    eval_windows: int | None = 64
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    target_sparsity: float | None = None  # sparsify while training instead of keeping the mask
    mixed_precision: str = "auto"  # auto | bf16 | fp16 | no
    seed: int = 0
    device: str | None = None
    dtype: str = "auto"
    overwrite: bool = False


def check_output(output: str | None, overwrite: bool) -> None:
    """An output directory that may be written: absent, empty, or ``overwrite`` given."""
    if not output:
        raise ConfigError("no output directory given (--output or 'output' in the recipe)")
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output {output!r} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ConfigError(
            f"output directory {output!r} is not empty; pass --overwrite to replace it"
        )


def validate_finetune(config: FinetuneConfig) -> None:
    """Check ``config`` completely before anything is loaded."""
    if not config.model:
        raise ConfigError("no model given (--model or 'model' in the recipe)")
    for name in ("steps", "batch_size", "seqlen"):
        _positive_int(name, getattr(config, name))
    if config.eval_windows is not None:
        _positive_int("eval_windows", config.eval_windows)
    if not isinstance(config.lr, int | float) or not config.lr > 0:
        raise ConfigError(f"lr must be a positive number, got {config.lr!r}")
    if config.target_sparsity is not None and not 0 <= config.target_sparsity < 1:
        raise ConfigError(f"target_sparsity {config.target_sparsity} is outside [0, 1)")
    if config.mixed_precision not in ("auto", "bf16", "fp16", "no"):
        raise ConfigError(
            f"mixed_precision {config.mixed_precision!r} is not one of auto, bf16, fp16, no"
        )
    check_output(config.output, config.overwrite)


def load_recipe(path: str | Path, schema: type) -> dict:
    """Keys of a TOML recipe, validated against the dataclass ``schema``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} not found")
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"recipe {str(path)!r} is not valid TOML: {exc}") from None
    known = {f.name for f in fields(schema)}
    values = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(
                f"recipe {str(path)!r}: unknown key {key!r} (known: {', '.join(sorted(known))})"
            )
        values[name] = value
    return values


def merge(schema: type, recipe: dict, overrides: dict):
    """``schema`` built from its defaults, then the recipe, then explicit (non-None) flags."""
    values = {**recipe, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return schema(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


def _positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def validate_prune(config: PruneConfig, require_io: bool = True) -> SparsityTarget:
    """Check ``config`` completely; return its sparsity target."""
    if config.method not in METHODS:
        raise ConfigError(f"unknown method {config.method!r}; choose one of: {', '.join(METHODS)}")
    target = config.target()
    for name in ("nsamples", "seqlen", "blocksize", "batch_size"):
        _positive_int(name, getattr(config, name))
    if not isinstance(config.epochs, int) or isinstance(config.epochs, bool) or config.epochs < 0:
        raise ConfigError(f"epochs must be a non-negative integer, got {config.epochs!r}")
    if not isinstance(config.guard, bool):
        raise ConfigError(f"guard must be true or false, got {config.guard!r}")
    for name in ("alpha", "beta", "gamma"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int | float) or not value > 0):
            raise ConfigError(f"{name} must be a positive number, got {value!r}")
    for name in ("eval_seqlen", "eval_windows"):
        if getattr(config, name) is not None:
            _positive_int(name, getattr(config, name))
    if not isinstance(config.dampening, int | float) or config.dampening < 0:
        raise ConfigError(f"dampening must be a non-negative number, got {config.dampening!r}")
    if target.is_nm and config.blocksize % target.m:
        raise ConfigError(f"blocksize {config.blocksize} is not a multiple of M={target.m}")
    if config.skip is not None:
        import re

        try:
            re.compile(config.skip)
        except re.error as exc:
            message = f"skip {config.skip!r} is not a valid regular expression: {exc}"
            raise ConfigError(message) from None
    if require_io:
        if not config.model:
            raise ConfigError("no model given (--model or 'model' in the recipe)")
        check_output(config.output, config.overwrite)
    return target
