"""``make reliability``: inject each failure a user can meet and print what happened.

Every case runs the CLI as a user would (``python -m sparsellm.cli`` in its own process, tiny
random-init models, local files, no network) and is judged on two things:

- outcome: the exit code expected (2 for bad input, 130 / 143 for SIGINT / SIGTERM, 0 where
  the run must succeed) with one line on stderr and no traceback;
- nothing lost: the output path holds the complete result or nothing (an existing directory
  untouched), no temporaries are left, and a resumed run equals an uninterrupted one.

Usage: python bench/reliability.py [--keep DIR] [--only SUBSTRING]
Prints a Markdown table; exits 1 if any case is not handled.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "fixtures" / "calibration.txt"
sys.path.insert(0, str(ROOT / "tests"))
from conftest import byte_tokenizer  # noqa: E402

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
}


@dataclass
class Run:
    code: int | None
    err: str
    seconds: float


@dataclass
class Verdict:
    outcome: str
    handled: bool
    intact: bool
    note: str = ""


def sparsellm(*argv: object, env: dict | None = None, stop: tuple | None = None) -> Run:
    """Run the CLI; ``stop=(signal, after_text)`` sends the signal once stderr shows the text."""
    command = [sys.executable, "-m", "sparsellm.cli", *map(str, argv)]
    started = time.perf_counter()
    if stop is None:
        done = subprocess.run(command, capture_output=True, text=True, env=env or ENV, timeout=600)
        return Run(done.returncode, done.stderr, time.perf_counter() - started)
    signum, after = stop
    proc = subprocess.Popen(
        command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env or ENV, text=True
    )
    seen = ""
    while after not in seen and proc.poll() is None:
        seen += proc.stderr.read(1)
    if after not in seen:
        raise RuntimeError(f"the run ended before printing {after!r}: cannot stop it there")
    proc.send_signal(signum)
    seen += proc.stderr.read()
    proc.wait(timeout=600)
    return Run(proc.returncode, seen, time.perf_counter() - started)


def python(script: str) -> Run:
    """A Python snippet (patching something) that ends by calling the CLI's ``main``."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    return Run(done.returncode, done.stderr, time.perf_counter() - started)


def message_lines(err: str) -> list[str]:
    """stderr without progress bars (tqdm redraws with carriage returns)."""
    lines = [line.rsplit("\r", 1)[-1] for line in err.splitlines()]
    # A message printed while a bar is drawn shares its line: keep the message.
    lines = [line[line.index("sparsellm:") :] if "sparsellm:" in line else line for line in lines]
    return [line for line in lines if line.strip() and "it/s]" not in line and "|" not in line]


def judged(run: Run, expect: int, intact: bool, note: str = "") -> Verdict:
    lines = message_lines(run.err)
    clean = "Traceback" not in run.err and (expect == 0 or len(lines) == 1)
    outcome = f"exit {run.code}" + (", one line" if len(lines) == 1 else f", {len(lines)} lines")
    if "Traceback" in run.err:
        outcome = f"exit {run.code}, traceback ({_last_line(run.err)})"
    outcome += f", {run.seconds:.0f} s"
    return Verdict(outcome, run.code == expect and clean, intact, note or _last_line(run.err))


def _last_line(err: str) -> str:
    lines = message_lines(err)
    return lines[-1][:140] if lines else ""


class Workspace:
    """Tiny models and inputs, made once."""

    def __init__(self, root: Path):
        self.root = root
        self.llama = self._model("llama", root / "llama", layers=4)
        self.gpt2 = self._model("gpt2", root / "gpt2", layers=2)
        self.count = 0

    def fresh(self, name: str) -> Path:
        self.count += 1
        path = self.root / f"{self.count:02d}-{name}"
        path.mkdir()
        return path

    @staticmethod
    def _model(family: str, path: Path, layers: int) -> Path:
        import transformers as tf

        torch.manual_seed(0)
        if family == "llama":
            config = tf.LlamaConfig(
                vocab_size=256,
                hidden_size=64,
                intermediate_size=128,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_hidden_layers=layers,
                max_position_embeddings=256,
            )
        else:
            config = tf.GPT2Config(
                vocab_size=256,
                n_embd=64,
                n_layer=layers,
                n_head=4,
                n_positions=64,
                bos_token_id=0,
                eos_token_id=0,
            )
        tf.AutoModelForCausalLM.from_config(config).save_pretrained(path)
        byte_tokenizer().save_pretrained(path)
        return path

    def copy(self, source: Path, name: str) -> Path:
        target = self.fresh(name) / "model"
        shutil.copytree(source, target)
        return target


