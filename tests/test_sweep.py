"""``sparsellm sweep`` (resume, settings, csv, plot) and ``sparsellm report`` across depth
(issue 16), on a tiny LLaMA."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import torch
from conftest import FIXTURES, run_cli, tiny_model

PNG = b"\x89PNG\r\n\x1a\n"
TEXT = FIXTURES / "calibration.txt"


def sweep_values(model_dir, output, **more) -> dict:
    values = dict(
        model=str(model_dir),
        output=str(output),
        methods="magnitude,wanda",
        sparsities="0.5",
        calibration=str(TEXT),
        nsamples=4,
        seqlen=32,
        dataset=str(TEXT),
        max_windows=3,
        plot=False,
        device="cpu",
    )
    return {**values, **more}


def read_csv(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def counted_prunes(monkeypatch):
    """The (method, sparsity) of every prune the sweep runs."""
    import sparsellm.sweep as sweep

    calls = []
    real = sweep.prune

    def prune(model, tokenizer, config, **kwargs):
        calls.append((config.method, config.sparsity))
        return real(model, tokenizer, config, **kwargs)

    monkeypatch.setattr(sweep, "prune", prune)
    return calls


def run_sweep(values: dict):
    from sparsellm.config import sweep_config
    from sparsellm.sweep import Sweep

    sweep = Sweep(sweep_config(dict(values)), progress=False)
    return sweep, sweep.run()


def test_sweep_resume_skips_finished_points(model_dir, tmp_path, counted_prunes):
    output = tmp_path / "sweep"
    sweep, _ = run_sweep(sweep_values(model_dir, output))
    assert counted_prunes == [("magnitude", 0.5), ("wanda", 0.5)]
    first = {(r["method"], r["sparsity"]): r for r in read_csv(output / "sweep.csv")}
    assert set(first) == {("dense", "0.0"), ("magnitude", "0.5"), ("wanda", "0.5")}
    assert float(first[("magnitude", "0.5")]["measured_sparsity"]) == pytest.approx(0.5, abs=1e-4)
    assert float(first[("dense", "0.0")]["measured_sparsity"]) == 0.0

    counted_prunes.clear()  # more sparsities: only the new points run
    run_sweep(sweep_values(model_dir, output, sparsities="0.5,0.7"))
    assert counted_prunes == [("magnitude", 0.7), ("wanda", 0.7)]
    second = {(r["method"], r["sparsity"]): r for r in read_csv(output / "sweep.csv")}
    assert len(second) == 5
    for key, row in first.items():
        assert second[key] == row  # finished rows are kept as they were
    assert float(second[("wanda", "0.7")]["measured_sparsity"]) == pytest.approx(0.7, abs=1e-4)
    # the higher sparsity costs the magnitude-pruned model perplexity
    assert float(second[("magnitude", "0.7")]["perplexity"]) > float(
        second[("dense", "0.0")]["perplexity"]
    )

    counted_prunes.clear()  # nothing left to do: nothing loads, nothing prunes
    _, done = run_sweep(sweep_values(model_dir, output, sparsities="0.5,0.7"))
    assert done == [] and counted_prunes == []
    report = json.loads((output / "reports" / "wanda-0.7" / "sparsity_report.json").read_text())
    assert report["method"] == "wanda" and report["target"] == "70%"


def test_an_interrupted_sweep_resumes_where_it_stopped(
    model_dir, tmp_path, counted_prunes, monkeypatch
):
    import sparsellm.sweep as sweep

    counting = sweep.prune

    def interrupted(model, tokenizer, config, **kwargs):
        if config.method == "wanda":
            raise KeyboardInterrupt
        return counting(model, tokenizer, config, **kwargs)

    monkeypatch.setattr(sweep, "prune", interrupted)
    output = tmp_path / "sweep"
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep_values(model_dir, output))
    assert [r["method"] for r in read_csv(output / "sweep.csv")] == ["dense", "magnitude"]
    monkeypatch.setattr(sweep, "prune", counting)
    counted_prunes.clear()
    run_sweep(sweep_values(model_dir, output))
    assert counted_prunes == [("wanda", 0.5)]
    assert [r["method"] for r in read_csv(output / "sweep.csv")] == ["dense", "magnitude", "wanda"]


def test_sweep_refuses_to_mix_settings(capsys, model_dir, tmp_path):
    from sparsellm.config import sweep_config
    from sparsellm.sweep import open_directory

    output = tmp_path / "sweep"
    open_directory(sweep_config({"model": str(model_dir), "output": str(output)}))
    args = ["sweep", "--model", model_dir, "--output", output, "--nsamples", 4, "--no-plot"]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and err.count("\n") == 1
    assert "nsamples: 128 then, 4 now" in err
    code, _, err = run_cli(capsys, "sweep", "--model", model_dir, "--output", output / "x",
                           "--sparsities", "0.5,1.5", "--no-plot")  # fmt: skip
    assert code == 2 and "'1.5'" in err
    code, _, err = run_cli(capsys, "sweep", "--model", model_dir, "--output", output / "x",
                           "--methods", "magnitude,nope", "--no-plot")  # fmt: skip
    assert code == 2 and "nope" in err


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda text: text + "garbage,line\n", "line 5 is not a sweep point"),
        (lambda text: "a,b\n1,2\n", "line 2 is not a sweep point"),
        (lambda text: "\udcff", "is not a sweep csv"),
    ],
)
def test_a_damaged_sweep_csv_is_one_line(capsys, model_dir, tmp_path, damage, named):
    """A hand-edited or truncated csv used to end a resumed sweep in a KeyError or a float()
    traceback."""
    output = tmp_path / "sweep"
    run_sweep(sweep_values(model_dir, output))  # dense + 2 points: lines 2-4, the damage line 5
    path = output / "sweep.csv"
    text = damage(path.read_text())
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    args = ["sweep", "--model", model_dir, "--output", output, "--methods", "magnitude,wanda"]
    args += ["--sparsities", "0.5", "--calibration", TEXT, "--nsamples", 4, "--seqlen", 32]
    args += ["--dataset", TEXT, "--max-windows", 3, "--no-plot", "--device", "cpu", "--quiet"]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and err.count("\n") == 1, err
    assert named in err


@pytest.mark.parametrize(
    ("body", "named"), [("not json", "is not JSON"), ("[]", "does not hold a JSON object")]
)
def test_a_damaged_sweep_json_is_one_line(capsys, model_dir, tmp_path, body, named):
    """It used to end in a JSONDecodeError traceback, or compare a list with the settings."""
    output = tmp_path / "sweep"
    output.mkdir()
    (output / "sweep.json").write_text(body)
    code, _, err = run_cli(capsys, "sweep", "--model", model_dir, "--output", output, "--quiet")
    assert code == 2 and err.count("\n") == 1, err
    assert named in err and "repair it, or sweep into another --output" in err


def test_sweep_knows_sources_by_their_files(model_dir, tmp_path, monkeypatch):
    """The same model named by a relative path resumes; an edited task file does not."""
    from sparsellm.config import sweep_config
    from sparsellm.sweep import SweepError, open_directory

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text("task: mine\n")
    values = {"model": str(model_dir), "output": str(tmp_path / "sweep"), "task_dir": str(tasks)}
    open_directory(sweep_config(values))
    monkeypatch.chdir(model_dir.parent)
    open_directory(sweep_config({**values, "model": model_dir.name}))
    (tasks / "mine.yaml").write_text("task: mine\nnum_fewshot: 1\n")
    with pytest.raises(SweepError, match="task_files"):
        open_directory(sweep_config(values))


def test_sweep_cli_writes_the_csv_and_the_plot(capsys, model_dir, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (sparsellm[plot])")
    output = tmp_path / "sweep"
    code, out, err = run_cli(
        capsys,
        "sweep", "--model", model_dir, "--output", output, "--methods", "magnitude",
        "--sparsities", "0.5,0.8", "--calibration", TEXT, "--nsamples", 2, "--seqlen", 32,
        "--dataset", TEXT, "--max-windows", 2, "--device", "cpu", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    rows = read_csv(output / "sweep.csv")
    assert [(r["method"], r["sparsity"]) for r in rows] == [
        ("dense", "0.0"),
        ("magnitude", "0.5"),
        ("magnitude", "0.8"),
    ]
    for row in rows:
        assert f"{float(row['perplexity']):.2f}" in out  # the table shows every point
    plot = (output / "sweep.png").read_bytes()
    assert plot.startswith(PNG) and len(plot) > 10_000
    assert "3 point(s) run, 0 already" in out


def test_sweep_scores_tasks_like_eval(model_dir, tmp_path, tokenizer):
    pytest.importorskip(
        "lm_eval", reason="lm-eval is not installed (pip install 'sparsellm[eval]')"
    )
    from sparsellm.lm_tasks import evaluate_tasks

    output = tmp_path / "sweep"
    values = sweep_values(model_dir, output, methods="magnitude", tasks="sotu_continuation")
    run_sweep({**values, "limit": 4})
    rows = {r["method"]: r for r in read_csv(output / "sweep.csv")}
    own = evaluate_tasks(
        tiny_model("llama"), tokenizer, ["sotu_continuation"], limit=4, progress=False
    )
    dense = float(rows["dense"]["sotu_continuation/acc"])
    assert dense == own.metric("sotu_continuation", "acc")
    assert 0 <= float(rows["magnitude"]["sotu_continuation/acc"]) <= 1


def pruned_reports(tmp_path) -> list:
    """Reports of a tiny LLaMA pruned by magnitude and by SparseGPT (block 1 marked as a
    fallback in the second, as the guard would)."""
    from sparsellm import prune_model

    paths = []
    for method in ("magnitude", "sparsegpt"):
        model = tiny_model("llama")
        ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
        report = prune_model(model, None, method=method, sparsity=0.6, calibration=ids,
                             progress=False, device="cpu")  # fmt: skip
        folder = tmp_path / method
        folder.mkdir()
        data = report.to_dict()
        if method == "sparsegpt":
            data["blocks"][1]["fallback"] = {"method": "sparsegpt", "errors": [2.0, 0.5]}
        (folder / "sparsity_report.json").write_text(json.dumps(data))
        paths.append((folder, data))
    return paths


def test_report_tables_and_plots_outputs_side_by_side(capsys, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (sparsellm[plot])")
    (magnitude, _), (sparsegpt, data) = pruned_reports(tmp_path)
    plot = tmp_path / "depth.png"
    code, out, err = run_cli(capsys, "report", magnitude, sparsegpt, "--plot", plot)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("magnitude 60%: 14 layers, 60.00% zeros, 0 block(s)")
    assert lines[1].startswith("sparsegpt 60%: 14 layers, 60.00% zeros, 1 block(s)")
    block1 = next(line.split() for line in lines if line.split()[:1] == ["1"])
    errors = [r["relative_error"] for r in data["layers"] if r["block"] == 1]
    assert block1[1] == "60.00%" and block1[2] == "-" and block1[3] == "-"  # magnitude: no data
    assert block1[4] == "60.00%"
    assert block1[5] == f"{sum(errors) / len(errors):.3g}"
    assert block1[6] == f"{data['blocks'][1]['output_error']:.3g}*"  # * : fell back
    image = plot.read_bytes()
    assert image.startswith(PNG) and len(image) > 10_000


def test_report_without_matplotlib(capsys, tmp_path, monkeypatch):
    (magnitude, _), _ = pruned_reports(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, out, _ = run_cli(capsys, "report", magnitude)
    assert code == 0 and "magnitude 60%" in out  # the table needs no matplotlib
    code, _, err = run_cli(capsys, "report", magnitude, "--plot", tmp_path / "x.png")
    assert code == 2 and err.count("\n") == 1 and "pip install 'sparsellm[plot]'" in err
    code, _, err = run_cli(capsys, "report", tmp_path / "nothing-here")
    assert code == 2 and "nothing-here" in err
