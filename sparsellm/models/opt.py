"""OPT blocks, including the post-layer-norm / project_in-out variant of OPT-350m."""

from __future__ import annotations

from torch import nn

from sparsellm.models.base import Adapter
from sparsellm.models.feed_forward import FeedForward


class OPTAdapter(Adapter):
    family = "opt"
    examples = "OPT-125m … OPT-66b (incl. OPT-350m)"
    blocks_path = "model.decoder.layers"
    attention = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
    linears = (*attention, "fc1", "fc2")

    def feed_forward(self, block: nn.Module) -> FeedForward:
        # OPT has no FFN sub-module: fc1 → activation → fc2 sit directly on the block.
        return FeedForward(up="fc1", down="fc2", gate=None, activation=block.activation_fn)
