"""`method="sparsellm"` end to end on tiny models with real-text calibration."""

import copy

import pytest
import torch
from conftest import tiny_model
from families import handed_on_and_real

from sparsellm import prune_model
from sparsellm.masks import is_valid_nm
from sparsellm.models import get_adapter, linear_weight


def block_output(model, windows, index):
    captured = {}
    block = get_adapter(model).blocks()[index]

    def keep(module, inputs, output):  # returns None: a returned value would replace output
        captured.setdefault("out", output[0] if isinstance(output, tuple) else output)

    handle = block.register_forward_hook(keep)
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    handle.remove()
    return captured["out"].float()


def relative_error(a, b):
    return float((a - b).square().sum() / b.square().sum())


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_block_output_closer_to_dense_than_sparsegpt_at_70(family, calibration_ids):
    dense = tiny_model(family)
    reference = block_output(dense, calibration_ids, 0)
    errors = {}
    for method in ("sparsegpt", "sparsellm"):
        model = copy.deepcopy(dense)
        report = prune_model(
            model, method=method, sparsity=0.7, calibration=calibration_ids, progress=False
        )
        errors[method] = relative_error(block_output(model, calibration_ids, 0), reference)
        if method == "sparsellm":
            reported = report.blocks[0]["output_error"]
            assert [b["path"] for b in report.blocks] == [
                "ffn-output" if family == "opt350" else "residual"
            ] * 2
    assert errors["sparsellm"] < 0.9 * errors["sparsegpt"], errors
    # the report's figure is the block output error measured here
    assert reported == pytest.approx(errors["sparsellm"], rel=0.05)


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "opt350", "gpt2"])
@pytest.mark.parametrize("kwargs", [{"sparsity": 0.7}, {"pattern": "2:4"}], ids=["70%", "2:4"])
def test_exact_sparsity_and_patterns(family, kwargs, calibration_ids):
    model = tiny_model(family)
    report = prune_model(
        model, method="sparsellm", calibration=calibration_ids, progress=False, **kwargs
    )
    adapter = get_adapter(model)
    count = 0
    for block in adapter.blocks():
        for name, module in adapter.prunable(block).items():
            weight = linear_weight(module)
            assert torch.isfinite(weight).all(), name
            if "pattern" in kwargs:
                assert is_valid_nm(weight, 2, 4), name
            else:
                assert int((weight == 0).sum()) == round(0.7 * weight.numel()), name
            count += 1
    assert len(report.layers) == count
    for block in report.blocks:
        assert block["path"] == ("ffn-output" if family == "opt350" else "residual")
        totals = [epoch["total"] for epoch in block["epochs"]]
        # the objective never increases from epoch to epoch
        pairs = zip(totals, totals[1:], strict=False)
        assert all(b <= a * (1 + 1e-5) + 1e-9 for a, b in pairs), totals


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_give_no_nan(dtype, calibration_ids):
    model = tiny_model("llama", dtype=dtype)
    report = prune_model(
        model, method="sparsellm", sparsity=0.7, calibration=calibration_ids, progress=False
    )
    for layer in report.layers:
        assert layer.sparsity == pytest.approx(0.7, abs=1e-3)
    with torch.no_grad():
        logits = model(input_ids=calibration_ids[:2]).logits
    assert torch.isfinite(logits).all()
    for block in report.blocks:
        assert all(torch.isfinite(torch.tensor(e["total"])) for e in block["epochs"])


def test_skipping_an_ffn_layer_falls_back_to_local_pruning(calibration_ids):
    model = tiny_model("llama")
    report = prune_model(
        model,
        method="sparsellm",
        sparsity=0.5,
        calibration=calibration_ids,
        skip="down_proj",
        progress=False,
    )
    # no joint FFN solve when part of the FFN stays dense
    assert [b["path"] for b in report.blocks] == ["layerwise"] * 2
    assert "skipped" in report.blocks[0]["reason"]
    assert not any("down_proj" in layer.name for layer in report.layers)
    assert len(report.layers) == 2 * 6


def assert_handed_on_states_are_a_forward(model, calibration_ids):
    """What the engine hands block 1 after SparseLLM pruned block 0 (``h + FFN(X)``, not a
    re-run of the block) must be what the pruned block computes."""

    def prune(m):
        prune_model(
            m, method="sparsellm", sparsity=0.7, calibration=calibration_ids, progress=False
        )
        return calibration_ids

    used_by_engine, real = handed_on_and_real(model, prune)
    torch.testing.assert_close(used_by_engine, real, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "opt", "opt350", "gpt2"])
