import json

import pytest
import torch
from conftest import FIXTURES
from conftest import run_cli as run
from transformers import AutoModelForCausalLM

from sparsellm.cli import main as run_main
from sparsellm.masks import is_valid_nm


def test_prune_happy_path_saves_a_model_that_reloads_identically(
    capsys, tmp_path, model_dir, calibration_text
):
    out_dir = tmp_path / "pruned"
    code, out, err = run(
        capsys,
        "prune",
        "--model",
        model_dir,
        "--output",
        out_dir,
        "--method",
        "sparsegpt",
        "--pattern",
        "2:4",
        "--calibration",
        calibration_text,
        "--nsamples",
        8,
        "--seqlen",
        64,
        "--eval",
        calibration_text,
        "--eval-windows",
        4,
        "--quiet",
    )
    assert code == 0, err
    assert f"pruned model written to {out_dir}" in out
    report = json.loads((out_dir / "sparsity_report.json").read_text())
    assert report["totals"]["sparsity"] == pytest.approx(0.5)
    assert report["target"] == "2:4" and report["method"] == "sparsegpt"
    assert set(report["perplexity"]) == {"dense", "pruned"}
    assert report["config"]["calibration_windows"] == [8, 64]
    assert all(layer["relative_error"] is not None for layer in report["layers"])
    assert "prune" in report["timings_seconds"]

    reloaded = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    for name, module in reloaded.named_modules():
        if name.startswith("model.layers.") and isinstance(module, torch.nn.Linear):
            assert is_valid_nm(module.weight, 2, 4), name
    ids = torch.arange(32).unsqueeze(0)
    # the in-memory pruned model is not kept by the CLI: compare against a second load
    again = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, again(input_ids=ids).logits)
    assert not list(tmp_path.glob(".pruned.*")), "staging directory left behind"


def test_recipe_with_flag_override(capsys, tmp_path, model_dir, calibration_text):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'model = "{model_dir}"\nmethod = "wanda"\nsparsity = 0.7\n'
        f'calibration = "{calibration_text}"\nnsamples = 4\nseqlen = 32\n'
    )
    out_dir = tmp_path / "out"
    code, _, err = run(
        capsys, "prune", "--recipe", recipe, "--sparsity", 0.6, "--output", out_dir, "--quiet"
    )
    assert code == 0, err
    report = json.loads((out_dir / "sparsity_report.json").read_text())
    assert report["method"] == "wanda"
    assert report["totals"]["sparsity"] == pytest.approx(0.6, abs=1e-4)


def test_overwrite_replaces_existing_output(capsys, tmp_path, model_dir):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "old.txt").write_text("x")
    args = ["prune", "--model", model_dir, "--output", out_dir, "--method", "magnitude", "--quiet"]
    code, _, err = run(capsys, *args)
    assert code == 2 and "--overwrite" in err and (out_dir / "old.txt").exists()
    code, _, err = run(capsys, *args, "--overwrite")
    assert code == 0, err
    assert not (out_dir / "old.txt").exists() and (out_dir / "model.safetensors").exists()


BAD_INPUTS = [
    (["--sparsity", "1.5"], "1.5"),
    (["--sparsity", "-0.2"], "-0.2"),
    (["--pattern", "4:4"], "4:4"),
    (["--pattern", "0:4"], "0:4"),
    (["--pattern=-1:4"], "-1:4"),
    (["--sparsity", "lots"], "lots"),
    (["--method", "obs9000"], "obs9000"),
    (["--model", "/no/such/model/dir"], "/no/such/model/dir"),
    (["--model", "no-such-org/no-such-model"], "no-such-org/no-such-model"),
    (["--calibration", "/no/such/file.txt"], "/no/such/file.txt"),
    (["--nsamples", "100000", "--seqlen", "512"], "100000"),
    (["--nsamples", "0"], "nsamples"),
]


@pytest.mark.parametrize(("extra", "named"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    capsys, tmp_path, model_dir, calibration_text, extra, named
):
    out_dir = tmp_path / "out"
    argv = [
        "prune",
        "--model",
        model_dir,
        "--output",
        out_dir,
        "--calibration",
        calibration_text,
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--quiet",
    ]
    code, out, err = run(capsys, *argv, *extra)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparsellm: error:"), err
    assert named in lines[0]
    assert not out_dir.exists()
    assert list(tmp_path.iterdir()) == []


def test_non_empty_output_without_overwrite(capsys, tmp_path, model_dir):
    out_dir = tmp_path / "taken"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "prune", "--model", model_dir, "--output", out_dir, "--quiet")
    assert code == 2 and str(out_dir) in err
    assert [p.name for p in out_dir.iterdir()] == ["keep.txt"]


