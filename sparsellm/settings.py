"""A setting is declared once: name, default, help text and check.

Settings are dataclass fields made with :func:`setting`. From that one declaration come the
command-line flag (:func:`add_flags`), the recipe key and the keyword argument of the Python
API (the field name), and validation (:func:`check_settings`), whose error names the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from typing import Any

from sparsellm.errors import UserError


class ConfigError(UserError):
    """Invalid settings; the CLI prints the message and exits with code 2."""


Check = Callable[[Any], bool]


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Each check: (test, what the value must be). ``None`` passes wherever the default is ``None``.
CHECKS: dict[str, tuple[Check, str]] = {
    "positive_int": (lambda v: _integer(v) and v > 0, "a positive integer"),
    "non_negative_int": (lambda v: _integer(v) and v >= 0, "a non-negative integer"),
    "int": (_integer, "an integer"),
    "positive_number": (lambda v: _number(v) and v > 0, "a positive number"),
    "non_negative_number": (lambda v: _number(v) and v >= 0, "a non-negative number"),
    "number": (_number, "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "size": (
        lambda v: v == "auto" or _size(v) is not None,
        "auto or a memory size such as 20GiB or 24GB",
    ),
}
_FLAG_TYPES = {"int": int, "number": float, "str": str}


def _size(value: Any) -> int | None:
    from sparsellm.memory import parse_size

    return parse_size(value)


def setting(
    default: Any,
    help: str,
    check: str = "str",
    *,
    choices: tuple[str, ...] | None = None,
    cli: bool = True,
) -> Any:
    """A dataclass field declaring one setting. ``check`` names an entry of :data:`CHECKS`;
    ``choices`` restricts a string; ``cli=False`` keeps it out of the command line."""
    if check not in CHECKS:
        raise ValueError(f"unknown check {check!r}")
    metadata = {"help": help, "check": check, "choices": choices, "cli": cli}
    return dataclasses.field(default=default, metadata=metadata)


def declared(schema: type) -> list[dataclasses.Field]:
    """The fields of ``schema`` made with :func:`setting`."""
    return [f for f in dataclasses.fields(schema) if "check" in f.metadata]


def check_value(field: dataclasses.Field, value: Any) -> None:
    """``ConfigError`` naming the setting when ``value`` fails its declared check."""
    if value is None and field.default is None:
        return
    test, wanted = CHECKS[field.metadata["check"]]
    choices = field.metadata["choices"]
    if not test(value) or (choices and value not in choices):
        wanted = f"one of {', '.join(choices)}" if choices else wanted
        raise ConfigError(f"{field.name} must be {wanted}, got {value!r}")


def check_settings(values: object) -> None:
    """Check every declared setting of the dataclass instance ``values``."""
    for field in declared(type(values)):
        check_value(field, getattr(values, field.name))


def flag_kind(field: dataclasses.Field) -> str:
    """``int``, ``number``, ``str`` or ``bool``: how the command line parses the setting."""
    check = field.metadata["check"]
    return next((k for k in ("int", "number", "bool") if check.endswith(k)), "str")


def add_flag(group: argparse._ActionsContainer, field: dataclasses.Field, help: str) -> None:
    """One ``--flag`` for ``field``; every flag defaults to ``None`` so a recipe can decide."""
    name = "--" + field.name.replace("_", "-")
    kind = flag_kind(field)
    if kind == "bool":
        group.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=help)
        return
    choices = field.metadata["choices"]
    group.add_argument(name, type=_FLAG_TYPES[kind], choices=choices, default=None, help=help)


def describe(field: dataclasses.Field) -> str:
    """The help text of ``field`` with its default."""
    default = field.default
    if default is None or field.metadata["check"] == "bool":
        return field.metadata["help"]
    return f"{field.metadata['help']} (default {default})"


def add_flags(parser: argparse._ActionsContainer, schema: type) -> None:
    """A flag for every command-line setting of ``schema``."""
    for field in declared(schema):
        if field.metadata["cli"]:
            add_flag(parser, field, describe(field))
