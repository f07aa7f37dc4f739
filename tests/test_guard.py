"""The divergence guard and the layout checks: no destroyed model is handed over in silence."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import tiny_model

from sparsellm import prune_model
from sparsellm.guard import DivergenceError
from sparsellm.models import get_adapter, linear_weight
from sparsellm.pruners.layerwise import collect_statistics, write_solution
from sparsellm.report import BlockResult
from sparsellm.solvers import Statistic


def destroying_pruner(job) -> BlockResult:
    """A broken method: half the weights zero, the rest huge noise."""
    _, dense = collect_statistics(job, job.layers, Statistic.NORMS, keep_outputs=True)
    rows = []
    generator = torch.Generator().manual_seed(job.index)
    for name, module in job.layers.items():
        weight = linear_weight(module).detach().float()
        noise = torch.randn(weight.shape, generator=generator) * 100 * weight.abs().max()
        noise.view(-1)[: weight.numel() // 2] = 0
        rows.append(write_solution(job, name, weight, noise, None))
    return BlockResult(layers=rows, dense_outputs=dense)


@contextlib.contextmanager
def registered(name: str, pruner):
    """A calibration-based method named ``name`` whose block pruner is ``pruner``."""
    from sparsellm.pruners import Method, register, unregister
    from sparsellm.pruners.wanda import WandaOptions

    register(Method(name, "test method", True, WandaOptions, lambda options: pruner))
    try:
        yield
    finally:
        unregister(name)


@pytest.fixture
def broken_method():
    with registered("broken", destroying_pruner):
        yield "broken"


@pytest.fixture
def broken_sparsegpt(monkeypatch):
    """SparseGPT itself broken: the method that has no fallback."""
    import dataclasses

    from sparsellm.pruners import METHODS

    broken = dataclasses.replace(METHODS["sparsegpt"], build=lambda options: destroying_pruner)
    monkeypatch.setitem(METHODS, "sparsegpt", broken)


def test_a_diverging_block_is_redone_with_sparsegpt(broken_method, calibration_ids):
    model = tiny_model("llama")
    report = prune_model(
        model, method=broken_method, sparsity=0.5, calibration=calibration_ids, progress=False
    )
    for block in report.blocks:
        assert block["fallback"]["kept"] == "fallback"
        assert block["fallback"]["first_error"] > 1
        assert block["output_error"] == block["fallback"]["fallback_error"] < 0.5
    assert sum("re-done with the fallback method" in note for note in report.notes) == 2
    assert len(report.layers) == 14  # the fallback's rows replaced the broken ones
    assert all(layer.relative_error is not None for layer in report.layers)  # SparseGPT's rows


def test_fallback_result_equals_a_sparsegpt_run(broken_method, calibration_ids):
    dense = tiny_model("llama")
    model = copy.deepcopy(dense)
    prune_model(
        model, method=broken_method, sparsity=0.5, calibration=calibration_ids, progress=False
    )
    reference = copy.deepcopy(dense)
    prune_model(
        reference, method="sparsegpt", sparsity=0.5, calibration=calibration_ids, progress=False
    )
    for (name, a), (_, b) in zip(
        model.named_parameters(), reference.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name


def test_divergence_without_fallback_stops_with_one_line(broken_sparsegpt, calibration_ids):
    model = tiny_model("llama")
    with pytest.raises(DivergenceError, match=r"model\.layers\.0: pruned block output error"):
        prune_model(
            model, method="sparsegpt", sparsity=0.5, calibration=calibration_ids, progress=False
        )


def test_no_guard_keeps_going_and_says_so(broken_sparsegpt, calibration_ids):
    model = tiny_model("llama")
    report = prune_model(
        model,
        method="sparsegpt",
        sparsity=0.5,
        calibration=calibration_ids,
        progress=False,
        guard=False,
    )
    assert [b["output_error"] > 1 for b in report.blocks] == [True, True]
    assert not any(b.get("fallback") for b in report.blocks)


def test_cli_divergence_exits_1_with_one_line_and_writes_nothing(
    broken_sparsegpt, model_dir, tmp_path, capsys
):
    from sparsellm.cli import main

    out = tmp_path / "out"
    code = main(
        [
            "prune",
            "--model",
            str(model_dir),
            "--method",
            "sparsegpt",
            "--calibration",
            "builtin",
            "--nsamples",
            "4",
            "--seqlen",
            "32",
            "--output",
            str(out),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and "worse than outputting zeros" in err[0], err
    assert not out.exists() or not any(out.iterdir())


def test_guard_changes_nothing_on_a_healthy_run(calibration_ids):
    model = tiny_model("llama")
    report = prune_model(
        model, method="sparsellm", sparsity=0.5, calibration=calibration_ids, progress=False
    )
    assert all(0 < b["output_error"] < 0.1 for b in report.blocks)
    assert not any(b.get("fallback") for b in report.blocks)
    blocks = get_adapter(model).blocks()
    assert len(report.blocks) == len(blocks)


def test_a_numerical_failure_is_redone_with_sparsegpt(calibration_ids):
    from sparsellm.solvers import NumericalError

    def failing(job):
        raise NumericalError("solver produced NaN")

    with registered("failing", failing):
        report = prune_model(
            tiny_model("llama"), method="failing", sparsity=0.5, calibration=calibration_ids
        )
    assert [b["fallback"]["kept"] for b in report.blocks] == ["fallback"] * 2
    assert "numerical failure (solver produced NaN)" in report.blocks[0]["fallback"]["why"]


def test_guard_setting_is_validated_and_parsed():
    from sparsellm.cli import build_parser
    from sparsellm.config import ConfigError, prune_config

    with pytest.raises(ConfigError, match="guard must be true or false, got 'yes'"):
        prune_config({"guard": "yes"}, require_io=False)
    args = build_parser().parse_args(["prune", "--model", "m", "--no-guard"])
    assert args.guard is False
    assert build_parser().parse_args(["prune", "--model", "m"]).guard is None  # recipe decides


def test_a_dense_model_that_overflows_is_named_not_called_unsupported(calibration_ids):
    from sparsellm.errors import NonFiniteError

    model = tiny_model("llama", dtype=torch.float16)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(30)  # block 0 already overflows float16
    with pytest.raises(NonFiniteError, match="block 0 outputs NaN/Inf in float16"):
        prune_model(model, method="sparsegpt", calibration=calibration_ids, progress=False)


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_nan_in_a_weight_is_named(method, calibration_ids):
    from sparsellm.errors import NonFiniteError

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
        model.model.layers[1].mlp.up_proj.weight[4, 5] = float("inf")
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.mlp\.up_proj\.weight holds 2 "):
        prune_model(model, method=method, calibration=calibration_ids, progress=False)


def test_overflowing_activations_are_named(calibration_ids):
    """Overflow past the chain check's few tokens is caught where the dense block makes it."""
    from sparsellm.errors import NonFiniteError

    model = tiny_model("llama", dtype=torch.float16)
    seen_by_chain_check = set(calibration_ids[0, :16].tolist())
    token = next(t for t in calibration_ids[1:].flatten().tolist() if t not in seen_by_chain_check)
    with torch.no_grad():
        # The token's residual stream sits at the edge of float16; attention output pushes it
        # over, for that token alone.
        model.model.embed_tokens.weight[token] = 65000
        model.model.layers[0].self_attn.o_proj.weight.mul_(4e4)
    with pytest.raises(NonFiniteError, match=r"inputs of model\.layers\.0\.mlp\.gate_proj hold"):
        prune_model(model, method="sparsegpt", calibration=calibration_ids, progress=False)