def test_propagated_outputs_equal_a_forward_of_the_pruned_block(family, calibration_ids):
    assert_handed_on_states_are_a_forward(tiny_model(family), calibration_ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_target_rows_equal_the_stored_difference(dtype):
    """The residual path's target B₀ − r is read a chunk at a time from the dense outputs (in
    batches, model dtype) and the float32 residual: every chunk, across batch boundaries,
    is bit for bit the difference the solver used to store."""
    from sparsellm.solvers.base import NumericalError
    from sparsellm.solvers.sparsellm import RowDifference
    from sparsellm.solvers.sparsellm.state import check_finite

    torch.manual_seed(0)
    dense = [torch.randn(b, 7, 16).to(dtype) for b in (3, 1, 4)]
    residual = torch.randn(8 * 7, 16)
    stored = torch.sub(torch.cat([t.reshape(-1, 16) for t in dense]), residual)
    rows = RowDifference(dense, residual)
    assert rows.shape == stored.shape and rows.dim() == 2
    for start, stop in [(0, 56), (0, 5), (19, 22), (20, 29), (15, 56), (55, 56), (9, 9)]:
        got = rows[start:stop]
        assert got.dtype == torch.float32 and torch.equal(got, stored[start:stop])
    residual[30, 2] = float("nan")
    with pytest.raises(NumericalError, match="Y contains NaN"):
        check_finite("Y", rows)


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_blended_target_rows_equal_the_stored_blend(share):
    """``B₀ + λ (Bₘ − B₀) − r`` read a chunk at a time equals the whole formed at once."""
    from sparsellm.solvers.sparsellm import RowDifference

    torch.manual_seed(0)
    dense = [torch.randn(b, 7, 16) for b in (3, 1, 4)]
    model = [torch.randn(b, 7, 16) for b in (3, 1, 4)]
    residual = torch.randn(8 * 7, 16)
    flat = [torch.cat([t.reshape(-1, 16) for t in parts]) for parts in (dense, model)]
    stored = flat[0] + share * (flat[1] - flat[0]) - residual
    rows = RowDifference(dense, residual, model, share)
    for start, stop in [(0, 56), (19, 22), (20, 29), (55, 56)]:
        torch.testing.assert_close(rows[start:stop], stored[start:stop], rtol=0, atol=1e-6)
    if share in (0.0, 1.0):  # the plain difference, bit for bit
        plain = torch.sub(flat[int(share)], residual)
        assert torch.equal(rows[0:56], plain)


def _goals(monkeypatch):
    """Each block's target parts (B₀, Bₘ as [N, d] rows, λ), by block index."""
    import sparsellm.pruners.sparsellm as joint

    goals, capture = {}, joint.capture_ffn

    def rows(batches):
        return torch.cat([b.float().reshape(-1, b.shape[-1]) for b in batches])

    def recording(job, ffn, goal, residual):
        model = rows(goal.model) if goal.model is not None else None
        goals[job.index] = (rows(goal.dense), model, goal.correction)
        return capture(job, ffn, goal, residual)

    monkeypatch.setattr(joint, "capture_ffn", recording)
    return goals


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_each_block_is_fitted_towards_the_dense_models_output(monkeypatch, family, calibration_ids):
    dense = tiny_model(family)
    outputs = [block_output(dense, calibration_ids, i) for i in range(2)]
    wanted = [out.reshape(-1, out.shape[-1]) for out in outputs]
    goals = _goals(monkeypatch)
    for correction in (0.5, 1.0, 0.0):
        goals.clear()
        prune_model(
            copy.deepcopy(dense),
            method="sparsellm",
            sparsity=0.7,
            calibration=calibration_ids,
            progress=False,
            correction=correction,
        )
        for index in range(2):
            block, model, share = goals[index]
            assert share == correction
            if correction == 0:  # no stream of the dense model is kept
                assert model is None
            else:  # the stream is the dense model's own outputs
                torch.testing.assert_close(model, wanted[index], rtol=1e-5, atol=1e-5)
        # B₀: the dense block on the pruned inputs (block 0: the same inputs as the model's)
        torch.testing.assert_close(goals[0][0], wanted[0], rtol=1e-5, atol=1e-5)
        assert relative_error(goals[1][0], wanted[1]) > 1e-4


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_correction_brings_the_last_block_closer_to_the_dense_model(family, calibration_ids):
    dense = tiny_model(family)
    wanted = block_output(dense, calibration_ids, 1)
    errors, reported = {}, {}
    for correction in (0.0, 0.5, 1.0):
        model = copy.deepcopy(dense)
        report = prune_model(
            model,
            method="sparsellm",
            sparsity=0.7,
            calibration=calibration_ids,
            progress=False,
            correction=correction,
        )
        errors[correction] = relative_error(block_output(model, calibration_ids, 1), wanted)
        reported[correction] = report.blocks[1]
    assert [reported[c]["correction"] for c in (0.0, 0.5, 1.0)] == [0.0, 0.5, 1.0]
    assert "model_output_error" not in reported[0.0]  # no dense-model stream was kept
    assert errors[1.0] < errors[0.5] < errors[0.0], errors
    assert errors[1.0] < 0.95 * errors[0.0], errors
    # the report's figure is the error against the dense model measured here
    for correction in (0.5, 1.0):
        measured = reported[correction]["model_output_error"]
        assert measured == pytest.approx(errors[correction], rel=0.05)


def test_correction_outside_zero_to_one_is_refused(calibration_ids):
    from sparsellm.settings import ConfigError

    with pytest.raises(ConfigError, match="correction"):
        prune_model(
            tiny_model("llama"),
            method="sparsellm",
            sparsity=0.5,
            calibration=calibration_ids,
            progress=False,
            correction=1.5,
        )


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_capture_reads_the_residual_with_the_ffn_silenced(monkeypatch, family, calibration_ids):
    """Residual path: the capture pass runs the block with the FFN's layers returning zeros.
    What it stores as ``r`` is ``B − F`` of the full block (to float32 rounding), the FFN's
    layers output only zeros in it, and their own forward methods (an instance wrapper, as
    accelerate installs, included) are back afterwards."""
    import sparsellm.pruners.sparsellm as joint

    checked, capture = [], joint.capture_ffn

    def full_block_residual(job, ffn):
        seen = []
        down = job.layers[ffn.down]
        handle = down.register_forward_hook(lambda m, i, out: seen.append(out.detach().clone()))
        rows = []
        with torch.no_grad():
            for hidden, args, kwargs in job.inputs.batches():
                out = job.block(hidden, *args, **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                width = out.shape[-1]  # OPT's FFN runs on [tokens, d] rows
                rows.append((out.reshape(-1, width) - seen.pop().reshape(-1, width)).float())
        handle.remove()
        return torch.cat(rows)

    def recording(job, ffn, goal, residual):
        assert residual
        wanted = full_block_residual(job, ffn)
        layers = [job.layers[name] for name in ffn.names]
        wrapper = layers[-1].forward  # a bound method stored on the instance
        layers[-1].forward = wrapper
        outputs = []
        handles = [m.register_forward_hook(lambda m, i, o: outputs.append(o)) for m in layers]
        data = capture(job, ffn, goal, residual)
        for handle in handles:
            handle.remove()
        assert outputs and all(int(torch.count_nonzero(o)) == 0 for o in outputs)
        assert layers[-1].__dict__["forward"] is wrapper
        assert all("forward" not in m.__dict__ for m in layers[:-1])
        torch.testing.assert_close(data.residual, wanted, rtol=1e-5, atol=1e-5)
        checked.append(job.index)
        return data

    monkeypatch.setattr(joint, "capture_ffn", recording)
    prune_model(
        tiny_model(family),
        method="sparsellm",
        sparsity=0.7,
        calibration=calibration_ids,
        progress=False,
    )
    assert checked == [0, 1]


def test_token_weights_are_the_inverse_squared_norms_of_the_target_output():
    """Each token's weight is 1 / ‖B*_t‖² with B* = B₀ + λ (Bₘ − B₀), scaled to mean 1: a
    token whose output is 100x the others' (an attention sink) weighs 10⁻⁴ of them."""
    from sparsellm.pruners.ffn_data import Goal, token_weights

    g = torch.Generator().manual_seed(0)
    dense = [torch.randn(2, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g)]
    dense[0][0, 0] *= 100  # the sink
    model = [d + 0.1 * torch.randn(d.shape, generator=g) for d in dense]
    weights = token_weights(Goal(dense, model, 0.5))
    pairs = zip(dense, model, strict=True)
    blend = torch.cat([(d + 0.5 * (m - d)).reshape(-1, 8) for d, m in pairs])
    expected = 1 / blend.square().sum(-1).double()
    torch.testing.assert_close(weights.double(), expected / expected.mean(), rtol=1e-5, atol=0)
    assert float(weights.mean()) == pytest.approx(1.0)
    assert float(weights[0] / weights[1:].median()) < 1e-3
    # without a dense-model stream (λ = 0) the dense block's own outputs set them
    alone = token_weights(Goal(dense, None, 0.0))
    plain = 1 / torch.cat([d.reshape(-1, 8) for d in dense]).square().sum(-1).double()
    torch.testing.assert_close(alone.double(), plain / plain.mean(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("token_weights", ["relative", "uniform"])
def test_the_ffn_solve_gets_each_tokens_weight(monkeypatch, token_weights, calibration_ids):
    """``relative`` (the default) hands the FFN solve 1 / ‖B*_t‖² per token (the dense block's
    outputs on block 0's inputs), ``uniform`` hands it nothing (a plain sum)."""
    import sparsellm.pruners.sparsellm as joint

    seen = []
    solve = joint.sparsellm_ffn

    def recording(*args, **kwargs):
        seen.append(kwargs["token_weights"])
        return solve(*args, **kwargs)

    monkeypatch.setattr(joint, "sparsellm_ffn", recording)
    dense = tiny_model("llama")
    wanted = block_output(dense, calibration_ids, 0).reshape(-1, dense.config.hidden_size)
    options = {} if token_weights == "relative" else {"token_weights": "uniform"}
    prune_model(
        dense, method="sparsellm", sparsity=0.5, calibration=calibration_ids, progress=False,
        **options,
    )  # fmt: skip
    assert len(seen) == dense.config.num_hidden_layers
    if token_weights == "uniform":
        assert all(weights is None for weights in seen)
        return
    expected = 1 / wanted.double().square().sum(-1)
    torch.testing.assert_close(seen[0].double(), expected / expected.mean(), rtol=1e-4, atol=0)