def prune_args(model: Path, output: Path, *more: object, method: str = "sparsegpt") -> list:
    return [
        "prune",
        "--model",
        model,
        "--output",
        output,
        "--method",
        method,
        "--sparsity",
        "0.5",
        "--calibration",
        TEXT,
        "--nsamples",
        8,
        "--seqlen",
        32,
        "--quiet",
        *more,
    ]


def nothing_at(output: Path) -> bool:
    """No output and no temporaries beside it (a resume record may stay: it is what lets
    ``--resume`` continue instead of starting over)."""
    siblings = [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]
    return not output.exists() and all(p.name.endswith(".resume") for p in siblings)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# --------------------------------------------------------------------------------- the cases
CASES: list[tuple[str, Callable[[Workspace], Verdict]]] = []


def case(failure: str):
    def register(fn: Callable[[Workspace], Verdict]) -> Callable[[Workspace], Verdict]:
        CASES.append((failure, fn))
        return fn

    return register


def _bad_input(ws: Workspace, name: str, *argv: object, env: dict | None = None) -> Verdict:
    """A run that must stop with exit 2 and one line, writing nothing."""
    output = ws.fresh(name) / "out"
    run = sparsellm(*argv, "--output", output, env=env) if "prune" in argv else sparsellm(*argv)
    return judged(run, 2, nothing_at(output))


@case("output parent is a file")
def _(ws):
    blocker = ws.fresh("parent-file") / "file"
    blocker.write_text("x")
    output = blocker / "out"
    return judged(sparsellm(*prune_args(ws.llama, output)), 2, blocker.read_text() == "x")


@case("output on a read-only file system")
def _(ws):
    return judged(
        sparsellm(*prune_args(ws.llama, "/proc/sparsellm-out")),
        2,
        not Path("/proc/sparsellm-out").exists(),
    )


@case("existing output, no --overwrite")
def _(ws):
    output = ws.fresh("existing") / "out"
    output.mkdir()
    (output / "keep.txt").write_text("old")
    run = sparsellm(*prune_args(ws.llama, output))
    return judged(run, 2, [p.name for p in output.iterdir()] == ["keep.txt"])


def _saving_fails(ws: Workspace, output: Path, failure: str) -> Run:
    """Prune into ``output`` with a writer that writes part of the model, then runs the
    Python statement ``failure`` (raise, kill)."""
    return python(f"""
        import errno, os, signal, sys
        from sparsellm import saving
        from sparsellm.cli import main
        def writer(model, tokenizer, directory):
            (directory / "model.safetensors").write_bytes(b"0" * 4096)
            {failure}
        saving.FORMATS["dense"] = writer
        sys.exit(main({[str(a) for a in prune_args(ws.llama, output)]!r}))
    """)


@case("disk full while saving")
def _(ws):
    output = ws.fresh("enospc") / "out"
    run = _saving_fails(ws, output, "raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))")
    return judged(run, 2, nothing_at(output))


def _stopped(ws: Workspace, name: str, signum: int, expect: int, *more: object) -> Verdict:
    output = ws.fresh(name) / "out"
    args = [a for a in prune_args(ws.llama, output, *more, method="sparsellm") if a != "--quiet"]
    run = sparsellm(*args, stop=(signum, "pruning"))
    return judged(run, expect, nothing_at(output))


@case("Ctrl-C while pruning")
def _(ws):
    return _stopped(ws, "sigint", signal.SIGINT, 130)


@case("SIGTERM while pruning")
def _(ws):
    return _stopped(ws, "sigterm", signal.SIGTERM, 143)


@case("SIGTERM while pruning over an existing output (--overwrite)")
def _(ws):
    output = ws.fresh("sigterm-overwrite") / "out"
    output.mkdir()
    (output / "keep.txt").write_text("old")
    args = [
        a for a in prune_args(ws.llama, output, "--overwrite", method="sparsellm") if a != "--quiet"
    ]
    run = sparsellm(*args, stop=(signal.SIGTERM, "pruning"))
    return judged(run, 143, [p.name for p in output.iterdir()] == ["keep.txt"])


