"""Per-layer sparsity allocation (``--allocation``): exact overall sparsity, bounded spread,
the error rule's objective, N:M refused, out of core like in memory."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli, tiny_model
from test_offload import assert_same_weights, calibration, checkpoint
from test_resume import args, assert_same_output, crash_at_block, source  # noqa: F401
from transformers import AutoModelForCausalLM

from sparsellm import prune_model
from sparsellm.allocation import OWL_OUTLIER_FACTOR, _outlier_ratio, _project, exact_counts
from sparsellm.api import prune
from sparsellm.config import prune_config
from sparsellm.models import get_adapter, linear_weight
from sparsellm.offload import OffloadedModel
from sparsellm.settings import ConfigError

METHODS = ("magnitude", "wanda", "sparsegpt", "sparsellm")


def _prune(model, method: str, rule: str, sparsity: float = 0.6, spread: float = 0.1, **more):
    return prune_model(
        model,
        method=method,
        sparsity=sparsity,
        calibration=calibration(),
        progress=False,
        allocation=rule,
        allocation_spread=spread,
        batch_size=4,
        **more,
    )


def _layer_weights(model) -> dict[str, torch.Tensor]:
    adapter = get_adapter(model)
    return {
        f"{adapter.block_name(i)}.{name}": linear_weight(module).detach()
        for i, block in enumerate(adapter.blocks())
        for name, module in adapter.prunable(block).items()
    }


@pytest.mark.parametrize("rule", ["owl", "error"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_overall_sparsity_is_exact_and_layers_stay_in_bounds(family, method, rule):
    model = tiny_model(family)
    report = _prune(model, method, rule, sparsity=0.6, spread=0.1)
    weights = _layer_weights(model)
    numel = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert zeros == round(0.6 * numel)  # counted on the model, not taken from the report
    assert report.zeros == zeros and report.allocation["zeros"] == zeros
    for row in report.layers:
        slack = 1 / row.numel  # a layer's count is its real share rounded
        assert 0.5 - slack <= row.sparsity <= 0.7 + slack, row.name
        assert row.allocated == pytest.approx(row.sparsity, abs=slack)
        assert row.allocation_score is not None
    spreads = {round(row.sparsity, 3) for row in report.layers}
    assert len(spreads) > 1  # the rule did allocate unevenly


@pytest.mark.parametrize("rule", ["owl", "error"])
def test_spread_bounds_the_layers(rule):
    for spread in (0.0, 0.03):
        report = _prune(tiny_model("llama"), "sparsegpt", rule, sparsity=0.7, spread=spread)
        for row in report.layers:
            assert abs(row.sparsity - 0.7) <= spread + 1 / row.numel, (spread, row.name)


def test_upper_bound_is_clipped_to_099():
    report = _prune(tiny_model("llama"), "wanda", "error", sparsity=0.95, spread=0.2)
    assert max(row.sparsity for row in report.layers) <= 0.99 + 1e-12
    assert report.zeros == round(0.95 * report.numel)


def test_uniform_is_the_default_and_changes_nothing():
    default, uniform = tiny_model("llama"), tiny_model("llama")
    for model, extra in ((default, {}), (uniform, {"allocation": "uniform"})):
        prune_model(model, sparsity=0.6, calibration=calibration(), progress=False, **extra)
    for (name, a), b in zip(
        default.state_dict().items(), uniform.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def _input_sq_norms(model) -> dict[str, torch.Tensor]:
    """Σ x_j² of every prunable layer's inputs over the calibration, dense model."""
    adapter, sums, handles = get_adapter(model), {}, []
    for i, block in enumerate(adapter.blocks()):
        for name, module in adapter.prunable(block).items():
            full = f"{adapter.block_name(i)}.{name}"

            def hook(module, inputs, full=full):
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
                sums[full] = sums.get(full, 0) + x.square().sum(0)

            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=calibration(), use_cache=False)
    for handle in handles:
        handle.remove()
    return sums


def _relative_diagonal_error(weight: torch.Tensor, sq_norms: torch.Tensor, zeros: int) -> float:
    """Σ of the ``zeros`` smallest w²‖x‖² over their total: the layer's relative error."""
    costs = (weight.float().square() * sq_norms).reshape(-1).double()
    return float(costs.sort().values[:zeros].sum() / costs.sum())


def _unequal_llama():
    """Layers of deliberately different shapes of weight distribution: some heavy-tailed
    (a few large weights carry the output, the rest cost little to prune), some flat."""
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(1)
    for i, weight in enumerate(_layer_weights(model).values()):
        with torch.no_grad():
            if i % 3 == 0:
                heavy = torch.rand(weight.shape, generator=generator) < 0.05
                weight.mul_(torch.where(heavy, 30.0, 1.0))
            elif i % 3 == 1:
                weight.copy_(torch.rand(weight.shape, generator=generator).add_(1.0))
    return model


def test_error_rule_lowers_the_summed_relative_diagonal_error():
    model = _unequal_llama()
    dense = {name: w.clone() for name, w in _layer_weights(model).items()}
    norms = _input_sq_norms(model)
    report = _prune(model, "magnitude", "error", sparsity=0.6, spread=0.3)
    uniform = errors = 0.0
    for row in report.layers:
        weight, sq = dense[row.name], norms[row.name]
        errors += _relative_diagonal_error(weight, sq, row.zeros)
        uniform += _relative_diagonal_error(weight, sq, round(0.6 * row.numel))
    assert errors < 0.6 * uniform, (errors, uniform)
    assert report.allocation["relative_error_sum"] == pytest.approx(errors, rel=0.02)
    assert report.allocation["relative_error_sum_uniform"] == pytest.approx(uniform, rel=0.02)


