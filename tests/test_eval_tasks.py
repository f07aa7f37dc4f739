"""lm-evaluation-harness tasks (issue 16): the offline task files, the lm-eval path on the
model object, the CLI's table and report, and the one-line install hint."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import socket
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli, tiny_model

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "eval" / "tasks"
SKIP_REASON = "lm-eval is not installed (pip install 'sparsellm[eval]'); the CI installs it"


@pytest.fixture(scope="module")
def lm_eval():
    return pytest.importorskip("lm_eval", reason=SKIP_REASON)


def rows(name: str) -> list[dict]:
    with (TASKS / name).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def build_module():
    spec = importlib.util.spec_from_file_location("build_tasks", TASKS / "build_tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_offline_task_files_are_rebuilt_exactly_and_hold_their_answers(tmp_path, monkeypatch):
    build = build_module()
    monkeypatch.setattr(build, "HERE", tmp_path)
    build.main()
    for name in ("sotu_lastword.jsonl", "sotu_continuation.jsonl"):
        assert (tmp_path / name).read_bytes() == (TASKS / name).read_bytes(), name
        assert (TASKS / name).stat().st_size < 1_000_000
    lastword = rows("sotu_lastword.jsonl")
    assert len(lastword) == 189
    for item in lastword:
        assert len(item["context"].split()) >= build.LASTWORD_MIN_CONTEXT
        assert item["target"].isalpha() and len(item["target"]) >= 4
        assert re.search(rf"\b{item['target']}\b", item["context"])  # recoverable from it
    continuation = rows("sotu_continuation.jsonl")
    assert len(continuation) == 268
    text = " ".join(
        (ROOT / "sparsellm" / "resources" / "heldout.txt").read_text(encoding="utf-8").split()
    )
    for item in continuation:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        right = item["choices"][item["label"]]
        assert f"{item['context']} {right}" in text  # the true next sentence
        wrong = [c for i, c in enumerate(item["choices"]) if i != item["label"]]
        assert all(f"{item['context']} {c}" not in text for c in wrong)
    # the answers are not all in one place (chance stays 25%)
    labels = [item["label"] for item in continuation]
    assert all(40 <= labels.count(i) <= 100 for i in range(4))


def scripted_lm(lm_eval, knows: float):
    """An lm-eval LM that, for the first ``knows`` share of each task's items, gives the right
    continuation log-likelihood 0 (greedy) and every other -5; for the rest the reverse."""
    from lm_eval.api.model import LM

    answers: dict[str, tuple[str, bool]] = {}  # context -> (right continuation, known)
    for name, right in (
        ("sotu_lastword.jsonl", lambda r: r["target"]),
        ("sotu_continuation.jsonl", lambda r: r["choices"][r["label"]]),
    ):
        items = rows(name)
        for i, item in enumerate(items):
            answers[item["context"]] = (right(item), i < round(knows * len(items)))

    class Scripted(LM):
        def loglikelihood(self, requests, disable_tqdm=False):
            out = []
            for request in requests:
                context, continuation = request.args
                right, known = answers[context]
                good = (continuation.strip() == right) == known
                out.append((0.0 if good else -5.0, good))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

    return Scripted()


@pytest.mark.parametrize("knows", [1.0, 0.5, 0.0])
def test_a_model_that_knows_the_answers_scores_what_it_knows(lm_eval, knows, monkeypatch):
    from sparsellm.lm_tasks import evaluate_tasks

    def no_network(*args, **kwargs):
        raise AssertionError("a local task reached for the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    results = evaluate_tasks(
        None,
        None,
        ["sotu_lastword", "sotu_continuation"],
        lm=scripted_lm(lm_eval, knows),
        progress=False,
    )
    expected = {
        "sotu_lastword": round(knows * 189) / 189,
        "sotu_continuation": round(knows * 268) / 268,
    }
    for task, acc in expected.items():
        assert results.metric(task, "acc") == pytest.approx(acc, abs=1e-12)
        assert results.tasks[task]["samples"] == (189 if task == "sotu_lastword" else 268)
    assert results.metric("sotu_continuation", "acc_norm") == pytest.approx(
        expected["sotu_continuation"]
    )
    # perplexity of the target word: exp(-mean loglikelihood) with 0 for known, -5 otherwise
    known = round(knows * 189)
    assert results.metric("sotu_lastword", "perplexity") == pytest.approx(
        math.exp(5 * (189 - known) / 189)
    )


def own_logprobs(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """Log-likelihood of ``continuation`` after ``context`` and whether it is the greedy
    continuation, computed here without lm-eval (byte tokenizer: ids concatenate)."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(ctx) - 1 : -1].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(cont)
    total = float(logprobs[torch.arange(len(cont)), target].sum())
    return total, bool((logprobs.argmax(-1) == target).all())


