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


# Integers go to torch (seeds, sizes), which takes 64 bits: larger ones fail deep inside.
INT_LIMIT = 2**63 - 1


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= INT_LIMIT


# Each check: (test, what the value must be). ``None`` passes wherever the default is ``None``.
CHECKS: dict[str, tuple[Check, str]] = {
    "positive_int": (lambda v: _integer(v) and v > 0, "a positive integer"),
    "non_negative_int": (lambda v: _integer(v) and v >= 0, "a non-negative integer"),
    "int": (_integer, "an integer"),
    "positive_number": (lambda v: _number(v) and v > 0, "a positive number"),
    "non_negative_number": (lambda v: _number(v) and v >= 0, "a non-negative number"),
    "number": (_number, "a number"),
    "fraction_number": (lambda v: _number(v) and 0 <= v <= 1, "a number from 0 to 1"),
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


# The type a value has, in the words of a TOML recipe (where wrong types come from).
_TYPE_NAMES = (
    (bool, "a boolean"),
    (int, "an integer"),
    (float, "a float"),
    (str, "a string"),
    (list, "a list"),
    (dict, "a table"),
)
# The Python types each kind of check accepts: a value of another type gets its type named.
_KIND_TYPES = {"int": (int,), "number": (int, float), "bool": (bool,), "str": (str,)}
_SHOWN = 60  # characters of a bad value quoted in a message


def type_name(value: Any) -> str:
    """What ``value`` is, as a recipe author would say it ("a string", "a table", ...)."""
    found = next((name for kind, name in _TYPE_NAMES if isinstance(value, kind)), None)
    return found or f"a {type(value).__name__}"  # TOML dates and times


def shown(value: Any) -> str:
    """``repr(value)`` cut to one short line, for messages."""
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def _right_type(check: str, value: Any) -> bool:
    """Whether ``value`` has the Python type the check ``check`` takes (bool is no number)."""
    kind = flag_kind_of(check)
    return isinstance(value, _KIND_TYPES[kind]) and (kind == "bool" or not isinstance(value, bool))


def check_value(field: dataclasses.Field, value: Any) -> None:
    """``ConfigError`` naming the setting, what it must be and what it got (with the value's
    type when that is the problem: a recipe's ``nsamples = "8"``)."""
    if value is None and field.default is None:
        return
    check = field.metadata["check"]
    test, wanted = CHECKS[check]
    choices = field.metadata["choices"]
    if test(value) and (not choices or value in choices):
        return
    wanted = f"one of {', '.join(choices)}" if choices else wanted
    if _integer_too_large(check, value):
        wanted += f" of at most {INT_LIMIT}"
    got = shown(value) if _right_type(check, value) else f"{shown(value)} ({type_name(value)})"
    raise ConfigError(f"{field.name} must be {wanted}, got {got}")


def _integer_too_large(check: str, value: Any) -> bool:
    """An integer setting given a value beyond 64 bits (its message says the limit)."""
    return check.endswith("int") and isinstance(value, int) and abs(value) > INT_LIMIT


def check_settings(values: object) -> None:
    """Check every declared setting of the dataclass instance ``values``."""
    for field in declared(type(values)):
        check_value(field, getattr(values, field.name))


def flag_kind_of(check: str) -> str:
    """``int``, ``number``, ``str`` or ``bool``: the kind of value the check ``check`` takes."""
    return next((k for k in ("int", "number", "bool") if check.endswith(k)), "str")


def flag_kind(field: dataclasses.Field) -> str:
    """``int``, ``number``, ``str`` or ``bool``: how the command line parses the setting."""
    return flag_kind_of(field.metadata["check"])


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
