"""Layers sharing a Gram matrix (q/k/v, gate/up) share its damped inverse factor."""

from __future__ import annotations

import torch
from conftest import VOCAB, tiny_model

import sparsellm.solvers.base as base
from sparsellm import prune_model
from sparsellm.masks import SparsityTarget
from sparsellm.solvers import LayerStatistics, obs_prune, sparsegpt


def test_one_factorisation_per_shared_gram(monkeypatch):
    calls = []
    factor = base.damped_cholesky
    monkeypatch.setattr(base, "damped_cholesky", lambda *a, **k: calls.append(1) or factor(*a, **k))
    model = tiny_model("llama")
    calibration = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(3))
    prune_model(model, method="sparsegpt", sparsity=0.5, calibration=calibration, progress=False)
    # Per block: q/k/v (one input), o, gate/up (one input), down: 4 Grams for 7 layers.
    assert len(calls) == 4 * model.config.num_hidden_layers


def test_shared_factor_gives_the_numbers_of_a_factor_of_its_own():
    torch.manual_seed(0)
    a = torch.randn(64, 16)
    stats = LayerStatistics(tokens=64, hessian=a.T @ a / 64)
    stats.hessian[3, :] = stats.hessian[:, 3] = 0.0  # a dead input
    target = SparsityTarget(0.5)
    weights = [torch.randn(8, 16) for _ in range(3)]
    shared = [sparsegpt(w, stats, target, blocksize=8) for w in weights]
    assert len(stats.memo) == 1  # computed by the first layer, reused by the others
    for w, result in zip(weights, shared, strict=True):
        alone = obs_prune(w, stats.hessian, target, blocksize=8)
        assert torch.equal(result.weight, alone.weight)
        assert (result.damping, result.damping_retries) == (alone.damping, alone.damping_retries)
