"""finetune(): sparse fine-tuning of a pruned tiny model keeps its zeros and learns."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import small_llama

from sparsellm.finetune import FinetuneReport, finetune, lr_factor, resolve_mixed_precision
from sparsellm.optim import sparsifiable_parameters


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine the
    OpenMP workers spin-wait: one thread is many times faster here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pruned_tiny_llama(seed: int = 0) -> torch.nn.Module:
    model = small_llama(seed)
    with torch.no_grad():
        for _, p in sparsifiable_parameters(model):
            order = torch.sort(p.abs().reshape(-1), stable=True).indices
            p.view(-1)[order[: p.numel() // 2]] = 0
    return model


def repetitive_windows() -> torch.Tensor:
    """A period-8 token pattern cut into 8 windows of 16 tokens: trivially learnable."""
    stream = torch.tensor([3, 17, 42, 5, 99, 64, 7, 120]).repeat(16)
    return stream.reshape(8, 16)


def test_lr_factor_warmup_then_cosine_and_linear():
    kw = {"steps": 10, "warmup_steps": 2}
    assert [lr_factor(s, **kw) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, **kw) == 1.0
    assert lr_factor(6, **kw) == pytest.approx(0.5)  # halfway through 8 decay steps
    assert lr_factor(9, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert lr_factor(6, schedule="linear", **kw) == pytest.approx(0.5)
    assert lr_factor(9, schedule="constant", **kw) == 1.0
    assert all(lr_factor(s, **kw) > 0 for s in range(10))
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(5, schedule="step", **kw)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_finetune_learns_and_keeps_sparsity_exact(precision):
    model = pruned_tiny_llama()
    selected = sparsifiable_parameters(model)
    zeros = {name: (p == 0).clone() for name, p in selected}
    embed_before = model.model.embed_tokens.weight.detach().clone()
    windows = repetitive_windows()

    report = finetune(
        model,
        windows,
        steps=20,
        lr=1e-2,
        batch_size=4,
        eval_windows=windows,
        weight_decay=0.1,
        warmup_steps=2,
        seed=0,
        progress=False,
        mixed_precision=precision,
    )

    assert isinstance(report, FinetuneReport)
    assert report.mixed_precision == precision
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    assert report.sparsity_before == 0.5
    assert report.sparsity_after == 0.5
    for name, p in selected:
        assert torch.equal(p.detach() == 0, zeros[name]), name
    # The pattern is learnable: perplexity on it collapses from ~vocab size.
    assert report.perplexity_before > 100
    assert report.perplexity_after < 0.2 * report.perplexity_before
    assert len(report.losses) == 20
    assert report.train_loss_last < report.train_loss_first - 1.0
    assert not torch.equal(model.model.embed_tokens.weight, embed_before)  # all params train
    assert not model.training
    assert report.sparsified_tensors == 14
    assert report.tokens_seen == 20 * 4 * 16
    data = report.to_dict()
    assert json.loads(json.dumps(data))["steps"] == 20


def test_finetune_is_seeded_and_validates():
    windows = repetitive_windows()
    runs = [
        finetune(
            pruned_tiny_llama(),
            windows,
            steps=3,
            lr=1e-3,
            batch_size=3,
            progress=False,
            mixed_precision="no",
        )
        for _ in range(2)
    ]
    assert runs[0].losses == runs[1].losses
    assert runs[0].perplexity_before is None and runs[0].perplexity_after is None
    assert runs[0].warmup_steps == 0  # 10% of 3 steps
    with pytest.raises(ValueError, match="steps"):
        finetune(pruned_tiny_llama(), windows, steps=0, progress=False)
    with pytest.raises(ValueError, match="train_windows"):
        finetune(pruned_tiny_llama(), windows[0], steps=1, progress=False)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"max_grad_norm": -1.0}, "max_grad_norm must be a positive number, got -1.0"),
        ({"weight_decay": -1.0}, "weight_decay must be a number >= 0, got -1.0"),
        ({"eval_batch_size": 0}, "eval_batch_size must be >= 1"),
        ({"target_sparsity": 0.5, "schedule_steps": 0}, "schedule_steps must be >= 1"),
        ({"device": "tpu"}, "device 'tpu' is not a device name"),
        ({"windows": "float"}, "train_windows must hold integer token ids, not torch.float32"),
        ({"windows": "past"}, "'train_windows': token id 1120"),
        ({"eval": "past"}, "'eval_windows': token id 1120"),
    ],
)
def test_finetune_refuses_what_it_cannot_train_on(options, named):
    """These used to run (a negative clipping norm flips every gradient: the steps climbed the
    loss) or fail far from the cause (an IndexError in the embedding, torch's device list)."""
    model = pruned_tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    windows = repetitive_windows()
    options = dict(options)
    kind = options.pop("windows", None)
    if kind is not None:
        windows = windows.float() if kind == "float" else windows + 1000
    if options.pop("eval", None):
        options["eval_windows"] = repetitive_windows() + 1000
    with pytest.raises(ValueError, match=re.escape(named)):
        finetune(model, windows, steps=2, progress=False, **options)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match="model must be a loaded causal LM"):
        finetune("gpt2", repetitive_windows(), steps=2, progress=False)


def test_mixed_precision_resolution():
    cpu = torch.device("cpu")
    model = small_llama(0)
    assert resolve_mixed_precision("no", model, cpu) == "no"
    assert resolve_mixed_precision("bf16", model, cpu) == "bf16"
    # auto follows the CPU's bf16 support for a float32 model ...
    fast = bool(
        torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )
    assert resolve_mixed_precision("auto", model, cpu) == ("bf16" if fast else "no")
    # ... and never autocasts weights that are already half precision.
    assert resolve_mixed_precision("auto", model.to(torch.bfloat16), cpu) == "no"
    with pytest.raises(ValueError, match="fp8"):
        resolve_mixed_precision("fp8", model, cpu)


def test_finetune_sparsifies_a_dense_model_to_the_exact_target():
    model = small_llama(0)
    windows = repetitive_windows()
    report = finetune(
        model,
        windows,
        steps=12,
        lr=1e-2,
        batch_size=4,
        eval_windows=windows,
        warmup_steps=2,
        target_sparsity=0.5,
        progress=False,
        mixed_precision="no",
    )
    assert report.sparsity_before < 0.01
    for name, p in sparsifiable_parameters(model):
        assert int((p == 0).sum()) == round(0.5 * p.numel()), name
    assert report.sparsity_after == pytest.approx(0.5, abs=1e-6)
    assert report.perplexity_after < 0.5 * report.perplexity_before
