import pytest
import torch

from sparsellm.masks import (
    SparsityTarget,
    band_kth,
    is_valid_nm,
    kth_smallest,
    nm_mask,
    prune_counts,
    rowwise_mask,
    sample_positions,
    select_mask,
    smallest_mask,
)


def test_prune_counts_add_up_exactly():
    counts = prune_counts([7, 7, 7, 3], 0.5)
    assert int(counts.sum()) == round(0.5 * 24)
    assert all(abs(int(c) - 0.5 * s) <= 1 for c, s in zip(counts, [7, 7, 7, 3], strict=True))


def test_ties_are_broken_by_index_and_count_is_exact():
    scores = torch.ones(4, 4)  # every score ties, as on a quantisation grid
    mask = smallest_mask(scores, 6)
    assert int(mask.sum()) == 6
    assert mask.reshape(-1)[:6].all() and not mask.reshape(-1)[6:].any()


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7, 0.9])
def test_rowwise_mask_hits_layer_total(sparsity):
    scores = torch.randn(13, 37)
    mask = rowwise_mask(scores, sparsity)
    assert int(mask.sum()) == round(sparsity * scores.numel())
    assert (mask.sum(1) - sparsity * 37).abs().max() <= 1


def test_rowwise_mask_prunes_the_smallest_of_each_row():
    scores = torch.tensor([[3.0, 1.0, 2.0, 4.0], [0.5, 9.0, 0.1, 7.0]])
    mask = rowwise_mask(scores, 0.5)
    assert mask.tolist() == [[False, True, True, False], [True, False, True, False]]


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8), (3, 4)])
def test_nm_mask_keeps_n_of_every_m(n, m):
    scores = torch.randn(6, 32)
    mask = nm_mask(scores, n, m)
    kept = (~mask).reshape(6, 32 // m, m).sum(-1)
    assert (kept == n).all()
    assert is_valid_nm(torch.randn(6, 32).masked_fill(mask, 0), n, m)


def test_is_valid_nm_detects_a_violation():
    weight = torch.ones(2, 8)
    weight[:, 1::4] = 0
    assert not is_valid_nm(weight, 2, 4)
    weight[:, 2::4] = 0
    assert is_valid_nm(weight, 2, 4)


def test_select_mask_whole_matrix():
    scores = torch.arange(10.0).reshape(2, 5)
    assert select_mask(scores, SparsityTarget(0.3)).reshape(-1).tolist() == [True] * 3 + [False] * 7


@pytest.mark.parametrize(
    ("sparsity", "pattern", "message"),
    [
        (1.0, None, "outside [0, 1)"),
        (-0.1, None, "outside [0, 1)"),
        (None, "4:4", "0 < N < M"),
        (None, "0:4", "0 < N < M"),
        (None, "2-4", "N:M"),
    ],
)
def test_bad_targets_are_rejected(sparsity, pattern, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        SparsityTarget.parse(sparsity=sparsity, pattern=pattern)


def test_target_fraction():
    assert SparsityTarget.parse(pattern="2:4").fraction == 0.5
    assert SparsityTarget.parse(pattern="1:4").fraction == 0.75
    assert SparsityTarget.parse(sparsity=0.7).fraction == 0.7


@pytest.mark.parametrize("kind", ["normal", "ties", "misleading-sample", "nan"])
@pytest.mark.parametrize("share", [1e-5, 0.3, 0.7, 0.999])
def test_kth_smallest_equals_kthvalue(kind, share):
    """The bracketed search returns exactly what ``kthvalue`` does, also where the sample
    misrepresents the tensor (the fallback) or the tensor holds NaN."""
    g = torch.Generator().manual_seed(3)
    n = 300_007
    flat = torch.randn(n, generator=g)
    if kind == "ties":
        flat = torch.randint(0, 7, (n,), generator=g).float()
    elif kind == "misleading-sample":
        flat[sample_positions(n)] = 100.0  # every sampled entry is the largest value
        if share < 0.9:  # the k-th value lies below the sample's: the bracket misses
            assert band_kth(flat, count_of(share, n)) is None
    elif kind == "nan":
        flat[::1000] = float("nan")
    count = count_of(share, n)
    expected = flat.kthvalue(count).values
    torch.testing.assert_close(kth_smallest(flat, count), expected, rtol=0, atol=0, equal_nan=True)


def count_of(share: float, n: int) -> int:
    return max(1, int(share * n))


@pytest.mark.parametrize("share", [0.3, 0.5, 0.7, 0.9])
def test_band_brackets_a_matrix_whose_columns_differ_in_scale(share):
    """A flattened [1536, 576] weight with column scales over four decades (ADMM's iterates
    in the scaled space look like this): the sample must bracket the k-th value, not fall
    back to the whole tensor (a strided sample saw 32 of the 576 columns and missed)."""
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(1536, 576, generator=g).abs() * torch.logspace(-2, 2, 576)
    flat = weight.reshape(-1)
    count = count_of(share, flat.numel())
    found = band_kth(flat, count)
    assert found is not None
    assert found == flat.kthvalue(count).values
