"""SparseLinear and the sparse inference path (issue 14, items 2 and 3).

Kernel tests need numba (``pip install 'sparsellm[infer]'``) and are skipped without it; the
fallback tests (dense arithmetic on tiles decoded with torch) run everywhere.
"""

from __future__ import annotations

import copy
import json
import re
import warnings

import numpy as np
import pytest
import torch
from conftest import run_cli, tiny_model

from sparsellm import prune_model
from sparsellm.sparse import (
    SparseLinear,
    fuse_shared_inputs,
    kernel_token_limit,
    kernel_unavailable,
    to_sparse_inference,
    weight_bytes_per_token,
)
from sparsellm.sparse import linear as sparse_linear
from sparsellm.sparse.bench import greedy

needs_kernel = pytest.mark.skipif(
    kernel_unavailable() is not None,
    reason=f"sparse kernel unavailable ({kernel_unavailable()}): pip install 'sparsellm[infer]'",
)


def sparse_weight(rows: int, cols: int, sparsity: str, seed: int = 0) -> torch.Tensor:
    """A float32 weight with the sparsity (fraction or ``2:4``), a row of zeros and, for
    unstructured ones, a fully dense row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    if sparsity == "2:4":
        groups = w.view(rows, -1, 4)
        keep = groups.abs().topk(2, dim=-1).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
        w = torch.where(mask, groups, 0.0).view(rows, cols)
        w[1, :8] = 0  # groups holding fewer than two non-zeros
    else:
        w = torch.where(torch.rand(rows, cols, generator=g) >= float(sparsity), w, 0.0)
        w[2] = torch.randn(cols, generator=g)
    w[0] = 0
    return w


def assert_matches(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rel: float) -> None:
    """``y`` equals ``x @ w.T`` within ``rel`` of each output's sum of absolute terms (the
    scale of a dot product's rounding, whatever the cancellation)."""
    x, w = x.double(), w.double()
    reference = x @ w.T
    scale = x.abs() @ w.abs().T + 1e-30
    error = ((y.double() - reference).abs() / scale).max().item()
    assert error <= rel, f"relative error {error:.2e} > {rel:.0e}"


def packed_by_hand(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sparse-bitmask parts of ``w``, made with numpy (independent of the module)."""
    mask = (w != 0).numpy()
    bitmask = torch.from_numpy(np.packbits(mask, axis=1, bitorder="little"))
    counts = mask.sum(1)
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64))
    return bitmask, w[w != 0], offsets


# ----------------------------------------------------------------------------- the kernels


@pytest.fixture(params=["serial", "parallel"])
def threads(request, monkeypatch):
    """One token on the calling thread (small layers), or on two threads' row ranges."""
    if request.param == "parallel":
        monkeypatch.setattr(sparse_linear, "SERIAL_BYTES", 0)
        previous = torch.get_num_threads()
        torch.set_num_threads(2)
        yield 2
        torch.set_num_threads(previous)
    else:
        yield 1


CASES = [
    ("0.5", "bitmask"),
    ("0.7", "bitmask"),
    ("0.9", "bitmask"),
    ("0.7", "u8"),
    ("0.9", "u8"),
    ("0.7", "u16"),
    ("0.9", "u16"),
]


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 8])
@pytest.mark.parametrize(("sparsity", "index"), CASES)
def test_unstructured_matches_dense_float32(sparsity, index, tokens, threads):
    w = sparse_weight(37, 517, sparsity)  # 517 columns: not a multiple of 8 (nor of 256)
    bias = torch.randn(37)
    module = SparseLinear.from_dense(w, bias, index=index)
    assert module.index == index
    x = torch.randn(tokens, 517)
    assert_matches(module(x) - bias, x, w, 1e-5)


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 8])
def test_nm24_matches_dense_float32(tokens, threads):
    w = sparse_weight(29, 516, "2:4")  # 516 / 2 values: the last position byte half used
    module = SparseLinear.from_dense(w)
    assert module.index == "2:4"
    x = torch.randn(3, tokens, 516)
    assert_matches(module(x).reshape(-1, 29), x.reshape(-1, 516), w, 1e-5)


@needs_kernel
@pytest.mark.parametrize(
    ("sparsity", "index"), [("0.7", "bitmask"), ("0.9", "u16"), ("2:4", "auto")]
)
@pytest.mark.parametrize("tokens", [1, 8])
def test_bfloat16_values_match_a_float32_reference(sparsity, index, tokens, threads):
    w = sparse_weight(33, 520, sparsity).bfloat16()
    module = SparseLinear.from_dense(w, index=index)
    assert module.values.dtype == torch.bfloat16
    x = torch.randn(tokens, 520).bfloat16()
    y = module(x)
    assert y.dtype == torch.bfloat16
    reference = x.float() @ w.float().T
    torch.testing.assert_close(y.float(), reference, rtol=1.6e-2, atol=1e-2 * reference.abs().max())