def test_owl_outlier_ratio_and_direction():
    scores = [torch.ones(100), torch.ones(100)]
    scores[0][:3] = 100.0**2  # squared scores: |w|·‖x‖ = 100 against a mean of ~3.9
    assert _outlier_ratio(scores) == pytest.approx(3 / 200)
    assert OWL_OUTLIER_FACTOR == 5.0
    # more outliers, fewer zeros: block 0 of a model whose block 0 holds large weights
    model = tiny_model("llama")
    with torch.no_grad():
        for name, weight in _layer_weights(model).items():
            if ".0." in name:
                weight[:, :2] *= 50.0
    report = _prune(model, "wanda", "owl", sparsity=0.6, spread=0.1)
    by_block = {row.block: row.sparsity for row in report.layers}
    assert by_block[0] == pytest.approx(0.5, abs=0.01)  # the most outliers: target − spread
    assert by_block[1] == pytest.approx(0.7, abs=0.01)


def test_projection_and_counts_are_exact():
    sizes = torch.tensor([100.0, 300.0, 600.0], dtype=torch.float64)
    shares = _project(torch.tensor([0.9, 0.1, 0.5]), sizes, 0.3, 0.8, 500)
    assert float((shares * sizes).sum()) == pytest.approx(500, abs=1e-6)
    # one shift (+0.05) for all, then clipped: 80 + 90 + 600 · 0.55 = 500
    assert shares.tolist() == pytest.approx([0.8, 0.3, 0.55], abs=1e-6)
    counts = exact_counts(torch.tensor([10.4, 20.4, 30.2]), 62)
    assert counts == [11, 21, 30] and sum(counts) == 62


def test_pattern_with_allocation_is_refused():
    with pytest.raises(ConfigError, match="N:M pattern"):
        prune_config(dict(pattern="2:4", allocation="owl"), require_io=False)
    with pytest.raises(ConfigError, match="allocation"):
        prune_config(dict(sparsity=0.5, allocation="median"), require_io=False)


def test_pattern_with_allocation_cli_one_line(capsys, model_dir, tmp_path):
    code, out, err = run_cli(
        capsys, "prune", "--model", model_dir, "--output", tmp_path / "o", "--pattern", "2:4",
        "--allocation", "error",
    )  # fmt: skip
    assert code == 2
    assert err.strip().count("\n") == 0 and "allocation error needs --sparsity" in err


@pytest.mark.parametrize("family,method", [("llama", "sparsegpt"), ("opt", "sparsellm")])
def test_offload_disk_equals_in_memory(tmp_path, family, method):
    saved_model = checkpoint(tmp_path, family, sharded=True)
    settings = dict(method=method, sparsity=0.6, batch_size=4, allocation="error")
    model = AutoModelForCausalLM.from_pretrained(saved_model, dtype=torch.float32).eval()
    expected = prune(model, None, prune_config(settings, require_io=False),
                     calibration_ids=calibration(), progress=False)  # fmt: skip
    offloaded = OffloadedModel(saved_model, "auto")
    output = tmp_path / "out"
    store = offloaded.pruning_store(output)
    report = prune(offloaded.model, None, prune_config(settings, require_io=False),
                   calibration_ids=calibration(), progress=False, store=store)  # fmt: skip
    offloaded.finish({"sparsity_report.json": report})
    assert_same_weights(model.state_dict(), output)
    assert report.allocation == expected.allocation
    saved = json.loads((output / "sparsity_report.json").read_text())
    assert saved["allocation"]["rule"] == "error"
    assert {row["allocated"] for row in saved["layers"]} == {
        row.allocated for row in expected.layers
    }


def test_cli_report_lists_each_layer(capsys, model_dir, tmp_path, calibration_text):
    out_dir = tmp_path / "o"
    code, out, err = run_cli(
        capsys, "prune", "--model", model_dir, "--output", out_dir, "--method", "wanda",
        "--sparsity", "0.6", "--allocation", "owl", "--allocation-spread", "0.05",
        "--calibration", calibration_text, "--nsamples", "4", "--seqlen", "32", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    # two blocks: one at the target − spread, the other at + spread (a weight's rounding)
    assert "allocation owl (spread 0.05): layers from 54.98%" in out and "to 65.00%" in out
    saved = json.loads((out_dir / "sparsity_report.json").read_text())
    assert saved["allocation"]["rule"] == "owl" and saved["allocation"]["spread"] == 0.05
    assert saved["totals"]["zeros"] == round(0.6 * saved["totals"]["parameters"])
    for row in saved["layers"]:
        assert row["allocated"] is not None and row["allocation_score"] >= 0


@pytest.mark.parametrize("offload", ["memory", "disk"])
def test_resume_after_a_crash_gives_the_same_allocation(
    monkeypatch,
    capsys,
    tmp_path,
    source,  # noqa: F811 (test_resume's fixture: a 4-block model)
    offload,
):
    """The pre-pass runs on the dense model before the record restores anything, so a resumed
    run allocates as the uninterrupted one did, bit for bit."""
    extra = ("--sparsity", 0.6, "--allocation", "error")
    reference = tmp_path / "reference"
    assert run_cli(capsys, *args(source, reference, "sparsegpt", offload, *extra))[0] == 0
    output = tmp_path / "out"
    with monkeypatch.context() as patch:
        crash_at_block(patch, 2)
        assert run_cli(capsys, *args(source, output, "sparsegpt", offload, *extra))[0] == 130
    assert run_cli(capsys, *args(source, output, "sparsegpt", offload, *extra, "--resume"))[0] == 0
    assert_same_output(reference, output)
    reports = [json.loads((d / "sparsity_report.json").read_text()) for d in (reference, output)]
    assert reports[1]["allocation"] == reports[0]["allocation"]