@case("kill -9 while pruning, then run again (--resume)")
def _(ws):
    output = ws.fresh("kill9") / "out"
    args = [a for a in prune_args(ws.llama, output, method="sparsellm") if a != "--quiet"]
    killed = sparsellm(*args, stop=(signal.SIGKILL, "pruning"))
    empty = not output.exists()
    run = sparsellm(*prune_args(ws.llama, output, "--resume", method="sparsellm"))
    left = [p for p in output.parent.iterdir() if p.name.startswith(".out.")]
    intact = empty and killed.code == -signal.SIGKILL and (output / "config.json").is_file()
    return judged(run, 0, intact and not left, f"killed: exit {killed.code}; rerun cleaned up")


@case("kill -9 after block 2 of 4, then --resume")
def _(ws):
    base = ws.fresh("resume")
    reference, output = base / "reference", base / "out"
    sparsellm(*prune_args(ws.llama, reference, method="sparsellm"))
    args = [a for a in prune_args(ws.llama, output, method="sparsellm") if a != "--quiet"]
    killed = sparsellm(*args, stop=(signal.SIGKILL, "2/4"))
    run = sparsellm(*prune_args(ws.llama, output, "--resume", method="sparsellm"))
    intact = output.is_dir() and same_weights(reference, output)
    return judged(
        run,
        0,
        intact,
        f"killed: exit {killed.code}; resumed weights {'bit-identical' if intact else 'DIFFER'}",
    )


@case("stale temporary from a killed run")
def _(ws):
    output = ws.fresh("stale") / "out"
    stale = output.parent / f".out.staging-{socket.gethostname()}-999999999-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"0")
    run = sparsellm(*prune_args(ws.llama, output))
    return judged(run, 0, not stale.exists() and (output / "config.json").is_file())


@case("output mode follows the umask (022)")
def _(ws):
    output = ws.fresh("umask") / "out"
    previous = os.umask(0o022)
    try:
        run = sparsellm(*prune_args(ws.llama, output))
    finally:
        os.umask(previous)
    mode = output.stat().st_mode & 0o777 if output.exists() else 0
    return judged(run, 0, mode == 0o755, f"mode {mode:o}")


@case("pickle-only checkpoint")
def _(ws):
    model = ws.copy(ws.llama, "pickle")
    state = weights(model)
    for file in model.glob("*.safetensors"):
        file.unlink()
    torch.save(state, model / "pytorch_model.bin")
    return _bad_input(ws, "pickle-out", *_prune_with(model))


@case("pickle-only checkpoint with --allow-pickle")
def _(ws):
    model = ws.copy(ws.llama, "pickle-allowed")
    state = weights(model)
    for file in model.glob("*.safetensors"):
        file.unlink()
    torch.save(state, model / "pytorch_model.bin")
    output = model.parent / "out"
    run = sparsellm(*prune_args(model, output, "--allow-pickle"))
    return judged(run, 0, (output / "config.json").is_file())


@case("model needs remote code, no --trust-remote-code")
def _(ws):
    model = ws.copy(ws.llama, "remote-code")
    marker = model.parent / "code-ran"
    (model / "custom.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlamaConfig\n\n\nclass CustomConfig(LlamaConfig):\n"
        "    model_type = 'custom-llama'\n"
    )
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig"}
    (model / "config.json").write_text(json.dumps(config))
    verdict = _bad_input(ws, "remote-out", *_prune_with(model))
    verdict.intact = verdict.intact and not marker.exists()
    return verdict


def _prune_with(model: Path, *more: object) -> list:
    return [a for a in prune_args(model, "unused", *more) if a not in ("--output", "unused")]


@case("calibration windows longer than the positions (GPT-2)")
def _(ws):
    return _bad_input(ws, "positions", *_prune_with(ws.gpt2, "--seqlen", 128))


@case("eval windows longer than the positions (sparsellm eval)")
def _(ws):
    return _bad_input(
        ws,
        "eval-positions",
        "eval",
        "--model",
        ws.gpt2,
        "--dataset",
        TEXT,
        "--seqlen",
        128,
        "--quiet",
    )


