"""Any other causal LM: every Linear inside the decoder blocks, pruned layer by layer.

Found without naming anything: the blocks are the ``nn.ModuleList`` :func:`decoder_layers`
finds, the prunable layers are each block's own ``nn.Linear`` / ``Conv1D`` modules (fused
``query_key_value`` or ``gate_up_proj`` layers included: a layer-wise solver only needs a
layer's inputs). SparseLLM's joint FFN solve also needs the feed-forward wiring: plain
two-layer MLPs are recognised by the names transformers gives them (GPT-NeoX, Falcon, BLOOM,
Phi, GPT-J), and so is Phi-3's gated MLP with a fused ``gate_up_proj``; the pruner checks that
wiring numerically against the block's own FFN output before using it. Anything else (MoE
experts, unknown names) is pruned with SparseGPT in those blocks, and the report notes it.
"""

from __future__ import annotations

from torch import nn

from sparsellm.models.base import Adapter, FeedForward, decoder_layers, get_submodule, is_linear

# (up, down, activation attributes) of plain two-layer MLPs under ``mlp``, as transformers
# names them.
_PLAIN_MLPS = (
    ("dense_h_to_4h", "dense_4h_to_h", ("act", "gelu_impl")),  # GPT-NeoX, Falcon, BLOOM
    ("fc1", "fc2", ("activation_fn",)),  # Phi
    ("fc_in", "fc_out", ("act",)),  # GPT-J
)


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

    def feed_forward(self, block: nn.Module) -> FeedForward | None:
        mlp = get_submodule(block, "mlp")
        if mlp is None:
            return None
        for up, down, activations in _PLAIN_MLPS:
            layers = [get_submodule(mlp, up), get_submodule(mlp, down)]
            act = next(
                (getattr(mlp, a) for a in activations if callable(getattr(mlp, a, None))), None
            )
            if act is not None and all(m is not None and is_linear(m) for m in layers):
                return FeedForward(
                    module="mlp",
                    up=f"mlp.{up}",
                    down=f"mlp.{down}",
                    gate=None,
                    activation=act,
                    inferred=True,
                )
        layers = [get_submodule(mlp, "gate_up_proj"), get_submodule(mlp, "down_proj")]
        act = getattr(mlp, "activation_fn", None)
        if callable(act) and all(m is not None and is_linear(m) for m in layers):
            return FeedForward(  # Phi-3 style: one Linear computes [gate; up]
                module="mlp",
                up="mlp.gate_up_proj",
                down="mlp.down_proj",
                gate=None,
                activation=act,
                inferred=True,
                fused_gate_up=True,
            )
        return None
