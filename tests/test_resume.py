"""``sparsellm prune --resume``: a run stopped after any block continues to the same bits.

Crashes are simulated deterministically: block ``k``'s prune raises (KeyboardInterrupt, as
Ctrl-C; RuntimeError, as a bug), the final save raises, or a subprocess SIGKILLs itself in the
middle of committing a block. The resumed output must equal an uninterrupted run's tensor for
tensor (``torch.equal``) and report row for report row (timings aside).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, byte_tokenizer, run_cli, tiny_config
from safetensors import safe_open

import sparsellm.guard as guard
from sparsellm.resume import read_batches_into, record_directory, write_tensors

BLOCKS = 4


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A 4-block tiny LLaMA directory (safetensors), so a crash can fall at several places."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("four-blocks")
    config = tiny_config("llama")
    config.num_hidden_layers = BLOCKS
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).eval().save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def args(source: Path, output: Path, method: str, offload: str, *extra: object) -> list:
    calibration = FIXTURES / "calibration.txt"
    return [
        *("prune", "--model", source, "--output", output, "--method", method),
        *("--calibration", calibration, "--nsamples", 8, "--seqlen", 32, "--batch-size", 4),
        *("--device", "cpu", "--offload", offload, "--quiet", *extra),
    ]


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
    """The output of an uninterrupted run, per (method, offload), made once."""
    from sparsellm.cli import main

    made: dict[tuple[str, str], Path] = {}

    def get(method: str, offload: str) -> Path:
        if (method, offload) not in made:
            output = tmp_path_factory.mktemp("reference") / f"{method}-{offload}"
            assert main([str(a) for a in args(source, output, method, offload)]) == 0
            made[method, offload] = output
        return made[method, offload]

    return get


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="pt") as file:
            found.update({name: file.get_tensor(name) for name in file.keys()})  # noqa: SIM118
    return found


def _untimed(value: object) -> object:
    """``value`` without the solver's per-stage seconds (timings differ run to run)."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def assert_same_output(expected: Path, output: Path) -> None:
    """Bit-identical tensors and equal report rows; the record is gone."""
    want, got = tensors(expected), tensors(output)
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name
    reports = [json.loads((d / "sparsity_report.json").read_text()) for d in (expected, output)]
    assert reports[1]["layers"] == reports[0]["layers"]
    assert _untimed(reports[1]["blocks"]) == _untimed(reports[0]["blocks"])
    assert reports[1]["notes"] == reports[0]["notes"]
    assert reports[1]["totals"] == reports[0]["totals"]
    assert not record_directory(output).exists()


def crash_at_block(monkeypatch, block: int, error: type[BaseException] = KeyboardInterrupt):
    """Make block ``block``'s prune raise ``error`` (blocks before it finish normally)."""
    original = guard.prune_guarded

    def prune_guarded(job, *rest, **kwargs):
        if job.index == block:
            raise error("simulated crash")
        return original(job, *rest, **kwargs)

    monkeypatch.setattr(guard, "prune_guarded", prune_guarded)


