"""The generic adapter: architectures without a dedicated adapter prune layer by layer."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from conftest import VOCAB
from test_sparsellm_engine import (
    assert_handed_on_states_are_a_forward,
    block_output,
    relative_error,
)

from sparsellm import prune_model
from sparsellm.evaluation import windows_perplexity
from sparsellm.models import get_adapter, is_linear, linear_weight


def generic_config(kind: str):
    import transformers as tf

    small = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    if kind == "gpt_neox":  # fused query_key_value
        return tf.GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_hidden_layers=2,
            **small,
        )
    if kind == "phi":  # fc1 / fc2, parallel attention and MLP
        return tf.PhiConfig(
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_hidden_layers=2,
            **small,
        )
    if kind == "phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_hidden_layers=2,
            pad_token_id=0,
            **small,
        )
    if kind == "falcon":
        return tf.FalconConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, **small)
    if kind == "gptj":
        return tf.GPTJConfig(n_embd=64, n_head=4, n_layer=2, rotary_dim=8, **small)
    if kind == "bloom":
        return tf.BloomConfig(hidden_size=64, n_head=4, n_layer=2, **small)
    raise ValueError(kind)


KINDS = ("gpt_neox", "phi", "phi3", "falcon", "gptj", "bloom")


def generic_model(kind: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(generic_config(kind)).eval()


@pytest.mark.parametrize("kind", KINDS)
def test_generic_models_prune_every_block_linear_exactly(kind, calibration_ids):
    model = generic_model(kind)
    adapter = get_adapter(model)
    assert adapter.family == "generic"
    blocks = adapter.blocks()
    linears = sum(1 for b in blocks for m in b.modules() if is_linear(m))
    windows = calibration_ids[:4]
    dense = windows_perplexity(model, windows, progress=False)

    report = prune_model(model, method="sparsegpt", sparsity=0.5, calibration=calibration_ids)

    assert len(report.layers) == linears > 0
    for block in blocks:
        for name, module in adapter.prunable(block).items():
            weight = linear_weight(module)
            assert int((weight == 0).sum()) == round(0.5 * weight.numel()), name
    assert all(0 <= layer.relative_error < 0.5 for layer in report.layers)
    pruned = windows_perplexity(model, windows, progress=False)
    streamed = windows_perplexity(model, windows, progress=False, streamed=True)
    assert math.isfinite(pruned) and pruned != dense
    assert streamed == pytest.approx(pruned, rel=1e-5)


JOINT_KINDS = ("gpt_neox", "phi", "phi3", "falcon", "gptj", "bloom")


def pruned_pair(kind, calibration_ids, sparsity=0.6):
    models = [generic_model(kind), generic_model(kind)]
    # SparseLLM with SparseGPT for the layers outside the FFN, so that a layer-wise fallback
    # must equal the sparsegpt run bit for bit.
    options = ({"layer_solver": "sparsegpt"}, {})
    reports = [
        prune_model(
            m,
            method=method,
            sparsity=sparsity,
            calibration=calibration_ids,
            progress=False,
            **extra,
        )  # fmt: skip
        for m, method, extra in zip(models, ("sparsellm", "sparsegpt"), options, strict=True)
    ]
    return models, reports


def assert_same_weights(a, b):
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(x, y), name


def test_sparsellm_where_the_ffn_is_unknown_is_sparsegpt_and_says_so(monkeypatch, calibration_ids):
    from sparsellm.models import GenericAdapter

    monkeypatch.setattr(GenericAdapter, "feed_forward_candidates", lambda self, block: [])
    models, reports = pruned_pair("gpt_neox", calibration_ids)
    assert [b["path"] for b in reports[0].blocks] == ["layerwise"] * 2
    assert "no two-layer feed-forward" in reports[0].blocks[0]["reason"]
    assert_same_weights(*models)


def test_a_wrongly_inferred_wiring_is_caught_before_use(monkeypatch, calibration_ids):
    from sparsellm.models import GenericAdapter

    real = GenericAdapter.feed_forward_candidates

    def wrong_activation(self, block):  # the model uses GELU
        return [dataclasses.replace(c, activation=torch.relu) for c in real(self, block)]

    monkeypatch.setattr(GenericAdapter, "feed_forward_candidates", wrong_activation)
    models, reports = pruned_pair("gpt_neox", calibration_ids)
    assert [b["path"] for b in reports[0].blocks] == ["layerwise"] * 2  # both blocks
    assert "no feed-forward wiring reproduces" in reports[0].blocks[0]["reason"]
    assert_same_weights(*models)


@pytest.mark.parametrize("kind", JOINT_KINDS)
def test_recognised_mlps_get_the_joint_solve(kind, calibration_ids):
    dense = generic_model(kind)
    reference = block_output(dense, calibration_ids, 0)
    errors, notes = {}, {}  # notes: paths per block
    for method in ("sparsegpt", "sparsellm"):
        model = copy.deepcopy(dense)
        report = prune_model(
            model, method=method, sparsity=0.7, calibration=calibration_ids, progress=False
        )
        errors[method] = relative_error(block_output(model, calibration_ids, 0), reference)
        notes[method] = [b["path"] for b in report.blocks]
        for block in get_adapter(model).blocks():
            for name, module in get_adapter(model).prunable(block).items():
                zeros = int((linear_weight(module) == 0).sum())
                # a fused [gate; up] layer is two exact halves: within one of the whole's count
                assert abs(zeros - round(0.7 * linear_weight(module).numel())) <= 1, name
    assert notes["sparsellm"] == ["residual"] * 2  # joint solve and shortcut in both blocks
    assert errors["sparsellm"] < 0.9 * errors["sparsegpt"], errors


@pytest.mark.parametrize("kind", JOINT_KINDS)
def test_recognised_mlps_hand_on_what_the_pruned_block_computes(kind, calibration_ids):
    assert_handed_on_states_are_a_forward(generic_model(kind), calibration_ids)
