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
    ``down(act(up(x)))``.
    """

    module: str  # the sub-module taking the normalised hidden state, e.g. "mlp"
    up: str
    down: str
    gate: str | None
    activation: Callable[[torch.Tensor], torch.Tensor]


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

    def feed_forward(self, block: nn.Module) -> FeedForward:
        """How ``block``'s feed-forward part is wired."""
        raise NotImplementedError

    def ffn_sees_residual(self) -> bool:
        """True when the FFN output is added straight onto the block output (pre-norm blocks):
        the FFN can then be asked to absorb the attention's error."""
        return True
