"""Perplexity: the whole-model and the block-streamed paths agree with a direct computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, VOCAB, tiny_model

from sparsellm.evaluation import on_device, windows_nll, windows_perplexity
from sparsellm.models import get_adapter


def random_windows(n: int = 5, seqlen: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def reference_perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """One window at a time, straight from the logits."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in windows:
            logits = model(input_ids=row[None]).logits[0, :-1]
            total += float(F.cross_entropy(logits, row[1:], reduction="sum"))
            count += row.numel() - 1
    return math.exp(total / count)


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_and_whole_model_perplexity_equal_the_reference(family):
    model = tiny_model(family)
    windows = random_windows()
    reference = reference_perplexity(model, windows)
    # batch 2 over 5 windows: the last batch is short on both paths
    whole = windows_perplexity(model, windows, batch_size=2, progress=False, streamed=False)
    streamed = windows_perplexity(model, windows, batch_size=2, progress=False, streamed=True)
    assert whole == pytest.approx(reference, rel=1e-5)
    assert streamed == pytest.approx(reference, rel=1e-5)


def test_streamed_evaluation_leaves_the_model_as_it_was():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    blocks = adapter.blocks()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    nll, count = windows_nll(model, random_windows(3), batch_size=2, progress=False, streamed=True)
    assert count == 3 * 23 and nll > 0
    assert adapter.blocks() is blocks  # the stand-ins are gone
    assert model.training  # mode restored
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert on_device(model, torch.device("cpu"))


@pytest.mark.parametrize("resident", [True, False])
def test_auto_mode_streams_exactly_when_the_model_is_not_on_the_device(monkeypatch, resident):
    import sparsellm.evaluation as evaluation

    model = tiny_model("llama")
    assert on_device(model, torch.device("cpu"))
    assert not on_device(model, torch.device("meta"))
    used = []
    for name in ("_streamed_logits", "_whole_model_logits"):
        real = getattr(evaluation, name)
        monkeypatch.setattr(
            evaluation, name, lambda *a, _real=real, _name=name: used.append(_name) or _real(*a)
        )
    monkeypatch.setattr(evaluation, "on_device", lambda m, d: resident)
    windows_perplexity(model, random_windows(2), batch_size=2, progress=False)
    assert used == (["_whole_model_logits"] if resident else ["_streamed_logits"])
    assert on_device(model, torch.device("cpu"))  # streaming never moves the model


def test_an_error_mid_stream_puts_the_real_blocks_back(monkeypatch):
    import sparsellm.evaluation as evaluation

    model = tiny_model("llama")
    blocks = get_adapter(model).blocks()

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(evaluation.F, "cross_entropy", fail)
    with pytest.raises(RuntimeError, match="boom"):
        windows_nll(model, random_windows(2), batch_size=2, progress=False, streamed=True)
    assert get_adapter(model).blocks() is blocks


def test_summed_nll_streams_positions_and_matches_the_plain_loss(monkeypatch):
    from sparsellm import evaluation

    torch.manual_seed(0)
    logits = torch.randn(3, 40, 1000) * 4
    ids = torch.randint(0, 1000, (3, 40))
    reference = F.cross_entropy(
        logits[:, :-1].reshape(-1, 1000).double(), ids[:, 1:].reshape(-1), reduction="sum"
    )
    monkeypatch.setattr(evaluation, "LOSS_CHUNK_BYTES", 7 * 1000 * 4)  # 7 positions a chunk
    chunked = evaluation.summed_nll(logits, ids)
    assert chunked.dtype == torch.float64
    assert abs(float(chunked) - float(reference)) <= 1e-6 * float(reference)
    one_by_one = sum(
        float(evaluation.summed_nll(logits[i : i + 1], ids[i : i + 1])) for i in range(3)
    )
    assert abs(one_by_one - float(chunked)) <= 1e-12 * float(chunked)  # batching does not matter
