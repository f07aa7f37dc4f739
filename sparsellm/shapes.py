"""A model's sizes read from its ``transformers`` config alone (no weights): what
``sparsellm plan`` needs to count bytes (:meth:`sparsellm.memory.BlockShape.of_config`).

Parameters are counted as the families build their modules: attention with grouped K/V heads
(``num_key_value_heads``) and the biases the config asks for, a gated FFN (gate, up, down) for
LLaMA-style models or up/down for OPT/GPT-2-style ones, two norms per block (RMSNorm: a weight;
LayerNorm: weight and bias); outside the blocks the token embeddings, learned positions
(OPT, GPT-2), OPT's input/output projections, the final norm and the head (counted once
when tied to the embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass

from sparsellm.errors import UserError

# Families whose FFN is up → activation → down (no gate), whatever their config calls f.
_PLAIN_FFN = {"opt", "gpt2", "gpt_neox", "gptj", "falcon", "bloom", "phi", "gpt_bigcode"}
_OPT_POSITION_OFFSET = 2  # OPT's learned position table has max_position_embeddings + 2 rows


@dataclass(frozen=True)
class ConfigSizes:
    """What a config says about the model's sizes."""

    hidden: int  # d
    intermediate: int  # f
    heads: int
    layers: int
    gated: bool
    block_params: int  # every parameter of one block (norms and biases included)
    block_prunable: int  # the block's Linear weights
    other_params: int  # outside the blocks: embeddings, positions, final norm, head
    max_positions: int | None  # max_position_embeddings / n_positions


class ConfigShapeError(UserError):
    """A config that does not say how wide or deep the model is."""


def _first(config: object, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _required(config: object, what: str, *names: str) -> int:
    value = _first(config, *names)
    if value is None or value <= 0:
        raise ConfigShapeError(f"the model config gives no {what} ({' / '.join(names)})")
    return value


def _biases(config: object, kind: str) -> tuple[bool, bool]:
    """(attention layers have biases, FFN layers have biases)."""
    if kind in ("gpt2", "gpt_neox", "gptj", "bloom", "phi", "gpt_bigcode"):
        return True, True
    if kind == "opt":
        enabled = bool(getattr(config, "enable_bias", True))
        return enabled, enabled
    return bool(getattr(config, "attention_bias", False)), bool(getattr(config, "mlp_bias", False))


def _block_params(config: object, kind: str, d: int, f: int, gated: bool) -> tuple[int, int]:
    """(all parameters of one block, its Linear weights)."""
    heads = _required(config, "attention heads", "num_attention_heads", "n_head")
    kv = _first(config, "num_key_value_heads") or heads
    head_dim = _first(config, "head_dim") or d // heads
    q, k = heads * head_dim, kv * head_dim
    attention = d * q + 2 * d * k + q * d  # q, k, v, o
    ffn = (3 if gated else 2) * f * d
    attention_bias, ffn_bias = _biases(config, kind)
    biases = (q + 2 * k + d) * attention_bias + ((2 if gated else 1) * f + d) * ffn_bias
    if kind == "qwen2":  # q, k, v carry biases, o does not
        biases += q + 2 * k
    rms = hasattr(config, "rms_norm_eps")
    norms = 2 * (d if rms else 2 * d)
    return attention + ffn + biases + norms, attention + ffn


def _other_params(config: object, kind: str, d: int) -> int:
    """Parameters outside the blocks."""
    vocab = _required(config, "vocabulary size", "vocab_size")
    width = _first(config, "word_embed_proj_dim") or d  # OPT-350m embeds narrower than d
    embeddings = vocab * width
    head = 0 if getattr(config, "tie_word_embeddings", True) else vocab * width
    positions = 0
    if kind == "opt":
        positions = (_first(config, "max_position_embeddings") + _OPT_POSITION_OFFSET) * d
    elif kind == "gpt2":
        positions = _first(config, "n_positions", "max_position_embeddings") * d
    projections = 2 * width * d if width != d else 0
    rms = hasattr(config, "rms_norm_eps")
    final_norm = d if rms else 2 * d
    if kind == "opt" and not getattr(config, "do_layer_norm_before", True):
        final_norm = 0  # post-norm OPT (350m) has no final layer norm
    return embeddings + head + positions + projections + final_norm


def config_sizes(config: object) -> ConfigSizes:
    """The sizes of the model ``config`` describes (its text model for multimodal ones)."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    kind = getattr(config, "model_type", "")
    d = _required(config, "hidden size", "hidden_size", "n_embd", "d_model")
    f = _first(config, "intermediate_size", "ffn_dim", "n_inner") or 4 * d
    gated = kind not in _PLAIN_FFN and not hasattr(config, "ffn_dim")
    block, prunable = _block_params(config, kind, d, f, gated)
    return ConfigSizes(
        hidden=d,
        intermediate=f,
        heads=_required(config, "attention heads", "num_attention_heads", "n_head"),
        layers=_required(config, "layer count", "num_hidden_layers", "n_layer"),
        gated=gated,
        block_params=block,
        block_prunable=prunable,
        other_params=_other_params(config, kind, d),
        max_positions=_first(config, "max_position_embeddings", "n_positions"),
    )
