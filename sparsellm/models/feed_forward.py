"""The feed-forward part of a block: its wiring, its one forward, and inferring it from shapes.

A wiring is a *claim* about a block; nothing here trusts it. The SparseLLM pruner checks each
claim numerically on the dense block (:mod:`sparsellm.layout`) and uses the first that
reproduces what the block's own FFN computes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsellm.models.linear import is_linear, linear_weight

Activation = Callable[[torch.Tensor], torch.Tensor]


def ffn_hidden(
    activation: Activation,
    gate_pre: torch.Tensor | None,
    up_pre: torch.Tensor,
    gate_value: torch.Tensor | None = None,
) -> torch.Tensor:
    """The FFN's hidden activation from its pre-activations: ``act(gate_pre) * up_pre`` for a
    gated FFN, ``act(up_pre)`` for a plain one (``gate_pre`` None). ``gate_value``:
    ``act(gate_pre)`` when the caller has it already (the solver needs it on its own too).

    The one definition of what an FFN computes between its projections: both
    :meth:`FeedForward.forward` and the SparseLLM solver (its ``σ(s, z)``) call it, so the
    wiring check, the propagation and the solver cannot disagree about it.
    """
    if gate_pre is None:
        return activation(up_pre)
    return (activation(gate_pre) if gate_value is None else gate_value) * up_pre


@dataclass(frozen=True)
class FeedForward:
    """Names (relative to a block) of the feed-forward layers and its activation.

    The FFN computes ``down(act(gate(x)) * up(x))`` when ``gate`` is set, else
    ``down(act(up(x)))``. With ``fused_gate_up`` the layer named ``up`` computes both at once,
    ``gate, up = layer(x).chunk(2, dim=-1)``, or ``up, gate`` with ``up_first``.
    """

    up: str
    down: str
    gate: str | None
    activation: Activation
    fused_gate_up: bool = False
    up_first: bool = False  # fused layers only: rows [up; gate] instead of [gate; up]

    @property
    def names(self) -> list[str]:
        """The distinct layers of this FFN."""
        return [name for name in (self.up, self.gate, self.down) if name]

    def split_fused(self, fused: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate, up)`` halves of a fused layer's weight rows or bias (``dim=0``) or of its
        output columns (``dim=-1``)."""
        first, second = fused.chunk(2, dim=dim)
        return (second, first) if self.up_first else (first, second)

    def join_fused(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`split_fused` for weight rows."""
        return torch.cat([up, gate] if self.up_first else [gate, up])

    @torch.no_grad()
    def forward(
        self, x: torch.Tensor, layers: dict[str, nn.Module], chunk: int = 4096
    ) -> torch.Tensor:
        """The FFN output for rows ``x`` [N, d] with the layers' current weights, in float32."""

        def affine(rows: torch.Tensor, name: str) -> torch.Tensor:
            module = layers[name]
            bias = getattr(module, "bias", None)
            bias = bias.detach().float() if bias is not None else None
            return F.linear(rows, linear_weight(module).detach().float(), bias)

        parts = []
        for start in range(0, x.shape[0], chunk):
            rows = x[start : start + chunk].float()
            if self.fused_gate_up:
                gate, up = self.split_fused(affine(rows, self.up), dim=-1)
            else:
                gate = affine(rows, self.gate) if self.gate else None
                up = affine(rows, self.up)
            parts.append(affine(ffn_hidden(self.activation, gate, up), self.down))
        return torch.cat(parts)


def _is_activation(module: nn.Module) -> bool:
    """Elementwise-looking: no children, no Linear or norm, at most a few scalar parameters
    (learned activations such as xIELU carry some)."""
    if list(module.children()) or is_linear(module) or isinstance(module, nn.Dropout):
        return False
    if isinstance(module, nn.Identity) or "norm" in type(module).__name__.lower():
        return False
    return all(p.numel() <= 4 for p in module.parameters())


def _activations(parent: nn.Module, block: nn.Module, config: object) -> list[Activation]:
    """Activation candidates, likeliest first: the FFN's own activation modules, the block's,
    the config's ``hidden_act`` / ``hidden_activation``, then the common functions (some MLPs
    call ``F.silu`` in their forward and hold no module for it)."""
    found: list[Activation] = [*parent.children(), *block.modules()]
    found = [m for m in dict.fromkeys(found) if _is_activation(m)]
    from transformers.activations import ACT2FN

    for key in ("hidden_activation", "hidden_act", "activation_function"):
        name = getattr(config, key, None)
        if isinstance(name, str) and name in ACT2FN:
            found.append(ACT2FN[name])
    return found + list(_COMMON_ACTIVATIONS)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


_COMMON_ACTIVATIONS: tuple[Activation, ...] = (F.silu, F.gelu, _gelu_tanh, F.relu)


def _wirings(linears: dict[str, nn.Module]) -> Iterator[dict]:
    """Plain, gated and fused-gated two-layer wirings that the layers' shapes allow."""
    shapes = {name: tuple(linear_weight(m).shape) for name, m in linears.items()}  # (out, in)
    for down, (d, f) in shapes.items():
        ins = {n: s for n, s in shapes.items() if n != down and s[1] == d}
        if len(ins) != len(shapes) - 1:
            continue
        widths = sorted(ins.items())
        if len(widths) == 1 and widths[0][1][0] == f:
            yield dict(up=widths[0][0], down=down, gate=None)
        elif len(widths) == 1 and widths[0][1][0] == 2 * f:
            for up_first in (False, True):
                yield dict(
                    up=widths[0][0], down=down, gate=None, fused_gate_up=True, up_first=up_first
                )
        elif len(widths) == 2 and all(s[0] == f for _, s in widths):
            (a, _), (b, _) = widths
            yield dict(up=b, down=down, gate=a)
            yield dict(up=a, down=down, gate=b)


def _named(wiring: dict, prefix: str, act: Activation) -> FeedForward:
    dot = f"{prefix}." if prefix else ""
    names = {k: f"{dot}{wiring[k]}" if wiring[k] else None for k in ("up", "down", "gate")}
    return FeedForward(activation=act, **{**wiring, **names})


def _split_pairs(block: nn.Module) -> Iterator[dict]:
    """Plain up/down pairs whose layers sit in different modules (BERT-style ``intermediate``
    and ``output``): ``d → f`` then ``f → d`` with ``f ≠ d``, so attention's square
    projections are not taken for an FFN."""
    shapes = {n: tuple(linear_weight(m).shape) for n, m in block.named_modules() if is_linear(m)}
    for down, (d, f) in shapes.items():
        for up, shape in shapes.items():
            if (
                up != down
                and f != d
                and shape == (f, d)
                and up.rpartition(".")[0] != down.rpartition(".")[0]
            ):
                yield dict(up=up, down=down, gate=None)


def infer_feed_forwards(block: nn.Module, config: object = None) -> list[FeedForward]:
    """Every FFN wiring ``block``'s Linear shapes allow, likeliest first.

    An up (and gate, or a fused gate-up) layer ``d → f`` and a down layer ``f → d`` side by
    side in one module holding two or three Linear layers; then plain pairs split across two
    modules. Each candidate is a guess until checked numerically.
    """
    candidates = []
    for prefix, parent in block.named_modules():
        linears = {n: m for n, m in parent.named_children() if is_linear(m)}
        wirings = list(_wirings(linears)) if len(linears) in (2, 3) else []
        for act in _activations(parent, block, config) if wirings else []:
            candidates += [_named(wiring, prefix, act) for wiring in wirings]
    pairs = list(_split_pairs(block))
    for act in _activations(block, block, config) if pairs else []:
        candidates += [_named(pair, "", act) for pair in pairs]
    return candidates