def crash_while_saving(monkeypatch):
    """Every block finishes; writing the output raises (the record must survive it)."""
    import sparsellm.offload as offload
    import sparsellm.saving as saving

    def fail(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(saving, "save_model", fail)
    monkeypatch.setattr(offload.OffloadedModel, "finish", fail)


def state(output: Path) -> dict:
    return json.loads((record_directory(output) / "state.json").read_text())


@pytest.mark.parametrize(
    ("method", "offload", "block"),
    [
        ("sparsegpt", "memory", 1),
        ("sparsegpt", "disk", 2),
        ("sparsegpt", "memory", BLOCKS),  # all blocks done, the save interrupted
        ("sparsellm", "memory", 3),
        ("sparsellm", "disk", 1),
        ("sparsellm", "disk", BLOCKS),
        ("wanda", "memory", 2),
        ("magnitude", "disk", 3),
    ],
)
def test_resume_after_an_interrupt_equals_an_uninterrupted_run(
    capsys, monkeypatch, tmp_path, source, reference, method, offload, block
):
    output = tmp_path / "out"
    with monkeypatch.context() as patch:
        if block < BLOCKS:
            crash_at_block(patch, block)
        else:
            crash_while_saving(patch)
        code, _, _ = run_cli(capsys, *args(source, output, method, offload))
    assert code == 130
    assert not output.exists()
    assert state(output)["done"] == block

    code, _, err = run_cli(capsys, *args(source, output, method, offload, "--resume"))
    assert code == 0, err
    line = f"resuming at block {block} of {BLOCKS} from {record_directory(output)}"
    assert line in err
    assert_same_output(reference(method, offload), output)


def test_a_run_interrupted_twice_resumes_twice(capsys, monkeypatch, tmp_path, source, reference):
    output = tmp_path / "out"
    for block, resume in ((1, ()), (3, ("--resume",))):
        with monkeypatch.context() as patch:
            crash_at_block(patch, block, RuntimeError)
            with pytest.raises(RuntimeError, match="simulated crash"):
                run_cli(capsys, *args(source, output, "sparsegpt", "memory", *resume))
        assert state(output)["done"] == block
    code, _, err = run_cli(capsys, *args(source, output, "sparsegpt", "memory", "--resume"))
    assert code == 0, err
    assert_same_output(reference("sparsegpt", "memory"), output)


def test_the_guard_sees_the_same_previous_error_after_a_resume(
    capsys, monkeypatch, tmp_path, source
):
    """The one piece of state the engine carries across blocks comes back from the record."""
    seen: dict[str, dict[int, float | None]] = {"whole": {}, "resumed": {}}
    original = guard.prune_guarded

    def spy(run: str, crash: int | None):
        def prune_guarded(job, pruner, fallback, previous):
            if job.index == crash:
                raise KeyboardInterrupt
            seen[run][job.index] = previous
            return original(job, pruner, fallback, previous)

        return prune_guarded

    monkeypatch.setattr(guard, "prune_guarded", spy("whole", None))
    assert run_cli(capsys, *args(source, tmp_path / "a", "sparsegpt", "memory"))[0] == 0
    monkeypatch.setattr(guard, "prune_guarded", spy("resumed", 2))
    assert run_cli(capsys, *args(source, tmp_path / "b", "sparsegpt", "memory"))[0] == 130
    monkeypatch.setattr(guard, "prune_guarded", spy("resumed", None))
    resumed = args(source, tmp_path / "b", "sparsegpt", "memory", "--resume")
    assert run_cli(capsys, *resumed)[0] == 0
    assert seen["resumed"] == seen["whole"]
    assert seen["whole"][2] is not None


KILLER = """
import os, signal, sys
import sparsellm.resume as resume
from sparsellm.cli import main

write_json = resume._write_json

def killed_mid_commit(path, value):
    if path.name == "state.json" and value["done"] == {done}:
        # A torn temporary state, then the kill: the committed state must stay as it was.
        path.with_name(path.name + ".tmp").write_text('{{"done": ')
        os.kill(os.getpid(), signal.SIGKILL)
    write_json(path, value)

resume._write_json = killed_mid_commit
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_while_committing_a_block_loses_only_that_block(capsys, tmp_path, source, reference):
    output = tmp_path / "out"
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(done=3))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, script, *args(source, output, "sparsellm", "disk")]
    killed = subprocess.run([str(c) for c in command], env=env, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert state(output)["done"] == 2  # block 2's activations were written, not committed
    code, _, err = run_cli(capsys, *args(source, output, "sparsellm", "disk", "--resume"))
    assert code == 0, err
    assert "resuming at block 2 of 4" in err
    assert_same_output(reference("sparsellm", "disk"), output)


def interrupted(capsys, monkeypatch, source, output: Path, *extra: object) -> None:
    with monkeypatch.context() as patch:
        crash_at_block(patch, 2)
        assert run_cli(capsys, *args(source, output, "sparsegpt", "memory", *extra))[0] == 130


def test_other_settings_on_resume_are_refused_in_one_line(capsys, monkeypatch, tmp_path, source):
    output = tmp_path / "out"
    interrupted(capsys, monkeypatch, source, output, "--sparsity", "0.5")
    before = state(output)
    code, out, err = run_cli(
        capsys, *args(source, output, "sparsegpt", "memory", "--sparsity", "0.6", "--resume")
    )
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "sparsity: 0.5 then, 0.6 now" in err
    assert state(output) == before  # nothing reused, nothing deleted


def test_changed_model_files_on_resume_are_refused(capsys, monkeypatch, tmp_path, source):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(source, copy)
    output = tmp_path / "out"
    interrupted_args = args(copy, output, "sparsegpt", "memory")
    with monkeypatch.context() as patch:
        crash_at_block(patch, 1)
        assert run_cli(capsys, *interrupted_args)[0] == 130
    os.utime(copy / "model.safetensors", ns=(0, 0))  # as if re-downloaded
    code, _, err = run_cli(capsys, *interrupted_args, "--resume")
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "model.files.model.safetensors" in err


def test_the_same_files_under_another_spelling_resume(
    capsys, monkeypatch, tmp_path, source, reference
):
    """The model and calibration are known by their resolved files: 'fixtures/../fixtures/x'
    is the text the record names (the raw strings were compared, and this was refused)."""
    output = tmp_path / "out"
    interrupted(capsys, monkeypatch, source, output)
    argv = args(source.parent / "." / source.name, output, "sparsegpt", "memory", "--resume")
    argv[argv.index("--calibration") + 1] = FIXTURES / ".." / FIXTURES.name / "calibration.txt"
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "resuming at block 2 of" in err
    assert_same_output(reference("sparsegpt", "memory"), output)


@pytest.mark.parametrize(
    ("name", "damage", "kind"),
    [
        ("block-00001.json", lambda raw: b"garbage", "JSONDecodeError"),
        ("block-00001.json", lambda raw: b'{"layers": 5}', "TypeError"),
        ("block-00001.safetensors", lambda raw: raw[:100], "SafetensorError"),
        ("hidden-r0-00002.safetensors", lambda raw: raw[:100], "JSONDecodeError"),
    ],
)
def test_a_damaged_record_is_one_line(capsys, monkeypatch, tmp_path, source, name, damage, kind):
    """Files the record wrote atomically, damaged afterwards (a disk fault, a hand edit): the
    resume used to end in the JSON or safetensors parser's traceback."""
    output = tmp_path / "out"
    interrupted(capsys, monkeypatch, source, output)
    path = record_directory(output) / name
    path.write_bytes(damage(path.read_bytes()))
    code, _, err = run_cli(capsys, *args(source, output, "sparsegpt", "memory", "--resume"))
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"sparsellm: error: {str(record_directory(output))!r} is damaged ({name}: {kind}); "
        "remove it to start over"
    )
    assert not output.exists()


