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


def _goals(monkeypatch):
    """The block outputs each block's FFN was asked to match, by block index."""
    import sparsellm.pruners.sparsellm as joint

    goals, capture = {}, joint._capture_ffn

    def recording(job, ffn, goal, residual):
        goals[job.index] = torch.cat([g.float().reshape(-1, g.shape[-1]) for g in goal])
        return capture(job, ffn, goal, residual)

    monkeypatch.setattr(joint, "_capture_ffn", recording)
    return goals


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_fit_to_model_matches_each_block_to_the_dense_models_output(
    monkeypatch, family, calibration_ids
):
    dense = tiny_model(family)
    outputs = [block_output(dense, calibration_ids, i) for i in range(2)]
    wanted = [out.reshape(-1, out.shape[-1]) for out in outputs]
    goals = _goals(monkeypatch)
    model = copy.deepcopy(dense)
    prune_model(
        model, method="sparsellm", sparsity=0.7, calibration=calibration_ids, progress=False
    )
    for index in range(2):  # the dense model's own outputs, not the dense block on pruned inputs
        torch.testing.assert_close(goals[index], wanted[index], rtol=1e-5, atol=1e-5)

    goals.clear()
    model = copy.deepcopy(dense)
    prune_model(
        model,
        method="sparsellm",
        sparsity=0.7,
        calibration=calibration_ids,
        progress=False,
        fit_to="block",
    )
    torch.testing.assert_close(goals[0], wanted[0], rtol=1e-5, atol=1e-5)  # same inputs there
    assert relative_error(goals[1], wanted[1]) > 1e-4  # block 1's inputs were pruned


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_fit_to_model_brings_the_last_block_closer_to_the_dense_model(family, calibration_ids):
    dense = tiny_model(family)
    wanted = block_output(dense, calibration_ids, 1)
    errors, reported = {}, {}
    for fit_to in ("block", "model"):
        model = copy.deepcopy(dense)
        report = prune_model(
            model,
            method="sparsellm",
            sparsity=0.7,
            calibration=calibration_ids,
            progress=False,
            fit_to=fit_to,
        )
        errors[fit_to] = relative_error(block_output(model, calibration_ids, 1), wanted)
        reported[fit_to] = report.blocks[1]
    assert reported["block"]["fit_to"] == "block" and reported["model"]["fit_to"] == "model"
    assert "model_output_error" not in reported["block"]  # no dense-model stream was kept
    assert errors["model"] < 0.95 * errors["block"], errors
    # the report's figure is the error against the dense model measured here
    assert reported["model"]["model_output_error"] == pytest.approx(errors["model"], rel=0.05)
