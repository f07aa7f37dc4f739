"""A new pruning method is one declaration plus one registration line.

The toy method below is defined in this file alone; registering it must be enough for
``prune_model()``, the CLI (its flag, ``--help``, recipes) and validation to know it.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import pytest
import torch
from conftest import tiny_model
from test_cli import run

from sparsellm import prune_model
from sparsellm.config import ConfigError
from sparsellm.masks import select_mask
from sparsellm.pruners import Method, register, unregister
from sparsellm.pruners.layerwise import layerwise_pruner
from sparsellm.settings import setting
from sparsellm.solvers import SolveResult, Statistic


@dataclass
class PoweredNormOptions:
    norm_power: float = setting(1.0, "exponent of the input norm in the score", "positive_number")


def powered_norm_pruner(options: PoweredNormOptions):
    """Score |w|·‖x‖^p per output row (p = 1 is Wanda)."""

    def solve(weight, stats, target):
        scores = weight.abs() * stats.sq_norms.sqrt().pow(options.norm_power).unsqueeze(0)
        return SolveResult(weight=weight.masked_fill(select_mask(scores, target, per_row=True), 0))

    return layerwise_pruner(Statistic.NORMS, solve)


TOY = Method("powered-norm", "toy: |w|·‖x‖^p", True, PoweredNormOptions, powered_norm_pruner)


@pytest.fixture
def toy():
    register(TOY)
    yield TOY.name
    unregister(TOY.name)


def test_toy_method_runs_through_prune_model(toy, calibration_ids):
    dense = tiny_model("llama")
    pruned = {}
    for method, options in ((toy, {"norm_power": 1.0}), ("wanda", {}), (toy, {"norm_power": 3})):
        model = copy.deepcopy(dense)
        report = prune_model(
            model,
            method=method,
            sparsity=0.5,
            calibration=calibration_ids,
            progress=False,
            **options,
        )
        assert report.sparsity == 0.5 and report.method == method
        pruned[method, options.get("norm_power")] = dict(model.named_parameters())
    # p = 1 is Wanda bit for bit; p = 3 picks other weights.
    toy1, wanda, toy3 = pruned.values()
    assert all(torch.equal(toy1[name], wanda[name]) for name in wanda)
    assert not all(torch.equal(toy3[name], wanda[name]) for name in wanda)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"norm_power": -1.0}, "norm_power must be a positive number, got -1.0"),
        ({"norm_power": "big"}, "norm_power must be a positive number, got 'big'"),
        ({"epochs": 2}, "epochs is an option of sparsellm, not of method 'powered-norm'"),
        ({"norm_powr": 2}, "unknown setting 'norm_powr'"),
    ],
)
def test_toy_options_are_validated_by_name(toy, calibration_ids, options, message):
    with pytest.raises(ConfigError, match=message):
        prune_model(tiny_model("llama"), method=toy, calibration=calibration_ids, **options)


def test_toy_option_of_another_method_is_refused(toy, calibration_ids):
    with pytest.raises(ConfigError, match="norm_power is an option of powered-norm, not of"):
        prune_model(tiny_model("llama"), method="wanda", calibration=calibration_ids, norm_power=2)


def test_toy_method_through_the_cli_and_a_recipe(toy, capsys, tmp_path, model_dir):
    code, out, _ = run(capsys, "prune", "--help")
    assert code == 0 and "powered-norm: toy" in out and "--norm-power" in out
    recipe = tmp_path / "toy.toml"
    recipe.write_text('method = "powered-norm"\nnorm-power = 2.0\nnsamples = 4\nseqlen = 32\n')
    out_dir = tmp_path / "out"
    argv = ["prune", "--recipe", recipe, "--model", model_dir, "--output", out_dir, "--quiet"]
    code, out, err = run(capsys, *argv, "--norm-power", "0.5", "--sparsity", "0.6")
    assert code == 0, err
    report = json.loads((out_dir / "sparsity_report.json").read_text())
    assert report["method"] == "powered-norm" and report["config"]["norm_power"] == 0.5
    assert report["totals"]["sparsity"] == pytest.approx(0.6, abs=1e-3)


def test_unregistered_method_is_unknown_to_the_cli(capsys, tmp_path, model_dir):
    argv = ["prune", "--model", model_dir, "--output", tmp_path / "o", "--method", "powered-norm"]
    code, _, err = run(capsys, *argv)
    assert code == 2 and "unknown method 'powered-norm'" in err
    code, _, err = run(capsys, *argv[:-2], "--norm-power", "2")
    assert code == 2 and "--norm-power" in err


def test_a_config_built_by_hand_is_checked_and_given_its_method_options(calibration_ids):
    from sparsellm.api import prune
    from sparsellm.config import PruneConfig

    report = prune(
        tiny_model("llama"),
        None,
        PruneConfig(method="sparsegpt", sparsity=0.5),
        calibration_ids=calibration_ids,
        progress=False,
    )
    assert report.sparsity == 0.5 and report.config["dampening"] == 0.01
    with pytest.raises(ConfigError, match="nsamples must be a positive integer, got 0"):
        prune(tiny_model("llama"), None, PruneConfig(nsamples=0), calibration_ids=calibration_ids)