def test_recipe_with_unknown_key(capsys, tmp_path, model_dir):
    recipe = tmp_path / "bad.toml"
    recipe.write_text("sparsity = 0.5\nsparsitty = 0.7\n")
    code, _, err = run(
        capsys, "prune", "--recipe", recipe, "--model", model_dir, "--output", tmp_path / "o"
    )
    assert code == 2 and "sparsitty" in err
    assert not (tmp_path / "o").exists()


def test_sparsity_and_pattern_together_are_rejected(capsys, tmp_path, model_dir):
    code, _, err = run(
        capsys,
        "prune",
        "--model",
        model_dir,
        "--output",
        tmp_path / "o",
        "--sparsity",
        "0.5",
        "--pattern",
        "2:4",
    )
    assert code == 2 and "not both" in err


def test_eval_prints_perplexity_equal_to_api(capsys, model_dir, calibration_text, tokenizer):
    from sparsellm import evaluate_perplexity

    code, out, err = run(
        capsys,
        "eval",
        "--model",
        model_dir,
        "--dataset",
        calibration_text,
        "--seqlen",
        64,
        "--max-windows",
        6,
        "--quiet",
    )
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    expected = evaluate_perplexity(
        model, tokenizer, str(calibration_text), seqlen=64, max_windows=6, progress=False
    )
    assert f"perplexity {expected:.4f}" in out


def test_eval_report_into_a_new_directory(
    capsys, tmp_path, model_dir, calibration_text, monkeypatch
):
    """``--report`` creates its directory (a fresh clone has no out/); a place no file can be
    written is refused in one line before the model loads."""
    args = ["eval", "--model", model_dir, "--dataset", calibration_text, "--seqlen", 64,
            "--max-windows", 2, "--quiet"]  # fmt: skip
    report = tmp_path / "out" / "nested" / "dense.json"
    code, out, err = run(capsys, *args, "--report", report)
    assert code == 0, err
    ppl = json.loads(report.read_text())["evaluation"]["perplexity"][str(calibration_text)]
    assert f"perplexity {ppl['perplexity']:.4f}" in out
    (tmp_path / "file").write_text("x")
    import sparsellm.cli

    monkeypatch.setattr(sparsellm.cli, "_load", lambda *a: pytest.fail("model loaded"))
    code, _, err = run(capsys, *args, "--report", tmp_path / "file" / "dense.json")
    assert code == 2 and err.count("\n") == 1 and "cannot write report" in err


def test_eval_with_missing_dataset(capsys, model_dir):
    code, _, err = run(capsys, "eval", "--model", model_dir, "--dataset", "nowhere.txt")
    assert code == 2 and "nowhere.txt" in err


def test_finetune_keeps_the_zeros_of_a_pruned_model(capsys, tmp_path, model_dir, calibration_text):
    pruned = tmp_path / "pruned"
    code, _, err = run(
        capsys,
        "prune",
        "--model",
        model_dir,
        "--output",
        pruned,
        "--method",
        "magnitude",
        "--sparsity",
        "0.6",
        "--quiet",
    )
    assert code == 0, err
    tuned = tmp_path / "tuned"
    code, out, err = run(
        capsys,
        "finetune",
        "--model",
        pruned,
        "--output",
        tuned,
        "--data",
        calibration_text,
        "--steps",
        6,
        "--seqlen",
        64,
        "--batch-size",
        2,
        "--eval-windows",
        4,
        "--lr",
        "1e-3",
        "--quiet",
    )
    assert code == 0, err
    report = json.loads((tuned / "finetune_report.json").read_text())
    assert report["sparsity_before"] == pytest.approx(0.6, abs=1e-4)
    assert report["sparsity_after"] == report["sparsity_before"]
    assert report["perplexity_after"] < report["perplexity_before"]
    before = AutoModelForCausalLM.from_pretrained(pruned)
    after = AutoModelForCausalLM.from_pretrained(tuned)
    for (name, w0), (_, w1) in zip(
        before.named_parameters(), after.named_parameters(), strict=True
    ):
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            assert torch.equal(w0 == 0, w1 == 0), name
            assert not torch.equal(w0, w1), f"{name} did not train"


def test_finetune_bad_steps(capsys, tmp_path, model_dir):
    code, _, err = run(
        capsys, "finetune", "--model", model_dir, "--output", tmp_path / "o", "--steps", "0"
    )
    assert code == 2 and "steps" in err and not (tmp_path / "o").exists()


def test_a_diverging_finetune_is_one_line_and_writes_nothing(capsys, tmp_path, model_dir):
    """A non-finite loss used to end the CLI with a 20-line FloatingPointError traceback."""
    args = ("finetune", "--model", model_dir, "--output", tmp_path / "o", "--lr", "1e30")
    args += ("--data", FIXTURES / "calibration.txt", "--steps", 3, "--seqlen", 32, "--quiet")
    code, _, err = run(capsys, *args)
    assert code == 1
    assert err.strip().splitlines() == [
        "sparsellm: numerical failure: training loss is nan at step 1, after 1 update(s): "
        "training diverged; a lower learning rate (--lr) or more warm-up steps (--warmup-steps) "
        "usually helps"
    ]
    assert not (tmp_path / "o").exists()


