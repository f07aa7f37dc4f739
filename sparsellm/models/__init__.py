"""Architecture adapters, chosen by the model's layout rather than its class name, so that
new releases with a known layout (e.g. another LLaMA-style model) work unchanged."""

from __future__ import annotations

from torch import nn

from sparsellm.models.base import Adapter, UnsupportedModelError, decoder_layers
from sparsellm.models.feed_forward import FeedForward, infer_feed_forwards
from sparsellm.models.generic import GenericAdapter
from sparsellm.models.gpt2 import GPT2Adapter
from sparsellm.models.linear import is_linear, linear_weight, set_linear_weight
from sparsellm.models.llama import LlamaAdapter
from sparsellm.models.opt import OPTAdapter

# Layout-specific adapters first; the generic one (layer-wise only for SparseLLM's FFN) last.
ADAPTERS: tuple[type[Adapter], ...] = (LlamaAdapter, OPTAdapter, GPT2Adapter, GenericAdapter)


def supported_families() -> str:
    """One line naming the supported families and examples."""
    return "; ".join(f"{a.family} ({a.examples})" for a in ADAPTERS)


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter whose layout ``model`` has; :class:`UnsupportedModelError` otherwise."""
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter(model)
    name = type(model).__name__
    raise UnsupportedModelError(
        f"unsupported architecture {name}: supported families are {supported_families()}"
    )


__all__ = [
    "ADAPTERS",
    "Adapter",
    "FeedForward",
    "GenericAdapter",
    "UnsupportedModelError",
    "decoder_layers",
    "get_adapter",
    "infer_feed_forwards",
    "is_linear",
    "linear_weight",
    "set_linear_weight",
    "supported_families",
]
