"""Every causal-LM architecture transformers ships, as a tiny random model built offline.

The list comes from transformers' own auto mapping, so new releases join the sweep by
themselves. A configuration is shrunk by setting the usual size attributes where the config has
them; norm weights are drawn from N(0, 1), since trained models have non-unit norms and unit
norms hide layout mistakes (a norm after the FFN is invisible when it is the identity scale).
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings

import torch

SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=256,
    max_position_embeddings=256,
    d_model=64,
    n_embd=64,
    n_layer=2,
    n_head=4,
    num_layers=2,
    ffn_dim=128,
    n_inner=128,
    dff=128,
    ffn_hidden_size=128,
    intermediate_dim=128,
    rotary_dim=8,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    shared_intermediate_size=32,
    moe_shared_expert_intermediate_size=32,
    dense_intermediate_size=128,
    num_experts_per_tok=2,
    moe_topk=2,
    n_group=1,
    topk_group=1,
    kv_lora_rank=32,
    q_lora_rank=32,
    o_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    index_topk=16,
    decoder_ffn_dim=128,
    encoder_ffn_dim=128,
    decoder_layers=2,
    encoder_layers=2,
    decoder_attention_heads=4,
    encoder_attention_heads=4,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
MAX_PARAMETERS = 4_000_000  # a shrunken config larger than this kept a size we did not reach
MAX_WIDTH = 1024  # nor one with a Linear wider than this (an FFN width we did not reach)


def causal_lm_types() -> list[str]:
    """Model types with an ``AutoModelForCausalLM`` class, as transformers lists them."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_config(model_type: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = CONFIG_MAPPING[model_type]()
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key, value in SMALL.items():
        if hasattr(config, key):
            with contextlib.suppress(Exception):
                setattr(config, key, value)
    return config


def random_norms_model(config, seed: int = 0) -> torch.nn.Module:
    """A random causal LM of ``config`` whose norm weights are drawn from N(0, 1)."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and "norm" in name.lower():
                param.normal_(0.0, 1.0)
    return model


def build(model_type: str, seed: int = 0) -> tuple[torch.nn.Module | None, str]:
    """A tiny random model of ``model_type`` that runs a forward pass, or ``None`` and why not."""
    import transformers as tf

    from sparsellm.models import is_linear

    quiet = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(quiet):
            warnings.simplefilter("ignore")
            config = tiny_config(model_type)
            with torch.device("meta"):
                skeleton = tf.AutoModelForCausalLM.from_config(config)
            size = sum(p.numel() for p in skeleton.parameters())
            if size > MAX_PARAMETERS:
                return None, f"does not shrink below {MAX_PARAMETERS:,} parameters ({size:,})"
            width = max(
                (max(m.weight.shape) for m in skeleton.modules() if is_linear(m)), default=0
            )
            if width > MAX_WIDTH:
                return None, f"does not shrink: a Linear {width} wide"
            model = random_norms_model(config, seed)
            with torch.no_grad():
                model(input_ids=torch.randint(3, 200, (2, 16)), use_cache=False)
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot build offline"
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
        return None, f"cannot build from a shrunken default config: {type(exc).__name__} {first}"
    return model, ""


def logits_error(model: torch.nn.Module, dense_logits: torch.Tensor, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
    return float((logits - dense_logits).norm() / dense_logits.norm())


def handed_on_and_real(model: torch.nn.Module, prune) -> tuple[torch.Tensor, torch.Tensor]:
    """What the engine fed block 1 while pruning, and what block 1 gets from a forward of the
    pruned model on the same first batch."""
    from sparsellm.models import get_adapter

    block1 = get_adapter(model).blocks()[1]
    seen: list[torch.Tensor] = []

    def record(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    handle = block1.register_forward_pre_hook(record, with_kwargs=True)
    try:
        ids = prune(model)
        during = list(seen)
        seen.clear()
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    real = seen[0]
    # Calls of block 1 with a calibration batch (the dense chain check ran before). SparseLLM's
    # default also runs the dense block 1 on the dense model's stream (``correction`` > 0):
    # the handed-on states are the call nearest to the real ones (wrong states differ from
    # both, so they still fail).
    calls = [t for t in during if t.shape == real.shape]
    return min(calls, key=lambda t: float((t.float() - real.float()).norm())), real


METHODS = ("magnitude", "wanda", "sparsegpt", "sparsellm")


def sweep_family(model_type: str, ids: torch.Tensor) -> dict:
    """Prune a tiny ``model_type`` with every method at 50% on calibration ``ids``.

    Returns ``{"skip": reason}`` when the model cannot be built offline, else per method either
    ``{"unsupported": message}`` or its figures: measured sparsity, logits error against the
    dense model, the paths SparseLLM took per block, and for SparseLLM the largest gap between
    what the engine handed block 1 and what the pruned model really feeds it.
    """
    from sparsellm import prune_model
    from sparsellm.errors import UserError

    dense, why = build(model_type)
    if dense is None:
        return {"skip": why}
    with torch.no_grad():
        dense_logits = dense(input_ids=ids, use_cache=False).logits.float()
    outcome: dict = {"class": type(dense).__name__}
    for method in METHODS:
        model = copy.deepcopy(dense)

        def prune(m, method=method):
            prune.report = prune_model(
                m, method=method, sparsity=0.5, calibration=ids, progress=False, batch_size=4
            )
            return ids[:4]

        try:
            if method == "sparsellm":
                engine, real = handed_on_and_real(model, prune)
                gap = float((engine.float() - real.float()).norm() / real.float().norm())
            else:
                prune(model)
                gap = None
        except UserError as exc:
            outcome[method] = {"unsupported": str(exc)}
            continue
        report = prune.report
        outcome[method] = {
            "sparsity": report.sparsity,
            "logits_error": logits_error(model, dense_logits, ids),
            "paths": sorted({b["path"] for b in report.blocks}),
            "handed_on_gap": gap,
            "fallbacks": sum(1 for b in report.blocks if b.get("fallback")),
        }
    return outcome
