import pytest
import torch

from sparsellm.masks import SparsityTarget, is_valid_nm
from sparsellm.solvers import (
    LayerStatistics,
    NumericalError,
    inverse_hessian_cholesky,
    magnitude,
    obs_prune,
    relative_output_error,
    sparsegpt,
    wanda,
)

SOLVERS = {"magnitude": magnitude, "wanda": wanda, "sparsegpt": sparsegpt}


def correlated_inputs(tokens=2048, features=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=g) / features**0.5
    scales = torch.logspace(-1, 1, features)
    return (torch.randn(tokens, features, generator=g) * scales) @ mixing + 0.3


def stats_of(x):
    return LayerStatistics(tokens=x.shape[0], hessian=x.T @ x / x.shape[0], sq_norms=(x * x).sum(0))


@pytest.mark.parametrize(
    "target", [SparsityTarget(0.5), SparsityTarget(0.7), SparsityTarget(n=2, m=4)]
)
def test_sparsegpt_beats_magnitude_and_wanda_with_exact_sparsity(target):
    x = correlated_inputs()
    stats = stats_of(x)
    weight = torch.randn(48, 64)
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        new = SOLVERS[method](weight, stats, target).weight
        assert int((new == 0).sum()) == round(target.fraction * new.numel())
        if target.is_nm:
            assert is_valid_nm(new, target.n, target.m)
        errors[method] = relative_output_error(weight, new, stats.hessian)
    assert errors["sparsegpt"] < 0.9 * errors["magnitude"]
    assert errors["sparsegpt"] < errors["wanda"]


def test_obs_single_weight_removal_is_the_exact_least_squares_update():
    # Removing one weight, OBS is exact: the rest equals the least-squares refit.
    x = correlated_inputs(tokens=512, features=8, seed=1).double()
    h = (x.T @ x / x.shape[0]).float()
    weight = torch.tensor([[0.001, 1.0, -2.0, 0.5, 1.5, -1.0, 0.7, 2.0]])
    new = obs_prune(weight, h, SparsityTarget(1 / 8), dampening=0.0).weight
    hd = h.double()
    expected = weight.double().clone()
    expected[0, 1:] += torch.linalg.solve(hd[1:, 1:], hd[1:, 0]) * weight[0, 0].double()
    expected[0, 0] = 0
    torch.testing.assert_close(new.double(), expected, rtol=1e-4, atol=1e-5)


def test_zero_sparsity_leaves_weights_unchanged():
    x = correlated_inputs()
    weight = torch.randn(16, 64)
    new = sparsegpt(weight, stats_of(x), SparsityTarget(0.0)).weight
    assert torch.equal(new, weight)


def test_dead_inputs_are_zeroed_and_solve_stays_finite():
    x = correlated_inputs()
    x[:, 3] = 0  # an input feature that never fires
    new = sparsegpt(torch.randn(8, 64), stats_of(x), SparsityTarget(0.5))
    assert torch.isfinite(new.weight).all()
    assert (new.weight[:, 3] == 0).all()


def test_singular_hessian_gets_more_damping_and_says_so():
    h = torch.diag(torch.tensor([1.0, 0, 0, 0, 0, 0])) - 1e-3 * torch.eye(6)
    # indefinite: the requested damping (1e-6 of the mean diagonal) cannot fix it
    upper, damping, retries = inverse_hessian_cholesky(h, 1e-6)
    assert retries > 0 and damping > 1e-6
    assert torch.isfinite(upper).all()


def test_hopeless_hessian_raises():
    with pytest.raises(NumericalError):
        inverse_hessian_cholesky(-torch.eye(4), 0.01, max_retries=1)
