"""What the engine and solvers need to know about an architecture family.

An adapter answers structural questions only: where the decoder blocks are, which Linear
layers inside a block get pruned, and how the feed-forward part is wired. Everything that runs
before block 0 (embeddings, rotary tables, masks) is captured by the engine generically.
"""

from __future__ import annotations

from torch import nn

from sparsellm.errors import UserError
from sparsellm.models.feed_forward import FeedForward, infer_feed_forwards


class UnsupportedModelError(UserError):
    """The model's architecture matches none of the registered adapters."""


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


def get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    """``root.get_submodule(path)`` or ``None`` when any part is missing."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


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
        # Every block: some models mix layouts (dense first blocks, MoE later ones).
        return all(get_submodule(b, name) is not None for b in blocks for name in cls.linears)

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
        """The family's known feed-forward wiring of ``block``; ``None`` when it has none."""
        return None

    def feed_forward_candidates(self, block: nn.Module) -> list[FeedForward]:
        """Wirings ``block``'s FFN may have: the family's own first, then every wiring its
        Linear shapes allow. The SparseLLM pruner uses the first one that reproduces the
        block's FFN output and prunes layer by layer when none does."""
        known = self.feed_forward(block)
        config = getattr(self.model, "config", None)
        if config is not None and hasattr(config, "get_text_config"):
            config = config.get_text_config()
        return ([known] if known else []) + infer_feed_forwards(block, config)