@pytest.mark.parametrize("keep", [100, -50], ids=["header cut", "data cut"])
def test_a_damaged_offloaded_shard_is_refused_not_linked_into_the_output(
    capsys, monkeypatch, tmp_path, source, keep
):
    """With --offload disk the record's shards become the output. A shard cut short after its
    atomic write (its last 50 bytes gone) used to be linked in as it was: exit 0 and an output
    that does not load."""
    output = tmp_path / "out"
    with monkeypatch.context() as patch:
        crash_at_block(patch, 2)
        assert run_cli(capsys, *args(source, output, "sparsegpt", "disk"))[0] == 130
    shard = sorted((record_directory(output) / "shards").glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:keep])
    code, _, err = run_cli(capsys, *args(source, output, "sparsegpt", "disk", "--resume"))
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"sparsellm: error: {str(shard)!r} in the resume record is damaged (truncated or "
        f"unreadable); remove {str(record_directory(output))!r} to start over"
    )
    assert not output.exists()


def test_a_record_without_resume_is_refused_even_with_overwrite(
    capsys, monkeypatch, tmp_path, source
):
    output = tmp_path / "out"
    interrupted(capsys, monkeypatch, source, output)
    before = state(output)
    for extra in ((), ("--overwrite",)):
        code, _, err = run_cli(capsys, *args(source, output, "sparsegpt", "memory", *extra))
        assert code == 2
        assert len(err.strip().splitlines()) == 1, err
        assert "2 finished block(s)" in err and "pass --resume" in err
        assert str(record_directory(output)) in err
    assert state(output) == before


def test_resume_without_a_record_starts_from_the_first_block(capsys, tmp_path, source, reference):
    output = tmp_path / "out"
    code, _, err = run_cli(capsys, *args(source, output, "wanda", "memory", "--resume"))
    assert code == 0, err
    assert f"--resume: no record at {record_directory(output)}" in err
    assert_same_output(reference("wanda", "memory"), output)


def test_a_full_disk_while_recording_is_one_line_and_the_record_stays_usable(
    capsys, monkeypatch, tmp_path, source, reference
):
    import sparsellm.resume as resume

    output = tmp_path / "out"
    original = resume.write_tensors

    def full_at_block_two(path, tensors, metadata=None):
        if path.name == "hidden-r0-00003.safetensors":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        original(path, tensors, metadata)

    with monkeypatch.context() as patch:
        patch.setattr(resume, "write_tensors", full_at_block_two)
        code, _, err = run_cli(capsys, *args(source, output, "sparsegpt", "memory"))
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "cannot write the resume record" in err and "No space left on device" in err
    assert state(output)["done"] == 2
    assert not list(record_directory(output).glob("*.tmp"))
    code, _, err = run_cli(capsys, *args(source, output, "sparsegpt", "memory", "--resume"))
    assert code == 0, err
    assert_same_output(reference("sparsegpt", "memory"), output)