def test_lm_eval_scores_the_model_object_as_computed_by_hand(lm_eval, tokenizer):
    from sparsellm.lm_tasks import evaluate_tasks

    pad = tokenizer.pad_token

    model = tiny_model("llama")
    limit = 6
    results = evaluate_tasks(
        model,
        tokenizer,
        ["sotu_lastword", "sotu_continuation"],
        limit=limit,
        batch_size=4,
        progress=False,
    )
    scored = [
        own_logprobs(model, tokenizer, r["context"], " " + r["target"])
        for r in rows("sotu_lastword.jsonl")[:limit]
    ]
    mean_ll = sum(ll for ll, _ in scored) / limit
    assert results.metric("sotu_lastword", "perplexity") == pytest.approx(
        math.exp(-mean_ll), rel=1e-4
    )
    assert results.metric("sotu_lastword", "acc") == sum(g for _, g in scored) / limit
    right = right_norm = 0
    for item in rows("sotu_continuation.jsonl")[:limit]:
        lls = [own_logprobs(model, tokenizer, item["context"], " " + c)[0] for c in item["choices"]]
        per_char = [ll / len(c) for ll, c in zip(lls, item["choices"], strict=True)]
        right += lls.index(max(lls)) == item["label"]
        right_norm += per_char.index(max(per_char)) == item["label"]
    assert results.metric("sotu_continuation", "acc") == right / limit
    assert results.metric("sotu_continuation", "acc_norm") == right_norm / limit
    assert results.tasks["sotu_continuation"]["samples"] == limit
    assert tokenizer.pad_token == pad  # lm-eval worked on a copy


def test_cli_eval_prints_the_table_and_adds_to_the_model_report(
    lm_eval, capsys, model_dir, tmp_path
):
    model = tmp_path / "pruned"
    model.mkdir()
    for file in Path(model_dir).iterdir():
        (model / file.name).write_bytes(file.read_bytes())
    (model / "sparsity_report.json").write_text(json.dumps({"method": "magnitude"}))
    code, out, err = run_cli(
        capsys,
        "eval", "--model", model, "--tasks", "sotu_continuation", "--limit", 5,
        "--dataset", ROOT / "tests" / "fixtures" / "calibration.txt", "--seqlen", 64,
        "--max-windows", 2, "--quiet",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((model / "sparsity_report.json").read_text())
    assert report["method"] == "magnitude"  # kept
    tasks = report["evaluation"]["tasks"]["sotu_continuation"]
    assert tasks["samples"] == 5 and 0 <= tasks["metrics"]["acc"] <= 1
    row = next(line for line in out.splitlines() if line.startswith("sotu_continuation  acc "))
    assert float(row.split()[2]) == pytest.approx(tasks["metrics"]["acc"], abs=5e-5)
    ppl = report["evaluation"]["perplexity"][str(ROOT / "tests" / "fixtures" / "calibration.txt")]
    assert ppl["windows"] == 2 and f"perplexity {ppl['perplexity']:.4f}" in out


def test_unknown_task_is_one_line(lm_eval, capsys, model_dir, monkeypatch):
    import lm_eval.tasks

    real = lm_eval.tasks.TaskManager

    def local_only(*args, **kwargs):  # lm-eval's own index takes 15 s to build
        return real(*args, **{**kwargs, "include_defaults": False})

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", local_only)
    code, _, err = run_cli(capsys, "eval", "--model", model_dir, "--tasks", "sotu_lastword,nope")
    assert code == 2
    assert err.count("\n") == 1 and "unknown task 'nope'" in err and "sotu_lastword" in err


def test_without_lm_eval_one_line_says_how_to_install(capsys, model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    code, _, err = run_cli(capsys, "eval", "--model", model_dir, "--tasks", "sotu_lastword")
    assert code == 2
    assert err.count("\n") == 1 and "pip install 'sparsellm[eval]'" in err


def test_a_compressed_checkpoint_scores_as_the_pruned_model_in_memory(
    lm_eval, capsys, tmp_path, tokenizer
):
    import sparsellm.compressed  # noqa: F401  (registers the compressed format)
    from sparsellm import prune_model
    from sparsellm.lm_tasks import evaluate_tasks
    from sparsellm.saving import save_model

    model = tiny_model("llama")
    prune_model(model, None, method="magnitude", sparsity=0.6, progress=False, device="cpu")
    output = tmp_path / "compressed"
    save_model(model, tokenizer, output, save_format="compressed")
    assert "sparsellm_compression" in (output / "config.json").read_text()
    report = tmp_path / "scores.json"
    code, _, err = run_cli(
        capsys, "eval", "--model", output, "--tasks", "sotu_continuation", "--limit", 6,
        "--report", report, "--quiet",
    )  # fmt: skip
    assert code == 0, err
    scored = json.loads(report.read_text())["evaluation"]["tasks"]["sotu_continuation"]
    own = evaluate_tasks(model, tokenizer, ["sotu_continuation"], limit=6, progress=False)
    assert scored["metrics"] == own.tasks["sotu_continuation"]["metrics"]
