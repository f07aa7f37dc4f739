"""Out-of-core pruning (``--offload disk``): the same weights as in memory, one block resident."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, byte_tokenizer, tiny_model
from conftest import run_cli as run
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from sparsellm.api import prune
from sparsellm.config import prune_config
from sparsellm.offload import DiskStore, OffloadedModel, offload_mode


def calibration() -> torch.Tensor:
    return torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(3))


def checkpoint(tmp_path, family: str, sharded: bool):
    """A tiny ``family`` model saved as safetensors: many small shards, or one file."""
    source = tmp_path / f"{family}-src"
    shard_size = "20KB" if sharded else "1GB"
    tiny_model(family).save_pretrained(source, max_shard_size=shard_size)
    byte_tokenizer().save_pretrained(source)
    shards = list(source.glob("*.safetensors"))
    assert (len(shards) > 3) == sharded, [p.name for p in shards]
    return source


def in_memory(source, method: str) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    config = prune_config(dict(method=method, sparsity=0.5, batch_size=4), require_io=False)
    prune(model, None, config, calibration_ids=calibration(), progress=False)
    return model.state_dict()


def offloaded(source, output, method: str):
    model = OffloadedModel(source, "auto")
    store = model.pruning_store(output)
    config = prune_config(dict(method=method, sparsity=0.5, batch_size=4), require_io=False)
    report = prune(
        model.model, None, config, calibration_ids=calibration(), progress=False, store=store
    )
    model.finish({"sparsity_report.json": report})
    return model, store


def assert_same_weights(expected: dict[str, torch.Tensor], output) -> None:
    loaded = AutoModelForCausalLM.from_pretrained(output).state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize(
    "family,method,sharded",
    [
        ("llama", "sparsegpt", True),
        ("llama", "sparsellm", False),
        ("opt", "sparsegpt", False),
        ("opt", "sparsellm", True),
        ("gpt2", "sparsegpt", True),
        ("gpt2", "sparsellm", False),
    ],
)
def test_offload_disk_prunes_bit_for_bit_like_in_memory(tmp_path, family, method, sharded):
    source = checkpoint(tmp_path, family, sharded)
    expected = in_memory(source, method)
    output = tmp_path / "out"
    model, _ = offloaded(source, output, method)
    assert_same_weights(expected, output)
    # one shard per block plus one for the rest; the index lists every tensor written
    index = json.loads((output / "model.safetensors.index.json").read_text())
    blocks = len(model.adapter.blocks())
    assert len(set(index["weight_map"].values())) == blocks + 1
    sizes = sum(t.numel() * t.element_size() for t in load_all(output).values())
    assert index["metadata"]["total_size"] == sizes
    report = json.loads((output / "sparsity_report.json").read_text())
    assert report["totals"]["sparsity"] == pytest.approx(0.5)
    assert not list(tmp_path.glob(".out.*")), "staging directory left behind"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_offloaded_model_scores_like_its_output_loaded_whole(tmp_path, family):
    """Perplexity streamed from the shards written so far (no device given: the skeleton is
    all on meta, so the host) equals the written model's, loaded whole."""
    from sparsellm.evaluation import windows_perplexity

    source = checkpoint(tmp_path, family, sharded=True)
    model = OffloadedModel(source, "auto")
    store = model.pruning_store(tmp_path / "out")
    config = prune_config(dict(method="sparsegpt", sparsity=0.5), require_io=False)
    prune(model.model, None, config, calibration_ids=calibration(), progress=False, store=store)
    windows = calibration()[:3]
    streamed = windows_perplexity(model.model, windows, store=model.output_store())
    assert all(p.is_meta for p in model.model.parameters())  # nothing was left loaded
    model.finish()
    whole = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert streamed == pytest.approx(windows_perplexity(whole, windows), rel=1e-5)