@needs_kernel
@pytest.mark.parametrize(
    ("sparsity", "index"), [("0.7", "bitmask"), ("0.7", "u8"), ("2:4", "auto")]
)
def test_many_tokens_take_the_tile_path_and_match(sparsity, index):
    w = sparse_weight(40, 264, sparsity)
    module = SparseLinear.from_dense(w, index=index)
    tokens = kernel_token_limit(module.kind, module.density) + 5
    x = torch.randn(tokens, 264)
    assert_matches(module(x), x, w, 1e-5)


@needs_kernel
def test_pruned_layers_of_a_model_match_their_dense_layers():
    model = tiny_model("llama")
    prune_model(model, method="magnitude", sparsity=0.7, progress=False)
    linear = model.model.layers[0].mlp.down_proj
    module = SparseLinear.from_dense(linear)
    assert module.density == pytest.approx(0.3, abs=0.02)
    x = torch.randn(5, linear.in_features)
    for tokens in (1, 5):
        assert_matches(module(x[:tokens]), x[:tokens], linear.weight.detach(), 1e-5)


# ----------------------------------------------------------------------------- constructors


@pytest.mark.parametrize("index", ["bitmask", "u8", "u16"])
def test_from_packed_builds_what_from_dense_builds(index):
    w = sparse_weight(21, 300, "0.7")
    dense_built = SparseLinear.from_dense(w, index=index)
    packed_built = SparseLinear.from_packed(
        *packed_by_hand(w), torch.tensor([21, 300]), index=index
    )
    assert packed_built.index == index
    for name, buffer in dense_built.named_buffers():
        assert torch.equal(buffer, getattr(packed_built, name)), name
    assert torch.equal(packed_built.to_dense(), w)


