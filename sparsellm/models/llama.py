"""LLaMA-family blocks: LLaMA, Mistral, Qwen2/3, and any model with the same layout."""

from __future__ import annotations

from torch import nn

from sparsellm.models.base import Adapter
from sparsellm.models.feed_forward import FeedForward


class LlamaAdapter(Adapter):
    family = "llama"
    examples = "LLaMA, Mistral, Qwen2, Qwen3, SmolLM"
    blocks_path = "model.layers"
    attention = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    linears = (*attention, "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

    def feed_forward(self, block: nn.Module) -> FeedForward:
        return FeedForward(
            up="mlp.up_proj",
            down="mlp.down_proj",
            gate="mlp.gate_proj",
            activation=block.mlp.act_fn,
        )