def load_all(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in directory.glob("*.safetensors"):
        tensors.update(load_file(shard))
    return tensors


class CountingStore(DiskStore):
    """Records, at every fetch and release, how many blocks hold real (non-meta) weights."""

    resident_counts: list[int]

    def _resident(self, blocks) -> int:
        return sum(any(not p.is_meta for p in b.parameters()) for b in blocks)

    def fetch(self, index, block, device):
        super().fetch(index, block, device)
        self.resident_counts = getattr(self, "resident_counts", [])
        self.resident_counts.append(self._resident(self.blocks))
        self.head_resident = getattr(self, "head_resident", [])
        self.head_resident.append(not any(p.is_meta for p in self.head.parameters()))

    def release(self, index, block, completed):
        self.resident_counts.append(self._resident(self.blocks))
        super().release(index, block, completed)


@pytest.mark.parametrize("method", ["sparsegpt", "magnitude"])
def test_at_most_one_block_is_resident_while_pruning(tmp_path, method):
    source = checkpoint(tmp_path, "llama", sharded=True)
    model = OffloadedModel(source, "auto")
    blocks = model.adapter.blocks()
    assert all(p.is_meta for p in model.model.parameters())  # nothing is loaded upfront
    CountingStore.blocks, CountingStore.head = blocks, model.model.lm_head
    store = model.pruning_store(tmp_path / "out")
    store.__class__ = CountingStore
    config = prune_config(dict(method=method, sparsity=0.5, batch_size=4), require_io=False)
    prune(model.model, None, config, calibration_ids=calibration(), progress=False, store=store)
    # the chain check visits each block once, then pruning does (magnitude: no check)
    visits = 2 * len(blocks) if method == "sparsegpt" else len(blocks)
    assert len(store.resident_counts) == 2 * visits
    assert max(store.resident_counts) == 1
    # embeddings and head are read for the capture (and the chain check), not kept for pruning
    assert not any(store.head_resident[-len(blocks) :])
    assert all(p.is_meta for p in model.model.parameters())  # everything went back to meta
    # every block's tensors and the rest of the model (written first, read from the source)
    assert set(store.writer.weight_map) == set(model.model.state_dict())


def cli_prune(capsys, source, output, offload: str, *extra):
    return run(
        capsys,
        "prune",
        "--model",
        source,
        "--output",
        output,
        "--offload",
        offload,
        "--method",
        "sparsegpt",
        "--calibration",
        "builtin",
        "--nsamples",
        4,
        "--seqlen",
        32,
        "--quiet",
        *extra,
    )


def test_cli_offload_disk_with_eval_matches_memory(capsys, tmp_path, calibration_text):
    source = checkpoint(tmp_path, "llama", sharded=True)
    evaluation = ("--eval", calibration_text, "--eval-windows", 4)
    figures = {}
    for offload in ("memory", "disk"):
        code, out, err = cli_prune(capsys, source, tmp_path / offload, offload, *evaluation)
        assert code == 0, err
        figures[offload] = json.loads((tmp_path / offload / "sparsity_report.json").read_text())
    assert_same_weights(load_all(tmp_path / "memory"), tmp_path / "disk")
    memory, disk = figures["memory"]["perplexity"], figures["disk"]["perplexity"]
    # streamed block by block vs the whole model: the same sums up to float rounding
    assert disk["dense"] == pytest.approx(memory["dense"], rel=1e-5)
    assert disk["pruned"] == pytest.approx(memory["pruned"], rel=1e-5)
    assert disk["pruned"] != pytest.approx(disk["dense"], rel=1e-6)  # pruning was scored


@pytest.mark.parametrize("model", ["model.gguf", "HuggingFaceTB/SmolLM2-135M"])
def test_offload_disk_refuses_a_source_that_is_not_safetensors(capsys, tmp_path, model):
    if model.endswith(".gguf"):
        (tmp_path / model).write_bytes(b"GGUF not read")
        model = tmp_path / model
    code, out, err = cli_prune(capsys, model, tmp_path / "out", "disk")
    assert code == 2
    assert err.count("\n") == 1 and "--offload disk needs a local directory" in err
    assert str(model) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == (
        ["model.gguf"] if str(model).endswith(".gguf") else []
    )


def test_mismatched_checkpoint_names_are_refused_naming_the_tensor(capsys, tmp_path):
    source = checkpoint(tmp_path, "llama", sharded=False)
    tensors = load_file(source / "model.safetensors")
    tensors["model.layers.1.mlp.upproj.weight"] = tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    code, _, err = cli_prune(capsys, source, tmp_path / "out", "disk")
    assert code == 2 and err.count("\n") == 1
    assert "'model.layers.1.mlp.upproj.weight'" in err and "matches no parameter" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))

    del tensors["model.layers.1.mlp.upproj.weight"]  # now simply missing
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    code, _, err = cli_prune(capsys, source, tmp_path / "out", "disk")
    assert code == 2 and err.count("\n") == 1
    assert "'model.layers.1.mlp.up_proj.weight'" in err and "not in the checkpoint" in err


def test_auto_offloads_when_the_checkpoint_exceeds_free_host_memory(tmp_path, monkeypatch):
    import sparsellm.memory as memory

    source = checkpoint(tmp_path, "llama", sharded=True)
    size = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    monkeypatch.setattr(memory, "host_available", lambda: size - 1)
    assert offload_mode("auto", str(source)) == "disk"
    assert offload_mode("memory", str(source)) == "memory"
    monkeypatch.setattr(memory, "host_available", lambda: size)
    assert offload_mode("auto", str(source)) == "memory"
    assert offload_mode("disk", str(source)) == "disk"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    monkeypatch.setattr(memory, "host_available", lambda: 0)
    assert offload_mode("auto", str(gguf)) == "memory"  # not a safetensors checkpoint
    assert offload_mode("auto", "HuggingFaceTB/SmolLM2-135M") == "memory"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_spilled_batches_read_back_what_was_written(tmp_path, dtype):
    from sparsellm.spill import SpilledBatches

    batches = [torch.randn(n, 5, 7).to(dtype) for n in (3, 1, 2)]
    spilled = SpilledBatches(tmp_path)
    for batch in batches:
        spilled.append(batch)
    assert list(tmp_path.iterdir()) == []  # an unnamed file: nothing to clean up
    assert len(spilled) == 3
    for again, batch in zip(spilled, batches, strict=True):
        assert again.dtype == dtype and torch.equal(again, batch)
    spilled[1] = None  # a consumer drops a batch it is done with: nothing changes
    assert torch.equal(spilled[1], batches[1]) and torch.equal(spilled[2], batches[2])
    with pytest.raises(TypeError):
        spilled[0] = batches[0]
    with pytest.raises(IndexError):
        spilled[3] = None


def test_sparsellm_reads_spilled_inputs_after_a_layerwise_block(tmp_path):
    """Block 0's FFN is partly skipped, so it is pruned layer by layer and its outputs (block
    1's inputs) spill to a file; SparseLLM then reads them back as rows: same weights as in
    memory."""
    source = checkpoint(tmp_path, "llama", sharded=True)
    options = dict(method="sparsellm", sparsity=0.5, skip=r"layers\.0\.mlp\.down_proj")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    prune(model, None, prune_config(options, require_io=False), calibration_ids=calibration())
    offloaded = OffloadedModel(source, "auto")
    store = offloaded.pruning_store(tmp_path / "out")
    config = prune_config(options, require_io=False)
    report = prune(offloaded.model, None, config, calibration_ids=calibration(), store=store)
    offloaded.finish()
    assert [b["path"] for b in report.blocks][:2] == ["layerwise", "residual"]
    assert_same_weights(model.state_dict(), tmp_path / "out")