@case("token ids beyond the vocabulary (.pt)")
def _(ws):
    ids = ws.fresh("vocab") / "ids.pt"
    torch.save(torch.full((4, 32), 300), ids)
    argv = _prune_with(ws.llama)
    argv[argv.index("--calibration") + 1] = ids
    return _bad_input(ws, "vocab-out", *argv)


@case("truncated safetensors file")
def _(ws):
    model = ws.copy(ws.llama, "truncated")
    (file,) = model.glob("*.safetensors")
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    return _bad_input(ws, "truncated-out", *_prune_with(model))


@case("tensor shape disagrees with the config")
def _(ws):
    model = ws.copy(ws.llama, "shape")
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] = 96
    (model / "config.json").write_text(json.dumps(config))
    return _bad_input(ws, "shape-out", *_prune_with(model))


@case("--device cuda on a machine without CUDA")
def _(ws):
    if torch.cuda.is_available():
        return Verdict("not applicable (CUDA present)", True, True)
    return _bad_input(ws, "cuda", *_prune_with(ws.llama, "--device", "cuda"))


@case("non-UTF-8 calibration text")
def _(ws):
    text = ws.fresh("latin1") / "text.txt"
    text.write_bytes(TEXT.read_bytes()[:2000] + "café".encode("latin-1") + b" more text")
    argv = _prune_with(ws.llama)
    argv[argv.index("--calibration") + 1] = text
    return _bad_input(ws, "latin1-out", *argv)


@case("calibration text too short for nsamples x seqlen")
def _(ws):
    text = ws.fresh("short") / "text.txt"
    text.write_text("only a few words")
    argv = _prune_with(ws.llama)
    argv[argv.index("--calibration") + 1] = text
    return _bad_input(ws, "short-out", *argv)


@case("recipe: value of the wrong type")
def _(ws):
    recipe = ws.fresh("recipe-type") / "r.toml"
    recipe.write_text('seed = "zero"\n')  # a key the flags below do not override
    verdict = _bad_input(ws, "recipe-type-out", *_prune_with(ws.llama, "--recipe", recipe))
    verdict.handled = verdict.handled and "seed" in verdict.note
    return verdict


@case("recipe: unknown key")
def _(ws):
    recipe = ws.fresh("recipe-key") / "r.toml"
    recipe.write_text("sparsty = 0.5\n")
    verdict = _bad_input(ws, "recipe-key-out", *_prune_with(ws.llama, "--recipe", recipe))
    verdict.handled = verdict.handled and "sparsty" in verdict.note
    return verdict


