"""Load a causal LM and its tokenizer from a hub id, a local directory or a ``.gguf`` file.

A model source is untrusted input, so loading checks what it can before ``transformers`` runs:

- a pickle checkpoint (``pytorch_model.bin``) is refused unless ``allow_pickle`` (unpickling
  can run arbitrary code); hub downloads ask for safetensors (``use_safetensors=True``);
- a repository's own Python code (``auto_map`` in ``config.json``) runs only with
  ``trust_remote_code``; the flag is passed to every ``from_pretrained``;
- safetensors files whose header promises more bytes than the file has (a truncated copy) are
  named before anything is read (:func:`check_safetensors`);
- after loading, a weight the checkpoint lacks or whose shape disagrees with the config is an
  error, where ``transformers`` would only warn and fill it with random numbers;
- a hub id is looked up in the local cache first; when it is not there, the hub endpoint is
  probed once with a short timeout, so an offline machine fails in seconds instead of after
  ``huggingface_hub``'s retries.

Every failure is a one-line :class:`ModelLoadError` naming the source and what to do.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from sparsellm.data import one_line
from sparsellm.errors import UserError

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
SAFETENSORS_INDEX = "model.safetensors.index.json"
HUB_TIMEOUT = 3.0  # seconds to wait for the hub endpoint to accept a connection
DEFAULT_ENDPOINT = "https://huggingface.co"
_HEADER_LIMIT = 100 * 1024**2  # safetensors refuses larger headers too
_METADATA_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)
_PICKLE_RISK = "unpickling can run arbitrary code"
_REMOTE_HINT = "pass --trust-remote-code if you trust its source (the code runs as you)"


class ModelLoadError(UserError):
    """The model could not be found or loaded."""


def resolve_dtype(name: str, device: torch.device) -> torch.dtype | str:
    """``auto`` keeps the checkpoint's dtype on accelerators and uses float32 on the CPU,
    where half-precision matmuls are slow or missing."""
    if name == "auto":
        return "auto" if device.type != "cpu" else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}") from None


def _drop_gguf_flag(model: torch.nn.Module) -> torch.nn.Module:
    """Make a GGUF-loaded model a plain one: its weights are already dequantised, but the
    quantiser flag makes ``save_pretrained`` refuse. Done in place to avoid a second copy."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model


def model_location(spec: str) -> tuple[str, dict]:
    """Where ``transformers`` finds ``spec`` (hub id, directory, ``.gguf`` file) and the extra
    keyword a ``.gguf`` file needs; a one-line :class:`ModelLoadError` for a path that cannot
    be a model."""
    path = Path(spec)
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"model file {spec!r} does not exist")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory {spec!r} has no config.json")
        return str(path), {}
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelLoadError(f"model path {spec!r} does not exist")
    return spec, {}


def _local_directory(spec: str) -> Path | None:
    """The model directory ``spec`` names, or ``None`` (a hub id, a ``.gguf`` file)."""
    location, extra = model_location(spec)
    path = Path(location)
    return path if not extra and path.is_dir() else None


# ----------------------------------------------------------------------- checks before loading


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files ``transformers`` would read from ``directory``."""
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
            if not all(isinstance(name, str) for name in names):
                raise TypeError("a shard name is not a string")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelLoadError(
                f"{str(index)!r} is not a valid safetensors index (JSON with a 'weight_map')"
            ) from None
        return [directory / name for name in names]
    single = directory / "model.safetensors"
    return [single] if single.is_file() else []


def check_safetensors(path: Path) -> dict:
    """The header of the safetensors file ``path`` (tensor name -> dtype, shape, offsets);
    ``ModelLoadError`` naming ``path`` when it is missing, its header is not readable, or the
    header describes more bytes than the file holds (an interrupted download or copy). Reads
    the header only."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            raw = handle.read(length) if 0 <= length <= _HEADER_LIMIT else b""
    except OSError as exc:
        raise ModelLoadError(f"cannot read checkpoint file {str(path)!r}: {exc.strerror}") from None
    if length < 0 or length > size - 8:
        raise ModelLoadError(_truncated(path, size, 8 + max(length, 0)))
    try:
        header = json.loads(raw)
    except ValueError:  # UnicodeDecodeError included
        raise ModelLoadError(
            f"checkpoint file {str(path)!r} is not a safetensors file (unreadable header)"
        ) from None
    end = _data_end(path, header)
    if 8 + length + end > size:
        raise ModelLoadError(_truncated(path, size, 8 + length + end))
    return header


