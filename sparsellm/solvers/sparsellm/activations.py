"""Elementwise activations with their first and second derivatives.

The per-element z and s steps (:mod:`.auxiliaries`) need ``act``, ``act'`` and ``act''`` at
the same points. ReLU, SiLU, GELU and tanh-GELU have closed forms (one pass, no graph, about
3x faster than autograd's); any other elementwise callable gets its derivatives from autograd.
A callable is known by what it computes, not by its type: ``transformers`` wraps SiLU and the
GELUs in classes of its own (and spells tanh-GELU several ways), so one that agrees with a
built-in on a grid of points is that built-in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# What callers may pass as the activation: a name (see ``ALIASES``) or an elementwise callable.
ActivationLike = Callable[[Tensor], Tensor] | str
# value, first and second derivative at the same points
Derivatives = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]


@dataclass(frozen=True)
class Activation:
    """An elementwise activation ``fn`` and its value with two derivatives, ``derivs``."""

    name: str
    fn: Callable[[Tensor], Tensor]
    derivs: Derivatives


def _relu_derivs(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.relu(x), (x > 0).to(x.dtype), torch.zeros_like(x)


def _silu_derivs(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    sig = torch.sigmoid(x)
    comp = 1.0 - sig
    f = x * sig
    f1 = sig + f * comp  # σ(1 + x(1 − σ))
    f2 = (sig * comp).mul_((comp - sig).mul_(x).add_(2.0))  # σ(1 − σ)(2 + x(1 − 2σ))
    return f, f1, f2


_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_C = math.sqrt(2.0 / math.pi)
_TANH_K = 0.044715


def _gelu_derivs(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    x2 = x * x
    cdf = torch.erf(x * _INV_SQRT2).add_(1.0).mul_(0.5)
    pdf = torch.exp(x2 * -0.5).mul_(_INV_SQRT_2PI)
    return x * cdf, cdf + x * pdf, pdf * (2.0 - x2)


def _gelu_tanh(x: Tensor) -> Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")


def _gelu_tanh_derivs(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # f = x(1 + t)/2 with t = tanh(u), u = c(x + k x³)
    x2 = x * x
    t = torch.tanh(x2.mul(_TANH_K).add_(1.0).mul_(x).mul_(_TANH_C))
    sech2 = 1.0 - t * t
    du = x2.mul(3.0 * _TANH_C * _TANH_K).add_(_TANH_C)
    d2u = x * (6.0 * _TANH_C * _TANH_K)
    f1 = 0.5 * (1.0 + t) + 0.5 * x * sech2 * du
    f2 = sech2 * (du + 0.5 * x * (d2u - 2.0 * t * du * du))
    return 0.5 * x * (1.0 + t), f1, f2


def _autograd_derivs(fn: Callable[[Tensor], Tensor]) -> Derivatives:
    def derivs(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            y = fn(xr)
            (g1,) = torch.autograd.grad(y.sum(), xr, create_graph=True)
            g2 = None
            if g1.requires_grad:  # piecewise-linear functions have no second derivative graph
                (g2,) = torch.autograd.grad(g1.sum(), xr, allow_unused=True)
        g2 = torch.zeros_like(x) if g2 is None else g2.detach()
        return y.detach(), g1.detach(), g2

    return derivs


BUILTIN = {
    "relu": Activation("relu", torch.relu, _relu_derivs),
    "silu": Activation("silu", torch.nn.functional.silu, _silu_derivs),
    "gelu": Activation("gelu", torch.nn.functional.gelu, _gelu_derivs),
    "gelu_tanh": Activation("gelu_tanh", _gelu_tanh, _gelu_tanh_derivs),
}
# Names accepted for the built-ins, including the Hugging Face config spellings.
ALIASES = {
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}


# Points where a callable must agree with a built-in to be taken for it: the exact and the
# tanh GELU differ by up to 5e-4 here, float32 spellings of one function by about 1e-6.
_PROBE = torch.linspace(-12.0, 12.0, 2401)


def _agrees(fn: Callable[[Tensor], Tensor], builtin: Activation) -> bool:
    """``fn`` computes ``builtin`` (to float32 rounding) on :data:`_PROBE`."""
    try:
        with torch.no_grad():
            value = fn(_PROBE.clone())
    except Exception:  # noqa: BLE001 - a callable that cannot take the probe is not a built-in
        return False
    if not isinstance(value, Tensor) or value.shape != _PROBE.shape:
        return False
    return bool(torch.allclose(value.float(), builtin.fn(_PROBE), rtol=1e-5, atol=1e-6))


def resolve_activation(activation: ActivationLike) -> Activation:
    """The :class:`Activation` for a name, a known torch function or module, or any callable.

    Raises:
        ValueError: an unknown name.
        TypeError: neither a name nor a callable.
    """
    F = torch.nn.functional
    if isinstance(activation, str):
        key = ALIASES.get(activation.strip().lower())
        if key is None:
            raise ValueError(
                f"unknown activation {activation!r}; use one of {sorted(ALIASES)} or a callable"
            )
        return BUILTIN[key]
    if isinstance(activation, torch.nn.ReLU) or activation in (torch.relu, F.relu):
        return BUILTIN["relu"]
    if isinstance(activation, torch.nn.SiLU) or activation is F.silu:
        return BUILTIN["silu"]
    if isinstance(activation, torch.nn.GELU):
        return BUILTIN["gelu_tanh" if activation.approximate == "tanh" else "gelu"]
    if activation is F.gelu:
        return BUILTIN["gelu"]
    if callable(activation):
        known = next((b for b in BUILTIN.values() if _agrees(activation, b)), None)
        if known is not None:
            return known
        # Must be elementwise; derivatives come from autograd (slower than the built-ins).
        return Activation(
            getattr(activation, "__name__", "custom"), activation, _autograd_derivs(activation)
        )
    raise TypeError(f"activation must be a name or a callable, not {type(activation).__name__}")
