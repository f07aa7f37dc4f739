"""The one damped-Cholesky rule every solver uses (sparsellm.linalg.damped_cholesky)."""

from __future__ import annotations

import pytest
import torch

from sparsellm.errors import NumericalError
from sparsellm.linalg import DAMPING_FLOOR, DAMPING_RETRIES, damped_cholesky
from sparsellm.solvers import NumericalError as SolversNumericalError


def spd(size: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(3 * size, size, generator=g, dtype=torch.float64)
    return a.T @ a


def test_no_retry_gives_exactly_the_direct_factor():
    H = spd()
    factor, fraction, retries = damped_cholesky(H, 0.01)
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    direct = torch.linalg.cholesky(H + 0.01 * H.diagonal().mean() * eye)
    assert retries == 0 and fraction == 0.01
    assert torch.equal(factor, direct)


def test_each_retry_raises_the_damping_tenfold():
    # Indefinite: eigenvalues 3, 3 and -3; λ·mean(diag) = λ must exceed 3 before it factors.
    H = torch.diag(torch.tensor([3.0, 3.0, -3.0], dtype=torch.float64))
    factor, fraction, retries = damped_cholesky(H, 0.01)
    assert retries == 3 and fraction == pytest.approx(10.0)  # 0.01 → 0.1 → 1 → 10
    torch.testing.assert_close(factor @ factor.T, H + 10.0 * torch.eye(3, dtype=H.dtype))


def test_zero_dampening_is_tried_as_asked_then_continues_from_the_floor():
    _, fraction, retries = damped_cholesky(spd(), 0.0)
    assert (fraction, retries) == (0.0, 0)
    singular = torch.zeros(3, 3, dtype=torch.float64)  # mean diagonal 0 is taken as 1
    _, fraction, retries = damped_cholesky(singular, 0.0)
    assert (fraction, retries) == (DAMPING_FLOOR, 1)


def test_an_inverse_without_a_factor_raises_the_damping_too(monkeypatch):
    from sparsellm.solvers import base

    real = torch.linalg.cholesky_ex
    calls = []

    def inverse_fails_once(matrix, upper=False):
        calls.append(upper)
        factor, info = real(matrix, upper=upper)
        if upper and calls.count(True) == 1:  # the first factorisation of an inverse
            return factor, torch.ones_like(info)
        return factor, info

    monkeypatch.setattr(base.torch.linalg, "cholesky_ex", inverse_fails_once)
    _, fraction, retries = base.inverse_hessian_cholesky(spd(), 0.01)
    assert (fraction, retries) == (pytest.approx(0.1), 1)


def test_a_matrix_that_never_factors_raises_naming_the_last_damping():
    # Negative mean diagonal: the guard takes it as 1, so λ ≤ 0.01·10⁶ never lifts -10⁶.
    H = -1e6 * torch.eye(4, dtype=torch.float64)
    last = 0.01 * 10**DAMPING_RETRIES
    with pytest.raises(NumericalError, match=f"damping {last:g}"):
        damped_cholesky(H, 0.01)
    with pytest.raises(SolversNumericalError):  # the same class, re-exported by the solvers
        damped_cholesky(H, 0.01, max_retries=1)


def test_non_finite_gram_raises_at_once():
    H = spd()
    H[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="NaN"):
        damped_cholesky(H, 0.01)


@pytest.mark.parametrize("width", [40, 300])  # one Gram block, and several (upper triangle)
def test_statistics_do_not_depend_on_the_order_of_the_batches(width):
    """Each batch's Gram is formed in float32 and summed in float64: any order of the batches
    (as ranks holding whole batches produce) gives the very same Hessian and squared norms,
    and they equal the float64 Gram of all rows rounded once to float32 up to its rounding."""
    from torch import nn

    from sparsellm.solvers import Statistic
    from sparsellm.statistics import StatisticsCollector

    torch.manual_seed(0)
    # magnitudes spread over 4 decades, as activation outliers are
    batches = [torch.randn(3, 50, width) * torch.logspace(-2, 2, width) for _ in range(6)]
    layer = nn.Linear(width, 8)

    def statistics(order):
        with StatisticsCollector({"layer": layer}, Statistic.HESSIAN) as collector:
            for i in order:
                collector.next_batch()
                layer(batches[i])
            return collector.results()["layer"]

    first = statistics(range(6))
    for order in ([5, 4, 3, 2, 1, 0], [2, 0, 5, 1, 3, 4]):
        again = statistics(order)
        assert torch.equal(first.hessian, again.hessian)
        assert torch.equal(first.sq_norms, again.sq_norms)
    rows = torch.cat(batches).reshape(-1, width).double()
    exact = (rows.T @ rows / rows.shape[0]).float()
    assert first.tokens == rows.shape[0]
    assert torch.allclose(first.hessian, exact, rtol=1e-5, atol=1e-6 * exact.abs().max())


@pytest.mark.parametrize("kind", ["HESSIAN", "NORMS"])
def test_statistics_do_not_depend_on_the_batch_size(kind):
    """Windows are added one at a time: the same windows batched 1, 4 or 18 at a time give
    the very same statistics (so --offload disk's smaller batches prune like memory's)."""
    from torch import nn

    from sparsellm.solvers import Statistic
    from sparsellm.statistics import StatisticsCollector

    torch.manual_seed(0)
    windows = torch.randn(18, 40, 300) * torch.logspace(-2, 2, 300)
    layer = nn.Linear(300, 8)

    def statistics(batch):
        with StatisticsCollector({"layer": layer}, Statistic[kind]) as collector:
            for part in windows.split(batch):
                collector.next_batch()
                layer(part)
            return collector.results()["layer"]

    whole = statistics(18)
    for batch in (1, 4, 7):
        again = statistics(batch)
        assert again.tokens == whole.tokens == 18 * 40
        assert torch.equal(again.sq_norms, whole.sq_norms)
        if kind == "HESSIAN":
            assert torch.equal(again.hessian, whole.hessian)


def test_factorisations_do_not_depend_on_the_thread_count():
    """LAPACK rounds differently on 1 and 2 threads; the solvers' factorisations run on one,
    so a process using every core and torchrun ranks with one thread each get the same bits."""
    from sparsellm.solvers.admm import eigenbasis
    from sparsellm.solvers.base import inverse_hessian_cholesky
    from sparsellm.solvers.sparsellm.auxiliaries import p_system
    from sparsellm.solvers.sparsellm.weights import damped_inverse

    torch.manual_seed(0)
    rows = torch.randn(2000, 600)
    hessian = rows.T @ rows / 2000
    down = torch.randn(600, 900)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(
                [
                    inverse_hessian_cholesky(hessian, 0.01)[0],
                    damped_inverse(hessian, 0.01)[0],
                    p_system(down, 0.5),
                    *eigenbasis(hessian, 0.01),
                ]
            )
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)


def test_a_vanishing_dampening_is_raised_to_the_floor_on_retry():
    """A positive dampening far below the floor (1e-280) must not stay there: tenfold steps
    from it never reach a damping that makes a singular Gram factor."""
    x = torch.randn(8, 3, dtype=torch.float64)
    singular = x @ x.T  # rank 3 of 8
    result = damped_cholesky(singular, 1e-280)
    assert result.retries >= 1 and result.fraction >= DAMPING_FLOOR
