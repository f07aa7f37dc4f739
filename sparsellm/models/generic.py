"""Any other causal LM: every Linear inside the decoder blocks, pruned layer by layer.

Found without naming anything: the blocks are the ``nn.ModuleList`` :func:`decoder_layers`
finds, the prunable layers are each block's own ``nn.Linear`` / ``Conv1D`` modules (fused
``query_key_value`` or ``gate_up_proj`` layers included: a layer-wise solver only needs a
layer's inputs). SparseLLM's joint FFN solve also needs the feed-forward wiring, which the
base class infers from the Linear shapes (plain, gated and fused gate-up two-layer MLPs, as in
GPT-NeoX, Falcon, BLOOM, Phi, Phi-3, GPT-J, StarCoder2) and the pruner verifies numerically;
anything else (MoE experts, extra layers inside the MLP) is pruned with SparseGPT in those
blocks, and the report says so.
"""

from __future__ import annotations

from torch import nn

from sparsellm.models.base import Adapter, decoder_layers
from sparsellm.models.linear import is_linear


class GenericAdapter(Adapter):
    family = "generic"
    examples = "any causal LM whose blocks sit in one ModuleList, e.g. GPT-NeoX, Falcon, Phi"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        try:
            blocks = decoder_layers(model)
        except ValueError:
            return False
        return any(is_linear(m) for m in blocks[0].modules())

    def __init__(self, model: nn.Module):
        super().__init__(model)
        blocks = decoder_layers(model)
        self.blocks_path = next(name for name, m in model.named_modules() if m is blocks)

    def prunable(self, block: nn.Module) -> dict[str, nn.Module]:
        return {name: m for name, m in block.named_modules() if is_linear(m)}
