"""Tiny random-init models of each supported family and a byte-level tokenizer (no network)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURES = Path(__file__).parent / "fixtures"
SHARED = Path(__file__).resolve().parents[2] / "shared"
VOCAB = 256  # one token per byte

# Tiny models gain nothing from threads, and thread spin-waits make them slow on a busy machine.
torch.set_num_threads(1)


# Recorded digests, one table per kind of CPU numerics. BLAS/LAPACK kernels round differently
# on different CPUs (an AMD EPYC with AVX-512 and the machine the first hashes came from agree
# on no case that multiplies matrices; an Intel Xeon with AVX-512 agrees with the EPYC on a
# LLaMA SparseGPT prune and on no GPT-2 or SparseLLM one), so a fixture file holds a list of
# tables, and the one in use is the table whose canary cases have the digests this machine
# computes for them (the first canary always, the others where the table has them: tables
# recorded before a case changed lack it). With none, the checks skip: nothing was recorded for
# these numerics. SPARSELLM_RECORD_HASHES=1 records into this machine's table (a new one if
# there is none).
Canary = tuple[str, Callable[[], str]]  # a case's key and how to compute its digest
# Per fixture file: all its tables and this machine's (an element of them, or None).
_TABLES: dict[Path, tuple[list[dict[str, str]], dict[str, str] | None]] = {}


def _tables(path: Path, canaries: Sequence[Canary]):
    """``path``'s tables and this machine's: the one whose ``canaries`` entries equal their
    digests here (computed once per session); None when none was recorded for these numerics
    (recording: a new one, added to the file)."""
    if path not in _TABLES:
        digests = {key: run() for key, run in canaries}
        first = canaries[0][0]

        def ours(table: dict[str, str]) -> bool:
            return first in table and all(table.get(k, d) == d for k, d in digests.items())

        tables = json.loads(path.read_text())["tables"] if path.exists() else []
        table = next((t for t in tables if ours(t)), None)
        if table is None and os.environ.get("SPARSELLM_RECORD_HASHES"):
            table = dict(digests)
            tables.append(table)
            _write_tables(path, tables)
        _TABLES[path] = tables, table
    return _TABLES[path]


def _write_tables(path: Path, tables: list[dict[str, str]]) -> None:
    ordered = [dict(sorted(t.items())) for t in tables]
    path.write_text(json.dumps({"tables": ordered}, indent=1) + "\n")


def recorded(path: Path, key: str, canaries: Sequence[Canary]) -> str:
    """The digest recorded for ``key`` on machines of this one's numerics (else skip)."""
    table = _tables(path, canaries)[1]
    if table is None:
        names = ", ".join(k for k, _ in canaries)
        pytest.skip(f"no digests in {path.name} for this CPU's rounding (canaries {names})")
    if key not in table:
        pytest.skip(f"{key}: not recorded for this CPU's rounding")
    return table[key]


def check_recorded(
    path: Path, key: str, digest: str, what: str, canaries: Sequence[Canary]
) -> None:
    """Compare ``digest`` with the one recorded under ``key`` for this machine's numerics
    (see :func:`_tables`); with ``SPARSELLM_RECORD_HASHES=1`` record it instead (only for
    an intended change of numbers)."""
    if os.environ.get("SPARSELLM_RECORD_HASHES"):
        tables, table = _tables(path, canaries)
        table[key] = digest
        _write_tables(path, tables)
        return
    assert recorded(path, key, canaries) == digest, f"{key}: {what}"


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``sparsellm ARGV`` in this process: exit code, stdout, stderr."""
    from sparsellm.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def tiny_config(family: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, num_attention_heads=4, num_hidden_layers=2)
    if family == "llama":
        return tf.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_key_value_heads=2, **common
        )
    if family == "qwen2":
        return tf.Qwen2Config(
            hidden_size=64, intermediate_size=128, num_key_value_heads=2, **common
        )
    if family == "opt":
        return tf.OPTConfig(hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, **common)
    if family == "opt350":  # project_in / project_out and post-layer-norm blocks, as OPT-350m
        return tf.OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            word_embed_proj_dim=32,
            do_layer_norm_before=False,
            **common,
        )
    if family == "gpt2":
        return tf.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
        )
    raise ValueError(family)


FAMILIES = ("llama", "qwen2", "opt", "opt350", "gpt2")


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=dtype)
    return model.eval()


def small_llama(seed: int = 0):
    """A 2-block LLaMA with a 128-token vocabulary, for optimizer and fine-tuning tests."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return tf.LlamaForCausalLM(config)


def byte_tokenizer():
    """A fast tokenizer mapping each UTF-8 byte to one id, saveable with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=sorted(alphabet)[0])


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def calibration_text() -> Path:
    return FIXTURES / "calibration.txt"


@pytest.fixture(scope="session")
def calibration_ids(tokenizer, calibration_text) -> torch.Tensor:
    from sparsellm.data import calibration_windows

    return calibration_windows(str(calibration_text), tokenizer, nsamples=16, seqlen=64, seed=0)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny LLaMA saved as an ordinary Hugging Face directory."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
