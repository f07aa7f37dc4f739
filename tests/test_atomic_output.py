"""Atomic output: a failed, interrupted or killed save leaves the complete output or nothing
at the final path, stale temporaries are removed, and the output's mode follows the umask."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import run_cli

from sparsellm import saving


def _prune_args(model_dir: Path, output: Path, calibration_text: Path) -> list:
    return [
        "prune", "--model", model_dir, "--output", output, "--method", "magnitude",
        "--sparsity", "0.5", "--calibration", calibration_text, "--quiet",
    ]  # fmt: skip


def _partial_then(action):
    """A writer that writes one file of the output, then does ``action`` (raise, signal)."""

    def writer(model, tokenizer, directory: Path) -> None:
        (directory / "model.safetensors").write_bytes(b"\0" * 1024)
        action()

    return writer


def _leftovers(parent: Path, output: Path) -> list[str]:
    """Temporaries beside ``output``; the resume record (kept on purpose: ``--resume`` then
    only has to save) is not one."""
    return sorted(
        p.name
        for p in parent.iterdir()
        if p.name.startswith(f".{output.name}.") and not p.name.endswith(".resume")
    )


def _disk_full() -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_saving_leaves_nothing(capsys, monkeypatch, tmp_path, model_dir):
    monkeypatch.setitem(saving.FORMATS, "dense", _partial_then(_disk_full))
    output = tmp_path / "out"
    text = Path(__file__).parent / "fixtures" / "calibration.txt"
    code, _, err = run_cli(capsys, *_prune_args(model_dir, output, text))
    assert code == 2
    assert err.count("\n") == 1 and "No space left on device" in err and "Traceback" not in err
    assert "rerun with --resume" in err
    assert not output.exists() and _leftovers(tmp_path, output) == []
    monkeypatch.undo()  # room again: the rerun only has to write what the record holds
    code, _, err = run_cli(capsys, *_prune_args(model_dir, output, text), "--resume")
    assert code == 0, err
    assert "resuming at block 2 of 2" in err
    assert (output / "model.safetensors").is_file() and not list(tmp_path.glob(".out.*"))


def test_failed_overwrite_keeps_the_old_output(capsys, monkeypatch, tmp_path, model_dir):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("old")
    monkeypatch.setitem(saving.FORMATS, "dense", _partial_then(_disk_full))
    text = Path(__file__).parent / "fixtures" / "calibration.txt"
    code, _, _ = run_cli(capsys, *_prune_args(model_dir, output, text), "--overwrite")
    assert code == 2
    assert [p.name for p in output.iterdir()] == ["keep.txt"]
    assert _leftovers(tmp_path, output) == []


STOPS = [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")]


@pytest.mark.parametrize(("signum", "code", "word"), STOPS)
def test_signal_while_saving_leaves_nothing(
    capsys, monkeypatch, tmp_path, model_dir, signum, code, word
):
    monkeypatch.setitem(
        saving.FORMATS, "dense", _partial_then(lambda: os.kill(os.getpid(), signum))
    )
    output = tmp_path / "out"
    text = Path(__file__).parent / "fixtures" / "calibration.txt"
    got, _, err = run_cli(capsys, *_prune_args(model_dir, output, text))
    assert got == code
    assert err.count("\n") == 1 and word in err and "Traceback" not in err
    assert not output.exists() and _leftovers(tmp_path, output) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back


class _SignalInFinalizer:
    """Sends the signal from ``__del__``: Python raises it there, prints it as "ignored" and
    drops it, as happens when a real Ctrl-C lands during a garbage-collection pass."""

    def __init__(self, signum: int):
        self.signum = signum

    def __del__(self) -> None:
        os.kill(os.getpid(), self.signum)
        sum(range(1000))  # Python code after the kill: the exception is raised (and lost) here


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # on purpose
@pytest.mark.parametrize(("signum", "code", "word"), STOPS)
def test_signal_swallowed_by_a_finalizer_still_stops(
    capsys, monkeypatch, tmp_path, model_dir, signum, code, word
):
    monkeypatch.setitem(saving.FORMATS, "dense", _partial_then(lambda: _SignalInFinalizer(signum)))
    output = tmp_path / "out"
    text = Path(__file__).parent / "fixtures" / "calibration.txt"
    got, _, err = run_cli(capsys, *_prune_args(model_dir, output, text))
    assert got == code
    assert word in err.splitlines()[-1] and "sparsellm:" in err.splitlines()[-1]
    assert not output.exists() and _leftovers(tmp_path, output) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_kill_9_leaves_a_temporary_the_next_run_removes(capsys, tmp_path, model_dir):
    output = tmp_path / "out"
    text = Path(__file__).parent / "fixtures" / "calibration.txt"
    args = [str(a) for a in _prune_args(model_dir, output, text)]
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from sparsellm import saving
        from sparsellm.cli import main
        def writer(model, tokenizer, directory):
            (directory / "model.safetensors").write_bytes(b"0" * 1024)
            os.kill(os.getpid(), signal.SIGKILL)
        saving.FORMATS["dense"] = writer
        sys.exit(main({args!r}))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL
    assert not output.exists()
    (left,) = _leftovers(tmp_path, output)  # the killed run's staging directory
    code, out, err = run_cli(capsys, *args, "--resume")  # every block is in the record
    assert code == 0, err
    assert f"removed {tmp_path / left}" in err
    assert (output / "config.json").is_file() and _leftovers(tmp_path, output) == []


def test_live_temporaries_are_kept(tmp_path):
    output = tmp_path / "out"
    prefix = f".out.staging-{socket.gethostname()}-"
    live = tmp_path / f"{prefix}{os.getpid()}-abc"
    dead = tmp_path / f"{prefix}999999999-abc"
    other_host = tmp_path / ".out.staging-elsewhere-1-abc"
    for path in (live, dead, other_host):
        path.mkdir()
    assert saving.remove_stale_temporaries(output) == [dead]
    assert live.is_dir() and other_host.is_dir() and not dead.exists()


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_output_mode_follows_umask(capsys, tmp_path, model_dir, mask):
    output = tmp_path / "out"
    text = Path(__file__).parent / "fixtures" / "calibration.txt"
    previous = os.umask(mask)
    try:
        code, _, err = run_cli(capsys, *_prune_args(model_dir, output, text))
    finally:
        os.umask(previous)
    assert code == 0, err
    assert output.stat().st_mode & 0o777 == 0o777 & ~mask
    for path in output.iterdir():  # safetensors included: save_pretrained makes them private
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path.name