def _data_end(path: Path, header: object) -> int:
    """Where the last tensor of a safetensors ``header`` ends, relative to the data."""
    try:
        return max(
            (int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"),
            default=0,
        )
    except (AttributeError, KeyError, TypeError, IndexError, ValueError):
        raise ModelLoadError(
            f"checkpoint file {str(path)!r} has a malformed safetensors header"
        ) from None


def _truncated(path: Path, size: int, expected: int) -> str:
    """The message for a safetensors file shorter than its header says (at least ``expected``
    bytes)."""
    return (
        f"checkpoint file {str(path)!r} is truncated: it has {size:,} bytes, its header "
        f"describes {expected:,}; download or copy it again"
    )


def check_checkpoint(spec: str, allow_pickle: bool = False) -> None:
    """Before loading a local directory: refuse a pickle-only checkpoint unless
    ``allow_pickle``, and check every safetensors file's header against its size."""
    directory = _local_directory(spec)
    if directory is None:
        return
    files = _weight_files(directory)
    if not files:
        pickles = [name for name in PICKLE_WEIGHTS if (directory / name).is_file()]
        if pickles and not allow_pickle:
            raise ModelLoadError(
                f"model directory {spec!r} holds only a pickle checkpoint ({pickles[0]}) and "
                f"{_PICKLE_RISK}: pass --allow-pickle if you trust its source, or convert it "
                "to safetensors"
            )
    for path in files:
        check_safetensors(path)


def _expected_shapes(config: object, trust_remote_code: bool) -> dict[str, list[int]]:
    """Name -> shape of every tensor of the model ``config`` builds, built on the ``meta``
    device (no memory, no weights); empty when the auto classes cannot build it (the loader
    then reports it in its own terms)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"), quiet_transformers():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # any config the auto classes cannot build: no expectation
        return {}
    return {name: list(tensor.shape) for name, tensor in model.state_dict().items()}


def check_shapes(spec: str, config: object, trust_remote_code: bool = False) -> None:
    """Before loading a local safetensors checkpoint: every tensor whose name the model built
    from ``config`` has must have that tensor's shape. ``transformers`` would re-initialise a
    mismatched one at random (and the disk-offload path would prune the stored one against the
    wrong config). Tensors under other names are left to the loader's own check
    (:func:`check_loading_info`); quantised checkpoints store packed shapes and are skipped."""
    directory = _local_directory(spec)
    if directory is None or getattr(config, "quantization_config", None):
        return
    stored = {
        name: (path, info.get("shape") if isinstance(info, dict) else None)
        for path in _weight_files(directory)
        for name, info in check_safetensors(path).items()
        if name != "__metadata__"
    }
    expected = _expected_shapes(config, trust_remote_code) if stored else {}
    wrong = sorted(n for n, (_, shape) in stored.items() if n in expected and shape != expected[n])
    if wrong:
        path, shape = stored[wrong[0]]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise ModelLoadError(
            f"checkpoint file {str(path)!r}: tensor {wrong[0]} has shape {shape} but the "
            f"model's config makes it {expected[wrong[0]]}{more}; the checkpoint and its "
            "config.json do not belong together"
        )


def _json_object(path: Path) -> dict:
    """The JSON object in ``path`` (empty when unreadable: the loader then reports the file
    in its own terms)."""
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def code_references(auto_map: object) -> list[str]:
    """The ``module.Class`` names an ``auto_map`` points to (values are a name or a list of
    names and nulls, as tokenizers give slow and fast classes)."""
    if not isinstance(auto_map, dict):
        return []
    names = []
    for value in auto_map.values():
        names += value if isinstance(value, list) else [value]
    return sorted({str(name) for name in names if name})


def refuse_remote_code(spec: str, references: list[str], model_type: object) -> None:
    """``ModelLoadError`` for a model that comes with its own code (``references``) when
    ``--trust-remote-code`` was not given; nothing of the code is imported. With the flag off
    ``transformers`` would quietly use its own classes for a known ``model_type`` instead of
    the repository's: a different model than its authors ship, so the user decides."""
    if not references:
        return
    from transformers import CONFIG_MAPPING

    known = isinstance(model_type, str) and model_type in CONFIG_MAPPING
    instead = (
        f", or delete 'auto_map' from its config.json to load it with transformers' own "
        f"{model_type!r} classes"
        if known
        else ""
    )
    raise ModelLoadError(
        f"model {spec!r} comes with its own Python code ({', '.join(references)}): "
        f"{_REMOTE_HINT}{instead}"
    )


def check_remote_code(spec: str, trust_remote_code: bool = False) -> None:
    """Without ``trust_remote_code``, refuse a local model whose ``config.json`` or
    ``tokenizer_config.json`` maps classes to its own Python files (``auto_map``), before
    anything of it is imported. (Hub ids: their loaded config is checked, see
    :func:`sparsellm.preflight.load_config`.)"""
    directory = _local_directory(spec)
    if directory is None or trust_remote_code:
        return
    config = _json_object(directory / "config.json")
    references = code_references(config.get("auto_map"))
    references += code_references(_json_object(directory / "tokenizer_config.json").get("auto_map"))
    refuse_remote_code(spec, sorted(set(references)), config.get("model_type"))


# ------------------------------------------------------------------------- the hub, offline


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    """Whether the user switched the hub off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(
        os.environ.get("TRANSFORMERS_OFFLINE")
    )


def hub_endpoint() -> str:
    """The hub URL downloads go to (``HF_ENDPOINT``, read now so tests can set it)."""
    return os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT


def _probe_address(endpoint: str) -> tuple[str, int]:
    """Host and port a connection to ``endpoint`` goes to first: its proxy when one is set."""
    url = urllib.parse.urlsplit(endpoint)
    scheme = url.scheme or "https"
    host = url.hostname or ""
    proxy = urllib.request.getproxies().get(scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxied = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return proxied.hostname or "", proxied.port or 80
    return host, url.port or (443 if scheme == "https" else 80)


def hub_unreachable(endpoint: str, timeout: float = HUB_TIMEOUT) -> str | None:
    """Why ``endpoint`` cannot be reached (``None`` when a TCP connection opens within
    ``timeout``). One attempt, in a thread so a hanging name lookup is bounded too."""
    host, port = _probe_address(endpoint)
    outcome: dict[str, object] = {}

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome["ok"] = True
        except OSError as exc:
            outcome["error"] = exc.strerror or str(exc) or type(exc).__name__

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    if outcome.get("ok"):
        return None
    return str(outcome.get("error") or f"no answer within {timeout:g} s")


def _not_cached(spec: str, why: str) -> ModelLoadError:
    return ModelLoadError(
        f"model {spec!r} is not a local path and not in the Hugging Face cache, and {why}: "
        f"download it where there is network (hf download {spec}) and retry, or pass a local "
        "model directory or .gguf file"
    )


def _from_cache_or_hub(load: Callable[..., Any], spec: str, location: str) -> Any:
    """``load(location, ...)`` for a local path; for a hub id the cache first, then (when it
    is missing there) the hub, after one short probe that it is reachable."""
    if Path(location).exists():
        return load(location)
    try:
        return load(location, local_files_only=True)
    except OSError:  # not (wholly) in the cache
        pass
    if hub_offline():
        raise _not_cached(spec, "the hub is switched off (HF_HUB_OFFLINE)")
    endpoint = hub_endpoint()
    reason = hub_unreachable(endpoint)
    if reason is not None:
        raise _not_cached(spec, f"the hub {endpoint} is unreachable ({reason}; offline?)")
    return load(location)


# ----------------------------------------------------------------------------- load failures


def _broken_json(directory: Path) -> str | None:
    """The first metadata file of ``directory`` that is not valid JSON, with the parser's
    position: a JSON error from deep inside a loader does not say which file it read."""
    for name in _METADATA_FILES:
        path = directory / name
        if not path.is_file():
            continue
        try:
            json.loads(path.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            return f"{name} is not valid JSON ({one_line(str(exc), 120)})"
    return None


def _reason(exc: BaseException) -> str:
    """The exception as one bounded line, with its type where the message alone is cryptic
    (``KeyError: 'added_tokens'``)."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    if isinstance(exc, OSError | UserError) or type(exc) is ValueError:
        return one_line(text)
    return one_line(f"{type(exc).__name__}: {text}")


def load_failure(spec: str, what: str, exc: BaseException) -> ModelLoadError:
    """The one-line error for ``what`` ("model", "config", ...) of ``spec`` failing to load:
    the library's message on one line (head and tail kept), the metadata file that is not
    valid JSON when that is the cause, the flag to pass when remote code or a pickle is what
    was refused, and a hint when ``spec`` is no local path (so it was looked up on the hub)."""
    directory = Path(spec) if Path(spec).is_dir() else None
    # A parse error deep inside a loader does not say which file it read: find it.
    parse_error = isinstance(exc, ValueError) or "column" in str(exc)
    reason = (_broken_json(directory) if directory and parse_error else None) or _reason(exc)
    if isinstance(exc, KeyError) and what == "tokenizer" and directory is not None:
        reason += " (a section missing from its tokenizer.json or tokenizer_config.json)"
    if "trust_remote_code" in reason:
        reason = f"it comes with its own Python code: {_REMOTE_HINT}"
    elif "safetensors" in reason and not Path(spec).exists():
        reason += f"; if it has only a pickle checkpoint, {_PICKLE_RISK}: pass --allow-pickle"
    hint = (
        ""
        if Path(spec).exists()
        else "; it is not a local path and could not be loaded from the Hugging Face Hub "
        "or its cache (offline?) — download it first or pass a local directory or .gguf file"
    )
    subject = "model" if what == "model" else f"the {what} of"
    return ModelLoadError(f"cannot load {subject} {spec!r}: {reason}{hint}")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Only errors from ``transformers`` while loading: its load report and warnings are
    multi-line; what matters in them is checked here and said in one line."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def pretrained(loader: Any, spec: str, what: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` for ``spec`` (cache before hub, quiet), any failure as a
    one-line :class:`ModelLoadError` about ``what``. ``trust_remote_code`` is always passed
    explicitly, so ``transformers`` never asks on the terminal."""
    location, extra = model_location(spec)
    kwargs = {"trust_remote_code": False, **extra, **kwargs}

    def load(where: str, **more: Any) -> Any:
        return loader.from_pretrained(where, **kwargs, **more)

    try:
        with quiet_transformers():
            return _from_cache_or_hub(load, spec, location)
    except UserError:
        raise
    except Exception as exc:  # parsers fail in their own terms (struct.error, KeyError, ...)
        raise load_failure(spec, what, exc) from None


# ----------------------------------------------------------------------- checks after loading


def _tied(model: torch.nn.Module, missing: set[str]) -> set[str]:
    """The names in ``missing`` whose parameter is shared with one that was loaded (a tied
    ``lm_head``): not missing at all."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return {
        name
        for group in names.values()
        for name in group
        if name in missing and any(other not in missing for other in group)
    }