def test_a_full_disk_while_writing_an_offloaded_shard_is_one_line(
    capsys, monkeypatch, tmp_path, source
):
    import safetensors.torch

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    output = tmp_path / "out"
    code, _, err = run_cli(capsys, *args(source, output, "magnitude", "disk"))
    assert code == 2
    assert err.strip() == (
        f"sparsellm: error: cannot write {str(output)!r}: No space left on device; "
        "nothing was written"
    )
    assert not output.exists()
    assert not list(tmp_path.glob(f".{output.name}.staging-*"))


def test_a_run_stopped_in_its_first_block_leaves_no_record(capsys, monkeypatch, tmp_path, source):
    output = tmp_path / "out"
    for offload in ("memory", "disk"):
        with monkeypatch.context() as patch:
            crash_at_block(patch, 0)
            assert run_cli(capsys, *args(source, output, "sparsegpt", offload))[0] == 130
        assert not record_directory(output).exists()
        assert not output.exists()


def test_a_second_run_into_the_same_output_is_refused_while_the_first_holds_it(tmp_path, source):
    from sparsellm.config import prune_config
    from sparsellm.resume import ResumeError, open_record

    config = prune_config(dict(model=str(source), output=str(tmp_path / "out")))
    first = open_record(config, False, torch.device("cpu"))
    try:
        with pytest.raises(ResumeError, match="in use by another sparsellm run"):
            open_record(config, False, torch.device("cpu"))
    finally:
        first.release()
    assert not record_directory(tmp_path / "out").exists()  # nothing was committed


def test_batches_are_read_back_by_window_whatever_their_cut(tmp_path):
    """A record of batches [4, 4] fills targets cut [3, 5] (a changed device budget)."""
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 5, 6, generator=generator).bfloat16() for _ in range(2)]
    path = tmp_path / "hidden.safetensors"
    write_tensors(path, {f"batch-{i}": b for i, b in enumerate(batches)}, {"windows": "x"})
    targets = [torch.empty(3, 5, 6, dtype=torch.bfloat16), torch.empty(5, 5, 6).bfloat16()]
    assert read_batches_into(path, targets) == {"windows": "x"}
    assert torch.equal(torch.cat(targets), torch.cat(batches))
    with safe_open(path, framework="pt") as file:  # a valid safetensors file
        assert torch.equal(file.get_tensor("batch-1"), batches[1])


CRASHER = """
import sys
import sparsellm.guard as guard
from sparsellm.cli import main

original = guard.prune_guarded

def prune_guarded(job, *rest, **kwargs):
    if job.index == {block}:
        raise KeyboardInterrupt
    return original(job, *rest, **kwargs)

guard.prune_guarded = prune_guarded
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # three torchrun launches of two ranks each (~25 s apiece on two cores)
@pytest.mark.parametrize(
    ("method", "offload", "block"), [("sparsegpt", "memory", 2), ("sparsellm", "disk", 1)]
)
def test_two_ranks_resume_like_an_uninterrupted_two_rank_run(
    tmp_path, source, method, offload, block
):
    """Each rank records and restores its own share of the activations (rank 0 the rest)."""
    script = tmp_path / "crasher.py"
    script.write_text(CRASHER.format(block=block))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launcher += ["--nproc-per-node", "2"]

    def launch(program: list, output: Path, *extra: str) -> subprocess.CompletedProcess:
        command = [*launcher, *program, *args(source, output, method, offload, *extra)]
        return subprocess.run(
            [str(c) for c in command], env=env, capture_output=True, text=True, timeout=300
        )

    whole = launch(["-m", "sparsellm"], tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    output = tmp_path / "resumed"
    assert launch([script], output).returncode != 0
    assert state(output)["done"] == block
    assert sorted(p.name for p in record_directory(output).glob("hidden-*")) == [
        f"hidden-r{rank}-{block:05d}.safetensors" for rank in (0, 1)
    ]
    resumed = launch(["-m", "sparsellm"], output, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stderr.count("resuming at block") == 1  # rank 0 alone says it
    assert_same_output(tmp_path / "whole", output)