@case("corrupt tokenizer.json")
def _(ws):
    model = ws.copy(ws.llama, "tokenizer")
    (model / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nonsense"}}')
    return _bad_input(ws, "tokenizer-out", *_prune_with(model))


@case("hub id with no network (not offline-flagged)")
def _(ws):
    env = {k: v for k, v in ENV.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(ws.fresh("hf-home")))
    verdict = _bad_input(ws, "hub", *_prune_with("someone/some-model"), env=env)
    verdict.handled = verdict.handled and float(verdict.outcome.split(", ")[-1][:-2]) < 30
    return verdict


def _with_nan(ws: Workspace, name: str, tensor: str) -> Path:
    """A copy of the tiny LLaMA whose ``tensor`` holds one NaN."""
    from safetensors.torch import save_file

    model = ws.copy(ws.llama, name)
    (file,) = model.glob("*.safetensors")
    state = weights(model)
    state[tensor][0, 0] = float("nan")
    save_file(state, file, metadata={"format": "pt"})
    return model


@case("NaN in a weight")
def _(ws):
    model = _with_nan(ws, "nan", "model.layers.2.mlp.up_proj.weight")
    verdict = _bad_input(ws, "nan-out", *_prune_with(model))
    verdict.handled = verdict.handled and "layers.2.mlp.up_proj" in verdict.note
    return verdict


@case("model path does not exist")
def _(ws):
    return _bad_input(ws, "missing", *_prune_with(ws.root / "no-such-model"))


@case("sparsity out of range")
def _(ws):
    argv = _prune_with(ws.llama)
    argv[argv.index("--sparsity") + 1] = "1.5"
    return _bad_input(ws, "sparsity", *argv)


@case("--resume with other settings than the record's")
def _(ws):
    output = ws.fresh("resume-mismatch") / "out"
    args = [a for a in prune_args(ws.llama, output, method="sparsellm") if a != "--quiet"]
    sparsellm(*args, stop=(signal.SIGKILL, "2/4"))
    run = sparsellm(*prune_args(ws.llama, output, "--resume", "--seed", 1, method="sparsellm"))
    return judged(run, 2, not output.exists())


@case("kill -9 while saving")
def _(ws):
    output = ws.fresh("kill9-save") / "out"
    run = _saving_fails(ws, output, "os.kill(os.getpid(), signal.SIGKILL)")
    return Verdict(f"exit {run.code}", run.code == -signal.SIGKILL, not output.exists())


@case("Ctrl-C during the dense evaluation (--eval)")
def _(ws):
    output = ws.fresh("sigint-load") / "out"
    args = [a for a in prune_args(ws.llama, output) if a != "--quiet"]
    run = sparsellm(*args, "--eval", TEXT, stop=(signal.SIGINT, "perplexity"))
    return judged(run, 130, nothing_at(output))


@case("finetune into an unwritable output")
def _(ws):
    return _bad_input(
        ws,
        "finetune",
        "finetune",
        "--model",
        ws.llama,
        "--output",
        "/proc/sparsellm-finetune",
        "--data",
        TEXT,
        "--quiet",
    )


@case("bad --skip regex, bad --pattern")
def _(ws):
    first = _bad_input(ws, "skip", *_prune_with(ws.llama, "--skip", "layers.(0"))
    second = _bad_input(ws, "pattern", *_prune_with(ws.llama, "--pattern", "5:4"))
    return second if first.handled and first.intact else first


@case("--skip that matches no layer (a typo)")
def _(ws):
    verdict = _bad_input(ws, "skip-none", *_prune_with(ws.llama, "--skip", r"layer\.0\."))
    verdict.handled = verdict.handled and "matches none" in verdict.note
    return verdict


@case("eval of a checkpoint holding NaN")
def _(ws):
    model = _with_nan(ws, "eval-nan", "model.layers.1.self_attn.v_proj.weight")
    run = sparsellm("eval", "--model", model, "--dataset", TEXT, "--seqlen", 32, "--quiet")
    verdict = judged(run, 2, not (model / "sparsity_report.json").exists())
    verdict.handled = verdict.handled and "layers.1.self_attn.v_proj" in verdict.note
    return verdict


@case("finetune that diverges (--lr 1e30)")
def _(ws):
    output = ws.fresh("diverge") / "out"
    args = ("--data", TEXT, "--steps", 3, "--seqlen", 32, "--lr", "1e30", "--quiet")
    run = sparsellm("finetune", "--model", ws.llama, "--output", output, *args)
    verdict = judged(run, 1, nothing_at(output))
    verdict.handled = verdict.handled and "diverged" in verdict.note
    return verdict


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="work in this directory and keep it")
    parser.add_argument("--only", help="run only cases whose name contains this")
    args = parser.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="sparsellm-reliability-"))
    root.mkdir(parents=True, exist_ok=True)
    ws = Workspace(root)
    rows = []
    for failure, run in CASES:
        if args.only and args.only not in failure:
            continue
        try:
            verdict = run(ws)
        except Exception as exc:  # a probe bug must not hide the other cases
            verdict = Verdict(f"probe error: {type(exc).__name__}: {exc}", False, False)
        rows.append((failure, verdict))
        print(
            f"{'ok ' if verdict.handled and verdict.intact else 'BAD'} {failure}: "
            f"{verdict.outcome}; {verdict.note}",
            file=sys.stderr,
            flush=True,
        )
    print("| failure | outcome | nothing lost | handled |\n|---|---|---|---|")
    for failure, v in rows:
        ok = v.handled and v.intact
        print(
            f"| {failure} | {v.outcome} | {'yes' if v.intact else 'NO'} | {'yes' if ok else 'NO'} |"
        )
    handled = sum(v.handled and v.intact for _, v in rows)
    print(f"\n{handled}/{len(rows)} handled")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if handled == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
