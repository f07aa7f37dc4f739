"""``sparsellm plan``: the shape read from a config, the CLI, the checks before a model loads,
and the memory model against the bytes a CPU prune really holds."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import FAMILIES, tiny_config
from conftest import run_cli as run
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sparsellm.api import prune_model
from sparsellm.engine import _hidden_width, block_shape
from sparsellm.memory import BlockShape, Budget
from sparsellm.models import get_adapter
from sparsellm.plan import Workload, mode_figures
from sparsellm.shapes import config_sizes

CONFIGS = Path(__file__).parent / "fixtures" / "configs"


@pytest.mark.parametrize("family", FAMILIES)
def test_shape_from_config_is_the_engines_shape_of_the_built_model(family):
    model = tf.AutoModelForCausalLM.from_config(tiny_config(family))
    adapter = get_adapter(model)
    built = block_shape(adapter, adapter.blocks()[0], _hidden_width(model))
    assert BlockShape.of_config(model.config, torch.float32) == built
    sizes = config_sizes(model.config)
    total = sizes.layers * sizes.block_params + sizes.other_params
    assert total == sum(p.numel() for p in model.parameters())


def test_plan_cli_json_and_table(capsys):
    model = CONFIGS / "llama-2-7b"
    argv = ["plan", "--model", model, "--nsamples", 128, "--seqlen", 2048]
    code, out, err = run(capsys, *argv, "--method", "sparsellm", "--dtype", "float16", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert set(plan["modes"]) == {"memory", "disk", "8 ranks", "8 ranks, disk"}
    memory = plan["modes"]["memory"]
    assert set(memory) >= {"device_peak", "device_minimum", "host_peak", "host_total", "disk"}
    assert memory["disk"] == 6_738_415_616 * 2  # LLaMA-2-7B's parameters in float16
    assert memory["device_peak"] <= 24 * 2**30 and memory["device_minimum"] <= 20 * 2**30
    assert plan["modes"]["disk"]["host_peak"] < memory["host_peak"]
    code, out, _ = run(capsys, *argv)
    assert code == 0 and "device peak" in out and "24GiB" in out


@pytest.mark.parametrize(
    "argv",
    [
        ("--model", "/no/such/model"),
        ("--model", CONFIGS / "llama-2-7b", "--method", "nope"),
        ("--model", CONFIGS / "llama-2-7b", "--device-memory", "lots"),
    ],
)
def test_plan_cli_refuses_bad_input_in_one_line(capsys, argv):
    code, out, err = run(capsys, "plan", *argv)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_pretrained", refuse)


def test_short_calibration_fails_before_the_model_loads(
    capsys, tmp_path, model_dir, calibration_text, no_model_load
):
    argv = ["prune", "--model", model_dir, "--output", tmp_path / "out", "--quiet"]
    code, _, err = run(
        capsys, *argv, "--calibration", calibration_text, "--nsamples", 10**6, "--seqlen", 64
    )
    assert code == 2 and "fewer than nsamples × seqlen" in err, err


def test_seqlen_past_the_models_positions_fails_before_the_model_loads(
    capsys, tmp_path, model_dir, calibration_text, no_model_load
):
    argv = ["prune", "--model", model_dir, "--output", tmp_path / "out", "--quiet"]
    code, _, err = run(capsys, *argv, "--calibration", calibration_text, "--seqlen", 10**5)
    assert code == 2 and "max_position_embeddings" in err and "seqlen 100000" in err, err


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages ops create while active, and their peak: each storage
    counts from the op that made it until it is freed (a weakref finalizer on the storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key not in self.live and storage.nbytes() > 0:
                self.live[key] = storage.nbytes()
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self._free, key)
        return out


def _measured_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=256, hidden_size=256, num_hidden_layers=2, num_attention_heads=4)
    if family == "llama":
        config = tf.LlamaConfig(intermediate_size=768, num_key_value_heads=2, **common)
    else:
        config = tf.OPTConfig(ffn_dim=1024, word_embed_proj_dim=256, **common)
    return tf.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("method", ["sparsegpt", "sparsellm"])
def test_plan_matches_the_bytes_a_cpu_prune_holds(family, method):
    nsamples, seqlen = 32, 128
    model = _measured_model(family)
    ids = torch.randint(0, 256, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    with LiveBytes() as live:
        prune_model(model, calibration=ids, method=method, device="cpu", progress=False)
    # Bytes still held after the run are not the prune's working set (the chain check's and
    # transformers' output-recording leftovers, a few forward buffers): left out of the peak.
    measured = live.peak - live.now
    sizes = config_sizes(model.config)
    shape = BlockShape.of_config(model.config, torch.float32)
    if method == "sparsellm":  # the FFN's ADMM eigh: LAPACK's own workspace (dsyevd, 2n²
        measured += 2 * shape.intermediate**2 * 8  # doubles) is memory no torch op allocates
    work = Workload(method, nsamples, seqlen, device_type="cpu")
    figures = mode_figures(shape, sizes.other_params, sizes.layers, work, Budget(None))
    # On the CPU the device is the host: everything held beyond the model's own weights.
    model_bytes = figures["disk"]
    planned = figures["host_peak"] - model_bytes + figures["device_peak"] - shape.params * 4
    assert planned == pytest.approx(measured, rel=0.15), (planned, measured)


@pytest.mark.parametrize("command", ["plan", "prune"])
def test_a_corrupt_gguf_is_one_line_before_anything_loads(capsys, tmp_path, command):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + bytes(range(40)))
    argv = [command, "--model", fake]
    if command == "prune":
        argv += ["--output", tmp_path / "out", "--quiet"]
    code, out, err = run(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "model.gguf" in err, err
    assert not (tmp_path / "out").exists()