def test_from_nm_reads_packed_positions():
    w = sparse_weight(6, 48, "2:4")
    groups = w.view(6, -1, 4)
    order = (groups != 0).long() * 4 + torch.arange(3, -1, -1)
    place = order.topk(2, dim=-1).indices.sort(-1).values  # non-zeros first, then low places
    values = groups.gather(-1, place).reshape(6, 24)
    slots = place.reshape(6, 6, 4).to(torch.uint8)
    positions = (slots << torch.arange(0, 8, 2, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
    module = SparseLinear.from_nm(values, positions, (2, 4), (6, 48))
    assert module.index == "2:4"
    assert torch.equal(module.to_dense(), w)


@pytest.mark.parametrize("index", ["bitmask", "u8"])
def test_other_nm_patterns_become_an_unstructured_layout(index):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 32, generator=g)
    groups = w.view(5, 4, 8)
    place = groups.abs().topk(4, dim=-1).indices.sort(-1).values  # 4:8, 4-bit positions
    w = torch.zeros_like(groups).scatter_(-1, place, groups.gather(-1, place)).view(5, 32)
    slots = place.reshape(5, 8, 2).to(torch.uint8)
    indices = slots[..., 0] | (slots[..., 1] << 4)
    values = groups.gather(-1, place).reshape(5, 16)
    module = SparseLinear.from_nm(values, indices, (4, 8), (5, 32), index=index)
    assert module.index == index
    assert torch.equal(module.to_dense(), w)


def test_the_checkpoint_parts_load_when_the_format_module_is_there():
    packing = pytest.importorskip("sparsellm.compressed.packing")
    names = ("encode_bitmask", "encode_nm", "survey")
    if not all(hasattr(packing, name) for name in names):
        pytest.skip("sparsellm.compressed.packing has no encode_bitmask / encode_nm / survey")
    w = sparse_weight(9, 60, "0.7")
    w[3, 5] = -0.0  # the format keeps -0.0 as a value
    parts = packing.encode_bitmask(w, packing.survey(w).row_counts)
    module = SparseLinear.from_packed(
        parts["bitmask"], parts["compressed"], parts["row_offsets"], parts["shape"]
    )
    assert torch.equal(module.to_dense(), w)
    w24 = sparse_weight(9, 64, "2:4")
    parts = packing.encode_nm(w24, 2, 4)
    module = SparseLinear.from_nm(
        parts["nm_values"], parts["nm_indices"], parts["nm_pattern"], parts["shape"]
    )
    assert torch.equal(module.to_dense(), w24)


def test_malformed_parts_are_refused():
    w = sparse_weight(8, 40, "0.7")
    bitmask, values, offsets = packed_by_hand(w)
    with pytest.raises(ValueError, match="row_offsets"):
        SparseLinear.from_packed(bitmask, values, offsets + 1, (8, 40))
    with pytest.raises(ValueError, match="bitmask"):
        SparseLinear.from_packed(bitmask[:, :-1], values, offsets, (8, 40))
    with pytest.raises(ValueError, match="row_offsets"):
        SparseLinear.from_packed(bitmask, values[:-1], offsets, (8, 40))


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_inputs_nn_linear_refuses_are_refused(pattern):
    """A [2, 32] input to a 64-input layer has one token's worth of numbers: the decode path
    took it for one token and returned [1, out]; other widths failed in a reshape, and
    integer inputs were multiplied and rounded."""
    w = sparse_weight(16, 64, "2:4" if pattern == "2:4" else "0.7")
    module = SparseLinear.from_dense(w, pattern=pattern)
    with torch.no_grad():
        for x in (torch.randn(2, 32), torch.randn(3, 63), torch.ones(3, 64, dtype=torch.long)):
            with pytest.raises(ValueError, match="this layer takes floating-point inputs of 64"):
                module(x)
        one = torch.randn(1, 1, 64)
        torch.testing.assert_close(module(one), one @ w.T, rtol=1e-5, atol=1e-5)


def test_a_module_cast_to_bfloat16_keeps_working():
    w = sparse_weight(12, 64, "0.7")
    module = SparseLinear.from_dense(w).to(torch.bfloat16)
    assert module.values.dtype == torch.bfloat16
    x = torch.randn(2, 64)
    torch.testing.assert_close(module(x), x @ w.bfloat16().float().T, rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------- the fallback


@pytest.fixture
def kernel_off(monkeypatch):
    """The kernel disabled, the once-a-process warning not given yet."""
    monkeypatch.setenv(sparse_linear.KERNEL_ENV, "0")
    monkeypatch.setitem(sparse_linear._state, "warned", False)


def test_fallback_matches_dense_and_warns_once(kernel_off):
    w = sparse_weight(20, 100, "0.7")
    modules = [SparseLinear.from_dense(w), SparseLinear.from_dense(sparse_weight(20, 100, "2:4"))]
    x = torch.randn(3, 100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_matches(modules[0](x[:1]), x[:1], w, 1e-5)
        assert_matches(modules[0](x), x, w, 1e-5)
        modules[1](x)
    messages = [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "pip install 'sparsellm[infer]'" in messages[0]
    assert "SPARSELLM_SPARSE_KERNEL=0" in messages[0]


def test_fallback_without_numba(monkeypatch):
    monkeypatch.setitem(sparse_linear._state, "kernels", ImportError("No module named 'numba'"))
    monkeypatch.setitem(sparse_linear._state, "warned", False)
    monkeypatch.delenv(sparse_linear.KERNEL_ENV, raising=False)
    assert "numba" in kernel_unavailable()
    w = sparse_weight(10, 50, "0.9")
    x = torch.randn(1, 50)
    with pytest.warns(RuntimeWarning, match="numba"):
        assert_matches(SparseLinear.from_dense(w)(x), x, w, 1e-5)


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize(("family", "groups"), [("llama", 4), ("gpt2", 0), ("opt", 2)])
def test_sparse_model_generates_the_same_tokens(family, groups):
    model = tiny_model(family)
    prune_model(model, method="magnitude", sparsity=0.7, progress=False)
    sparse = copy.deepcopy(model)
    swap = to_sparse_inference(sparse)
    assert swap.swapped and not swap.kept_dense
    assert swap.fused_groups == groups  # q/k/v and gate/up per block; GPT-2's are fused already
    assert swap.sparse_bytes < 0.45 * swap.dense_bytes
    assert sum(isinstance(m, SparseLinear) for m in sparse.modules()) == len(swap.swapped)
    prompt = torch.randint(16, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    dense_tokens, _ = greedy(model, prompt, 16)
    sparse_tokens, _ = greedy(sparse, prompt, 16)
    assert sparse_tokens == dense_tokens
    assert weight_bytes_per_token(sparse) < weight_bytes_per_token(model)


class Siblings(torch.nn.Module):
    """Three projections of one input, as attention's q/k/v."""

    def __init__(self, layers):
        super().__init__()
        self.q, self.k, self.v = layers

    def forward(self, x):
        return self.q(x), self.k(x), self.v(x)


@needs_kernel
@pytest.mark.parametrize("sparsity", ["0.7", "2:4", "0.9"])
def test_siblings_decode_in_one_call_and_match(sparsity):
    weights = [sparse_weight(rows, 96, sparsity, seed=rows) for rows in (40, 24, 24)]
    biases = [torch.randn(40), None, torch.randn(24)]
    layers = [SparseLinear.from_dense(w, b) for w, b in zip(weights, biases, strict=True)]
    model = Siblings(layers)
    alone = [layer(torch.ones(1, 96)) for layer in layers]  # before grouping
    assert fuse_shared_inputs(model, torch.randn(1, 1, 96)) == 1
    group = layers[0].shared
    assert all(layer.shared is group for layer in layers)
    storage = group.fused.values.untyped_storage().data_ptr()
    assert all(layer.values.untyped_storage().data_ptr() == storage for layer in layers)
    with torch.inference_mode():
        for _ in range(2):  # a new token each time: recomputed
            x = torch.randn(1, 1, 96)
            for y, w, b in zip(model(x), weights, biases, strict=True):
                assert_matches(
                    y.reshape(1, -1) - (0 if b is None else b), x.reshape(1, -1), w, 1e-5
                )
        x = torch.randn(1, 1, 96)
        first = layers[1](x)
        assert torch.equal(layers[1](x), first)  # asked twice: computed again, same
        assert_matches(
            layers[2](torch.ones(1, 96)) - biases[2], torch.ones(1, 96), weights[2], 1e-5
        )
    for y, y_alone in zip([layer(torch.ones(1, 96)) for layer in layers], alone, strict=True):
        torch.testing.assert_close(y, y_alone, rtol=1e-5, atol=1e-5)


def test_layers_below_min_sparsity_stay_dense():
    model = tiny_model("llama")
    prune_model(model, method="magnitude", sparsity=0.5, progress=False)
    swap = to_sparse_inference(model, min_sparsity=0.6)
    assert not swap.swapped and len(swap.kept_dense) == 14
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    # A threshold no layer can meet (or a string) used to swap nothing, silently.
    for bad in (1.5, float("nan"), "0.3", -0.1):
        with pytest.raises(ValueError, match="min_sparsity must be a number from 0 to 1"):
            to_sparse_inference(model, min_sparsity=bad)


def test_bytes_per_token_count_parameters_and_a_tied_head_once():
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    embedding = model.get_input_embeddings().weight
    others = sum(p.numel() for p in model.parameters() if p is not embedding)
    assert weight_bytes_per_token(model) == 4 * (others + embedding.numel())


# ----------------------------------------------------------------------------- bench-infer


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    from conftest import byte_tokenizer

    path = tmp_path_factory.mktemp("pruned-llama")
    model = tiny_model("llama")
    prune_model(model, method="magnitude", sparsity=0.7, progress=False)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def test_bench_infer_json(capsys, pruned_dir):
    code, out, err = run_cli(
        capsys, "bench-infer", "--model", pruned_dir, "--new-tokens", 8, "--prompt-tokens", 32,
        "--repeats", 1, "--threads", 1, "--json",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    decode, prefill = result["decode_tokens_per_s"], result["prefill_tokens_per_s"]
    assert all(v > 0 for v in [*decode.values(), *prefill.values()])
    assert result["decode_speedup"] == pytest.approx(decode["sparse"] / decode["dense"])
    assert result["prefill_speedup"] == pytest.approx(prefill["sparse"] / prefill["dense"])
    size = result["bytes_per_token"]
    assert result["bandwidth_bound"] == pytest.approx(size["dense"] / size["sparse"])
    assert result["sparse_layers"] == 14 and result["threads"] == 1
    assert result["identical_tokens"] is True and result["first_difference"] is None


def test_bench_infer_report(capsys, pruned_dir):
    code, out, err = run_cli(
        capsys, "bench-infer", "--model", pruned_dir, "--new-tokens", 4, "--prompt-tokens", 16,
        "--repeats", 1,
    )  # fmt: skip
    assert code == 0, err
    number = r"[0-9]+(?:\.[0-9]+)?"
    assert re.search(
        rf"decode .* dense {number} tok/s, sparse {number} tok/s, speed-up {number}x", out
    )
    assert re.search(rf"prefill .* dense {number} tok/s, sparse {number} tok/s", out)
    bound = rf"weights read per token: dense {number} MB, sparse {number} MB: bandwidth bound"
    assert re.search(rf"{bound} {number}x", out)
    assert "greedy tokens identical over 4 tokens: yes" in out


def test_bench_infer_needs_a_model(capsys):
    code, _, err = run_cli(capsys, "bench-infer")
    assert code == 2 and "no model given" in err
