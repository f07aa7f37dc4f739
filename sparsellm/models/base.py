"""What the engine and solvers need to know about an architecture family.

An adapter answers structural questions only: where the decoder blocks are, which Linear
layers inside a block get pruned, and how the feed-forward part is wired. Everything that runs
before block 0 (embeddings, rotary tables, masks) is captured by the engine generically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from sparsellm.errors import UserError


class UnsupportedModelError(UserError):
    """The model's architecture matches none of the registered adapters."""


@dataclass(frozen=True)
class FeedForward:
    """Names (relative to a block) of the feed-forward layers and its activation.

    The FFN computes ``down(act(gate(x)) * up(x))`` when ``gate`` is set, else
    ``down(act(up(x)))``. With ``fused_gate_up`` the layer named ``up`` computes both at once,
    gate rows first (``gate, up = layer(x).chunk(2, dim=-1)``, as Phi-3 does).
    """

    module: str  # the sub-module taking the normalised hidden state, e.g. "mlp"
    up: str
    down: str
    gate: str | None
    activation: Callable[[torch.Tensor], torch.Tensor]
    # Wiring inferred from names alone: the pruner checks it against the block's real FFN
    # output before relying on it.
    inferred: bool = False
    fused_gate_up: bool = False


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` holding a transformer's decoder blocks.

    Found generically: the ModuleList whose length is ``config.num_hidden_layers`` (of the text
    config for multimodal models; the one with most parameters if several match), otherwise the
    longest ModuleList in the model.
    """
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks")

    def size(ml: nn.ModuleList) -> int:
        return sum(p.numel() for p in ml.parameters())

    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    layers = getattr(config, "num_hidden_layers", None)
    matching = [ml for ml in lists if len(ml) == layers]
    if matching:
        return max(matching, key=size)
    return max(lists, key=lambda ml: (len(ml), size(ml)))


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` or transformers ``Conv1D`` with a 2-D weight: what pruning rewrites."""
    weight = getattr(module, "weight", None)
    kind = isinstance(module, nn.Linear) or _is_conv1d(module)
    return kind and isinstance(weight, torch.Tensor) and weight.ndim == 2


def get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    """``root.get_submodule(path)`` or ``None`` when any part is missing."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D stores its weight as [in, out].
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as ``[out, in]`` (a view for ``nn.Linear``)."""
    return module.weight.t() if _is_conv1d(module) else module.weight


def set_linear_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write ``weight`` given as ``[out, in]`` into the layer, in the layer's dtype."""
    data = weight.t() if _is_conv1d(module) else weight
    with torch.no_grad():
        module.weight.copy_(data.to(module.weight.dtype))


class Adapter:
    """Base class: subclasses set the class attributes and may override the hooks below."""

    family: str = ""
    examples: str = ""  # model types known to work, for error messages and docs
    blocks_path: str = ""  # path from the *ForCausalLM to the ModuleList of blocks
    linears: tuple[str, ...] = ()  # prunable layers, relative to a block
    attention: tuple[str, ...] = ()  # the subset of ``linears`` in the attention group

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """True when ``model`` has this family's layout."""
        blocks = get_submodule(model, cls.blocks_path)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            return False
        return all(get_submodule(blocks[0], name) is not None for name in cls.linears)

    def __init__(self, model: nn.Module):
        self.model = model

    def blocks(self) -> nn.ModuleList:
        """The decoder blocks, in execution order."""
        return self.model.get_submodule(self.blocks_path)

    def block_name(self, index: int) -> str:
        return f"{self.blocks_path}.{index}"

    def prunable(self, block: nn.Module) -> dict[str, nn.Module]:
        """Prunable layers of ``block`` by relative name."""
        return {name: block.get_submodule(name) for name in self.linears}

    def feed_forward(self, block: nn.Module) -> FeedForward | None:
        """How ``block``'s feed-forward part is wired; ``None`` when the adapter does not know
        (SparseLLM then prunes that block layer by layer with SparseGPT)."""
        return None

    def ffn_sees_residual(self) -> bool:
        """True when the FFN output is added straight onto the block output (pre-norm blocks):
        the FFN can then be asked to absorb the attention's error."""
        return True
