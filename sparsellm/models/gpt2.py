"""GPT-2 blocks (Conv1D layers with [in, out] weights and a fused q/k/v projection)."""

from __future__ import annotations

from torch import nn

from sparsellm.models.base import Adapter
from sparsellm.models.feed_forward import FeedForward


class GPT2Adapter(Adapter):
    family = "gpt2"
    examples = "GPT-2, DistilGPT-2"
    blocks_path = "transformer.h"
    attention = ("attn.c_attn", "attn.c_proj")
    linears = (*attention, "mlp.c_fc", "mlp.c_proj")

    def feed_forward(self, block: nn.Module) -> FeedForward:
        return FeedForward(up="mlp.c_fc", down="mlp.c_proj", gate=None, activation=block.mlp.act)
