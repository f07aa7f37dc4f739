"""The method registry: each pruning method is declared once, as a :class:`Method`.

Everything else is derived from the declarations: the ``--method`` choices and the method
option flags of the CLI (with their ``--help`` text), the keywords ``prune_model()`` accepts,
the keys a recipe may hold, and their validation. A method's options are a dataclass whose
fields are :func:`~sparsellm.settings.setting` declarations; an option name shared by several
methods (``dampening``) must be declared the same way by each, since it is one flag.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sparsellm.engine import BlockPruner
from sparsellm.masks import SparsityTarget
from sparsellm.settings import ConfigError, check_settings, declared


@dataclass(frozen=True)
class Method:
    """A pruning method.

    ``options`` is a dataclass of :func:`~sparsellm.settings.setting` fields (it may have none)
    and may define ``check(target)`` for checks that need the sparsity target, and a
    ``follows_dense_model`` property: True asks the engine for the dense model's outputs of
    every block (``BlockJob.reference``). ``build`` turns an options instance into the block
    pruner the engine runs for every decoder block.
    """

    name: str
    summary: str  # one line for --help
    needs_calibration: bool  # False: data-free, no forward passes at all
    options: type
    build: Callable[[Any], BlockPruner]

    def make_options(self, values: dict[str, Any], target: SparsityTarget) -> Any:
        """This method's options from ``values`` (its own keys only), checked."""
        try:
            options = self.options(**values)
        except TypeError as exc:  # an unknown key; callers filter, so this is a method bug
            raise ConfigError(f"method {self.name}: {exc}") from None
        check_settings(options)
        if hasattr(options, "check"):
            options.check(target)
        return options


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (and so to the CLI, the API and recipes)."""
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered")
    shared = option_fields()
    for field in declared(method.options):
        other = shared.get(field.name)
        if other is not None and (other.default, other.metadata) != (
            field.default,
            field.metadata,
        ):
            raise ValueError(
                f"option {field.name!r} of {method.name!r} differs from the one other methods "
                "declare; one name is one flag, so declare it the same way"
            )
    METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method (tests register temporary ones)."""
    METHODS.pop(name, None)


def get_method(name: str) -> Method:
    """The method registered as ``name``; ``ConfigError`` listing the known ones otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}"
        ) from None


def option_fields() -> dict[str, dataclasses.Field]:
    """Every method option by name (first declaration wins; all are identical)."""
    fields: dict[str, dataclasses.Field] = {}
    for method in METHODS.values():
        for field in declared(method.options):
            fields.setdefault(field.name, field)
    return fields


def methods_with(option: str) -> list[str]:
    """Names of the methods that take ``option``."""
    return [m.name for m in METHODS.values() if any(f.name == option for f in declared(m.options))]