def check_loading_info(spec: str, model: torch.nn.Module, info: dict) -> None:
    """``ModelLoadError`` when the checkpoint's tensors do not make the model its config
    describes: a shape that disagrees, or a parameter the checkpoint lacks (``transformers``
    fills both with random numbers and only warns)."""
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda m: m[0])
    if mismatched:
        name, stored, wanted = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise ModelLoadError(
            f"cannot load model {spec!r}: tensor {name} has shape {list(stored)} in the "
            f"checkpoint but the config makes it {list(wanted)}{more}; the checkpoint and "
            "its config.json do not belong together"
        )
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    missing = set(info.get("missing_keys") or ()) & parameters
    missing -= _tied(model, missing)
    if missing:
        first = sorted(missing)[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(
            f"cannot load model {spec!r}: the checkpoint has no tensor {first}{more}, which "
            "its config needs (it would be random); the checkpoint is incomplete or for "
            "another config"
        )


def load_model_and_tokenizer(
    spec: str,
    dtype: str = "auto",
    device: torch.device | None = None,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    tokenizer: object | None = None,
) -> tuple[torch.nn.Module, object]:
    """``(model, tokenizer)`` for a hub id, a local directory or a ``.gguf`` file, on the host.

    ``allow_pickle``: load a ``pytorch_model.bin`` (refused otherwise: unpickling can run code).
    ``trust_remote_code``: run the repository's own Python code if it needs it.
    ``tokenizer``: the source's tokenizer, already loaded (a GGUF's takes seconds to build).
    Raises :class:`ModelLoadError` with a one-line explanation when it cannot.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # Our own progress bars cover the long steps; the per-tensor loading bar is noise.
    hf_logging.disable_progress_bar()
    device = device or torch.device("cpu")
    torch_dtype = resolve_dtype(dtype, device)
    check_checkpoint(spec, allow_pickle)
    check_remote_code(spec, trust_remote_code)
    gguf = spec.endswith(".gguf")
    kwargs: dict = {"dtype": torch.float32 if gguf and torch_dtype == "auto" else torch_dtype}
    if not gguf and not allow_pickle:
        kwargs["use_safetensors"] = True  # a hub download never falls back to a pickle
    if tokenizer is None:
        tokenizer = pretrained(
            AutoTokenizer, spec, "tokenizer", trust_remote_code=trust_remote_code
        )
    directory = _local_directory(spec)
    from sparsellm.compressed import is_compressed, load_model

    if directory is not None and is_compressed(directory):
        # transformers would find none of its sparse weights; restored tensor by tensor here.
        wanted = None if torch_dtype == "auto" else torch_dtype
        return load_model(directory, wanted, trust_remote_code=trust_remote_code), tokenizer
    model, info = pretrained(
        AutoModelForCausalLM,
        spec,
        "model",
        trust_remote_code=trust_remote_code,
        output_loading_info=True,
        ignore_mismatched_sizes=True,  # reported by check_loading_info, in one line
        **kwargs,
    )
    check_loading_info(spec, model, info)
    model.eval()
    if gguf:
        model = _drop_gguf_flag(model)
    return model, tokenizer
