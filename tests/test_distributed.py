"""Data-parallel calibration: two gloo ranks on CPU prune like one process."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from conftest import VOCAB, tiny_model

from sparsellm import prune_model
from sparsellm.errors import UserError
from sparsellm.optim import sparsifiable_parameters


def calibration() -> torch.Tensor:
    return torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(3))


def prune(method: str) -> torch.nn.Module:
    model = tiny_model("llama")
    prune_model(
        model, method=method, sparsity=0.5, calibration=calibration(), batch_size=2, progress=False
    )
    return model


def _rank(rank: int, world: int, init_file: str, out: str, method: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = prune(method)
        torch.save(model.state_dict(), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "sparsellm"])
def test_two_ranks_prune_like_one_process(tmp_path, method):
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), str(tmp_path), method), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = prune(method)
    names = {name for name, _ in sparsifiable_parameters(single)}
    for name, reference in single.state_dict().items():
        # rank 0's solution is broadcast: the ranks' models are bit-identical
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        if name in names:
            # Gram sums in another order: the same masks, weights equal to float rounding
            assert torch.equal(ranks[0][name] == 0, reference == 0), name
            assert torch.allclose(ranks[0][name], reference, rtol=1e-4, atol=1e-5), name
        else:
            assert torch.equal(ranks[0][name], reference), name


def test_shard_takes_every_nth_window_and_needs_one_per_rank(monkeypatch):
    import sparsellm.distributed as distributed

    windows = torch.arange(10).reshape(5, 2)
    monkeypatch.setattr(distributed, "world", lambda: (1, 2))
    assert torch.equal(distributed.shard(windows), windows[1::2])
    monkeypatch.setattr(distributed, "world", lambda: (0, 8))
    with pytest.raises(UserError, match="5 windows cannot be shared by 8"):
        distributed.shard(windows)


def test_torchrun_prune_writes_once_and_matches_one_process(tmp_path, model_dir, calibration_text):
    import json
    import os
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    common = ["prune", "--model", str(model_dir), "--method", "sparsegpt", "--sparsity", "0.5"]
    common += ["--calibration", str(calibration_text), "--eval", str(calibration_text)]
    common += ["--nsamples", "8", "--seqlen", "32", "--batch-size", "2", "--device", "cpu"]
    common += ["--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launcher += ["--nproc-per-node", "2", "-m", "sparsellm"]
    two = subprocess.run(
        [*launcher, *common, "--output", str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("pruned model written to") == 1  # rank 0 alone reports and writes
    one = subprocess.run(
        [sys.executable, "-m", "sparsellm", *common, "--output", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]

    reports = [
        json.loads((tmp_path / d / "sparsity_report.json").read_text()) for d in ("one", "two")
    ]
    assert reports[1]["config"]["ranks"] == 2
    for stage in ("dense", "pruned"):
        assert reports[1]["perplexity"][stage] == pytest.approx(
            reports[0]["perplexity"][stage], rel=1e-5
        )
    models = [AutoModelForCausalLM.from_pretrained(tmp_path / d) for d in ("one", "two")]
    for (name, a), (_, b) in zip(
        models[0].named_parameters(), models[1].named_parameters(), strict=True
    ):
        assert torch.equal(a == 0, b == 0), name
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), name