def test_finetune_bad_mixed_precision(capsys, tmp_path, model_dir):
    code, _, err = run(
        capsys,
        "finetune",
        "--model",
        model_dir,
        "--output",
        tmp_path / "o",
        "--mixed-precision",
        "fp8",
    )
    assert code == 2 and "fp8" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_top_level_help_describes_the_tool_in_whole_sentences(capsys):
    with pytest.raises(SystemExit) as exit:
        run_main(["--help"])
    assert exit.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    # The description used to be the first line of the module docstring, cut mid-sentence.
    assert "flags derived from the settings and the positional" not in out
    assert "Prune causal language models to a target sparsity" in out
    assert "`sparsellm COMMAND --help` lists a command's flags." in out


def test_an_unknown_flag_points_at_the_subcommands_help(capsys):
    code, _, err = run(capsys, "compress", "in", "out", "--output", "x")
    assert code == 2
    # argparse reports leftovers from the top-level parser, whose help lists no flags.
    assert err.strip().splitlines() == [
        "sparsellm: error: unrecognized arguments: --output x (see 'sparsellm compress --help')"
    ]


@pytest.mark.parametrize(
    ("command", "flag"),
    [("sweep", "--eval"), ("prune", "--spars"), ("eval", "--max-window")],
)
def test_a_flag_prefix_is_not_taken_for_a_longer_flag(capsys, command, flag):
    """argparse's prefix matching read sweep's '--eval 64' as --eval-seqlen 64, silently."""
    code, _, err = run(capsys, command, "--model", "m", flag, "64")
    assert code == 2
    assert f"unrecognized arguments: {flag} 64" in err


def test_each_command_reads_its_text_and_tokenizer_once(
    capsys, tmp_path, model_dir, calibration_text, monkeypatch
):
    """The preflight reads, tokenizes and checks the text sources before the model loads; the
    run uses what it read (it used to load the tokenizer and tokenize every text again: 4 s
    for a GGUF's tokenizer, longer for a large calibration set)."""
    import transformers

    import sparsellm.data

    calls = {"tokenize": 0, "tokenizer": 0}
    tokenize, from_pretrained = sparsellm.data.tokenize, transformers.AutoTokenizer.from_pretrained

    def counted_tokenize(*args, **kwargs):
        calls["tokenize"] += 1
        return tokenize(*args, **kwargs)

    def counted_load(*args, **kwargs):
        calls["tokenizer"] += 1
        return from_pretrained(*args, **kwargs)

    monkeypatch.setattr(sparsellm.data, "tokenize", counted_tokenize)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", counted_load)
    out_dir = tmp_path / "pruned"
    code, out, err = run(capsys, "prune", "--model", model_dir, "--output", out_dir,
                         "--method", "wanda", "--sparsity", 0.5, "--calibration",
                         calibration_text, "--nsamples", 8, "--seqlen", 64, "--eval",
                         calibration_text, "--eval-windows", 4, "--quiet")  # fmt: skip
    assert code == 0, err
    assert calls == {"tokenize": 2, "tokenizer": 1}  # calibration and evaluation text
    report = json.loads((out_dir / "sparsity_report.json").read_text())
    assert report["config"]["calibration"] == str(calibration_text)
    assert report["config"]["calibration_windows"] == [8, 64]
    # the windows handed on are the ones prune_model draws from the same text
    from sparsellm import prune_model

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = from_pretrained(model_dir)
    prune_model(model, tokenizer, sparsity=0.5, method="wanda", nsamples=8, seqlen=64,
                calibration=str(calibration_text), progress=False)  # fmt: skip
    saved = AutoModelForCausalLM.from_pretrained(out_dir)
    for (name, mine), (_, theirs) in zip(
        saved.named_parameters(), model.named_parameters(), strict=True
    ):
        assert torch.equal(mine, theirs), name
    pruned_ppl = report["perplexity"]["pruned"]

    calls.update(tokenize=0, tokenizer=0)
    code, out, err = run(capsys, "eval", "--model", out_dir, "--dataset", calibration_text,
                         "--seqlen", 64, "--max-windows", 4, "--quiet")  # fmt: skip
    assert code == 0, err
    assert calls == {"tokenize": 1, "tokenizer": 1}
    assert f"perplexity {pruned_ppl:.4f}" in out

    calls.update(tokenize=0, tokenizer=0)
    code, out, err = run(capsys, "finetune", "--model", out_dir, "--output", tmp_path / "tuned",
                         "--data", calibration_text, "--steps", 2, "--seqlen", 64,
                         "--eval-windows", 2, "--quiet")  # fmt: skip
    assert code == 0, err
    assert calls["tokenizer"] == 1
