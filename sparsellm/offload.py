"""Out-of-core models (``--offload disk``): the decoder blocks wait on disk, not in memory.

The model is built as a skeleton whose parameters sit on the ``meta`` device (no storage);
buffers computed at construction (rotary ``inv_freq``) stay real. A :class:`DiskStore` (the
engine's :class:`~sparsellm.engine.BlockStore` hook) reads one block's tensors when the engine
fetches it and, while pruning, writes the pruned block to its own output shard as soon as it is
released, turning it back to ``meta``; everything outside the blocks (embeddings, final norm,
head) it reads only while capture or evaluation runs (``DiskStore.rest``).
:class:`OffloadedModel` ties these together for the CLI and the benchmark; the staging
directory of the output is renamed into place only once the index, config, tokenizer and
report are there (:class:`~sparsellm.saving.StagedOutput`). Under the CLI the shards wait in
the resume record (:mod:`sparsellm.resume`) until then, so an interrupted run keeps them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from sparsellm.engine import BlockStore, blocks_replaced
from sparsellm.errors import UserError
from sparsellm.memory import return_freed_memory
from sparsellm.saving import StagedOutput, output_errors
from sparsellm.spill import SpilledBatches

if TYPE_CHECKING:
    from sparsellm.models import Adapter
    from sparsellm.resume import RunRecord

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class OffloadError(UserError):
    """The model cannot be processed out of core (not a safetensors checkpoint, names differ)."""


@dataclass(frozen=True)
class Checkpoint:
    """A directory of safetensors shards: which file holds each tensor name."""

    directory: Path
    files: dict[str, str]  # tensor name -> file name inside ``directory``

    def nbytes(self) -> int:
        """Bytes of the shards on disk (about the model's size in its stored dtype)."""
        return sum((self.directory / name).stat().st_size for name in set(self.files.values()))

    def read(self, names: dict[str, str]) -> dict[str, torch.Tensor]:
        """``{key: tensor}`` for ``names`` (key -> checkpoint name), opening each shard once
        and reading only the tensors asked for."""
        from safetensors import safe_open

        by_file: dict[str, list[tuple[str, str]]] = {}
        for key, name in names.items():
            by_file.setdefault(self.files[name], []).append((key, name))
        tensors = {}
        for file, wanted in by_file.items():
            with safe_open(self.directory / file, framework="pt", device="cpu") as shard:
                for key, name in wanted:
                    tensors[key] = shard.get_tensor(name)
        return tensors


def find_checkpoint(spec: str | None) -> Checkpoint | None:
    """The safetensors checkpoint in the local directory ``spec`` (sharded with an index, or a
    single ``model.safetensors``); ``None`` for anything else (a .gguf file, a hub id)."""
    directory = Path(spec) if spec else None
    if directory is None or not directory.is_dir():
        return None
    if (directory / INDEX).is_file():
        weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        return Checkpoint(directory, dict(weight_map))
    if (directory / SINGLE).is_file():
        from safetensors import safe_open

        with safe_open(directory / SINGLE, framework="pt", device="cpu") as shard:
            return Checkpoint(directory, dict.fromkeys(shard.keys(), SINGLE))
    return None


def offload_mode(setting: str, spec: str | None) -> str:
    """``memory`` or ``disk`` for the ``offload`` setting and the model ``spec``, decided before
    anything loads: ``auto`` is disk when the checkpoint's shards exceed the free host memory
    and memory when the source is not a local safetensors checkpoint."""
    from sparsellm.memory import host_available

    if setting == "memory":
        return "memory"
    checkpoint = find_checkpoint(spec)
    if checkpoint is None:
        if setting == "disk":
            raise OffloadError(
                f"--offload disk needs a local directory of safetensors shards; {spec!r} is "
                "not one (convert it first, or use --offload memory)"
            )
        return "memory"
    if setting == "disk":
        return "disk"
    return "disk" if checkpoint.nbytes() > host_available() else "memory"


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside this block lands on the ``meta`` device (shape and
    dtype, no storage); buffers are untouched, so tables computed at construction stay real.

    Modules create a parameter with real storage first; swapping it at registration keeps at
    most one layer's freshly allocated (never touched, so never paged in) storage alive."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def resolve_offload_dtype(name: str, config: object, device: torch.device) -> torch.dtype:
    """The run's dtype, as :func:`~sparsellm.loading.resolve_dtype` chooses it for the
    in-memory path (so both give the same weights); ``auto`` on an accelerator is the dtype the
    checkpoint's config records (float32 if none)."""
    from sparsellm.loading import resolve_dtype

    resolved = resolve_dtype(name, device)
    if isinstance(resolved, torch.dtype):
        return resolved
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else torch.float32


def build_skeleton(
    directory: Path, dtype: str, device: torch.device, trust_remote_code: bool = False
) -> nn.Module:
    """The causal LM of ``directory``'s config with its parameters on ``meta`` (its own code
    runs only with ``trust_remote_code``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from sparsellm.loading import pretrained

    trust = {"trust_remote_code": trust_remote_code}
    config = pretrained(AutoConfig, str(directory), "config", **trust)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(
            config, dtype=resolve_offload_dtype(dtype, config, device), **trust
        )
    with contextlib.suppress(OSError):  # a checkpoint without generation_config.json
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model.eval()


def match_names(model: nn.Module, checkpoint: Checkpoint) -> dict[str, str]:
    """``{model state_dict name: checkpoint name}``. A checkpoint name matches a model name
    exactly or with the model's base prefix in front (a checkpoint saved from the base model);
    anything else is refused naming the tensor, as is a parameter the checkpoint lacks (tied
    copies excepted) — renamings are not guessed."""
    names = set(model.state_dict())
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    matched: dict[str, str] = {}
    for name in sorted(checkpoint.files):
        key = name if name in names else prefix + name
        if key not in names:
            raise OffloadError(
                f"checkpoint tensor {name!r} in {str(checkpoint.directory)!r} matches no "
                f"parameter of {type(model).__name__}; use --offload memory"
            )
        matched[key] = name
    aliases: dict[int, list[str]] = {}  # a tied parameter is stored under one of its names
    for key, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(key)
    for keys in aliases.values():
        if not any(key in matched for key in keys):
            raise OffloadError(
                f"parameter {keys[0]!r} of {type(model).__name__} is not in the checkpoint "
                f"{str(checkpoint.directory)!r}; use --offload memory"
            )
    return matched


def _owners(model: nn.Module) -> dict[str, list[tuple[nn.Module, str]]]:
    """Every state_dict name -> the (module, attribute) pairs that hold that tensor; a tied
    parameter has several, and all must receive the tensor read for it."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    names: dict[str, int] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for leaf, tensor in {**module._parameters, **module._buffers}.items():
            if tensor is None:
                continue
            holders.setdefault(id(tensor), []).append((module, leaf))
            names[f"{module_name}.{leaf}" if module_name else leaf] = id(tensor)
    return {name: holders[ident] for name, ident in names.items()}


def _held(owners: list[tuple[nn.Module, str]]) -> torch.Tensor:
    """The tensor the first owner holds now (a meta parameter, or a real buffer)."""
    module, leaf = owners[0]
    held = module._parameters.get(leaf)
    return held if held is not None else module._buffers[leaf]


def place(owners: list[tuple[nn.Module, str]], tensor: torch.Tensor) -> None:
    """Put ``tensor`` (a parameter's value or a buffer) into every module that holds it."""
    module, leaf = owners[0]
    if leaf in module._parameters:
        old = module._parameters[leaf]
        value: torch.Tensor = nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        value = tensor
    for module, leaf in owners:
        if leaf in module._parameters:
            module._parameters[leaf] = value
        else:
            module._buffers[leaf] = value


def _move_buffers(block: nn.Module, device: torch.device | str) -> None:
    """Real buffers of ``block`` to ``device`` (``block.to`` would touch meta parameters)."""
    for module in block.modules():
        for leaf, buffer in module._buffers.items():
            if buffer is not None and not buffer.is_meta:
                module._buffers[leaf] = buffer.to(device)


def _cast(tensor: torch.Tensor, like: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` in the dtype the skeleton gives that name (floating tensors only: integer
    tables keep theirs), on ``device`` — the cast from_pretrained makes, so values match."""
    dtype = like.dtype if tensor.is_floating_point() and like.is_floating_point() else None
    return tensor.to(device=device, dtype=dtype or tensor.dtype)


class ShardWriter:
    """The output directory, filled shard by shard: one ``model-K-of-N.safetensors`` per block
    as soon as it is pruned, the rest of the model last, then the index json, config,
    tokenizer and reports, and only then renamed into place.

    With a ``record`` (the CLI, :mod:`sparsellm.resume`) the shards are written into the
    record's ``shards/`` directory instead, which survives a killed run: they are the record's
    weights, and those of the blocks an earlier run finished are taken over as they are. At
    :meth:`finish` they are hard-linked (copied where the filesystem cannot link) into a staged
    output, so until that output is in place the record stays whole."""

    def __init__(self, output: str | Path, blocks: int, record: RunRecord | None = None):
        self.output = Path(output)
        self.count = blocks + 1
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self.resumable = record is not None
        self.staged = None if self.resumable else StagedOutput(output)
        self.directory = record.shards if record is not None else self.staged.path
        if record is not None:
            with output_errors(output):
                self.directory.mkdir(parents=True, exist_ok=True)
            for shard in range(record.done):
                self._adopt(shard)

    def _file(self, shard: int) -> str:
        return f"model-{shard + 1:05d}-of-{self.count:05d}.safetensors"

    def _adopt(self, shard: int) -> None:
        """Take over shard ``shard`` written by an earlier run (its names and sizes)."""
        from sparsellm.loading import ModelLoadError, check_safetensors
        from sparsellm.resume import ResumeError

        file = self._file(shard)
        if not (self.directory / file).is_file():
            raise ResumeError(
                f"the resume record lacks {str(self.directory / file)!r}; remove "
                f"{str(self.directory.parent)!r} to start over"
            )
        try:  # damaged after its atomic write: it would be linked into the output as it is
            header = check_safetensors(self.directory / file)
        except ModelLoadError:
            raise ResumeError(
                f"{str(self.directory / file)!r} in the resume record is damaged (truncated or "
                f"unreadable); remove {str(self.directory.parent)!r} to start over"
            ) from None
        header.pop("__metadata__", None)
        for name, entry in header.items():
            self.weight_map[name] = file
            self.total_size += entry["data_offsets"][1] - entry["data_offsets"][0]

    def write(self, shard: int, tensors: dict[str, torch.Tensor]) -> None:
        """Shard ``shard`` (0-based; the blocks' indices, then the rest) holding ``tensors``;
        under a temporary name renamed into place (a kill mid-write leaves no torn shard), and
        a full disk is one line (:class:`~sparsellm.saving.OutputError`)."""
        from safetensors.torch import save_file

        file = self._file(shard)
        temporary = self.directory / f"{file}.tmp"
        with output_errors(self.output):
            try:
                save_file(tensors, temporary, metadata={"format": "pt"})
                temporary.chmod(0o666 & ~_umask())  # save_file makes it private (0600)
                os.replace(temporary, self.directory / file)
            except BaseException:
                temporary.unlink(missing_ok=True)
                raise
        for name, tensor in tensors.items():
            self.weight_map[name] = file
            self.total_size += tensor.numel() * tensor.element_size()

    def written(self) -> Checkpoint:
        """The shards written so far, readable like a source checkpoint."""
        return Checkpoint(self.directory, dict(self.weight_map))

    def finish(self, model: nn.Module, tokenizer: object, reports: dict | None = None) -> Path:
        """Index json, config, generation config, tokenizer and ``reports``; rename into
        place. Every shard (blocks and the rest) must have been written."""
        with output_errors(self.output):
            if self.staged is None:
                self.staged = StagedOutput(self.output)
            target = self.staged.path
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            (target / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            model.config.architectures = [type(model).__name__]  # as save_pretrained records
            model.config.save_pretrained(target)
            if model.can_generate() and model.generation_config is not None:
                model.generation_config.save_pretrained(target)
            if tokenizer is not None:
                tokenizer.save_pretrained(target)
            if self.resumable:  # last: the record keeps its shards until the output is in place
                for file in sorted(set(self.weight_map.values())):
                    _link(self.directory / file, target / file)
            return self.staged.commit(reports)

    def discard(self) -> None:
        """Remove the staged output of an unfinished run (a record's shards stay)."""
        if self.staged is not None:
            self.staged.discard()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _link(source: Path, target: Path) -> None:
    """``target`` as a hard link to ``source`` (no second copy on disk), or a copy where the
    filesystem has no hard links."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _outside_blocks(keys: list[str], adapter: Adapter) -> list[str]:
    """The ``keys`` (state_dict names) of tensors outside the decoder blocks."""
    prefixes = tuple(f"{adapter.block_name(i)}." for i in range(len(adapter.blocks())))
    return [key for key in keys if not key.startswith(prefixes)]


class DiskStore(BlockStore):
    """Blocks read from a checkpoint's shards when fetched and turned back to ``meta`` when
    released. With a ``writer`` (pruning), a block whose visit completed is first written to
    its output shard; without one (evaluation, the chain check), it is dropped."""

    out_of_core = True

    def __init__(
        self,
        model: nn.Module,
        checkpoint: Checkpoint,
        names: dict[str, str],
        writer: ShardWriter | None = None,
    ):
        super().__init__()
        self.checkpoint, self.names, self.writer = checkpoint, names, writer
        self._owners = _owners(model)
        self._prefix = {id(m): f"{name}." for name, m in model.named_modules()}

    def _keys(self, block: nn.Module) -> list[str]:
        prefix = self._prefix[id(block)]
        return [key for key in self._owners if key.startswith(prefix)]

    def fetch(self, index: int, block: nn.Module, device: torch.device) -> None:
        """Read block ``index``'s tensors (only its own) onto ``device``."""
        wanted = {key: self.names[key] for key in self._keys(block) if key in self.names}
        for key, tensor in self.checkpoint.read(wanted).items():
            owners = self._owners[key]
            place(owners, _cast(tensor, _held(owners), device))
        _move_buffers(block, device)

    def output_batches(self) -> SpilledBatches:
        """Block outputs in a temporary file beside the output shards (the system's temporary
        directory for a rank that writes none): host memory is what this store saves."""
        directory = self.writer.directory if self.writer is not None else None
        return SpilledBatches(directory, pin=torch.cuda.is_available())

    @contextlib.contextmanager
    def rest(self, adapter: Adapter, device: torch.device) -> Iterator[None]:
        """Read everything outside the blocks (embeddings, final norm, head) onto ``device``
        for the duration, and drop it afterwards: between capture and evaluation a run holds
        no more than one block (LLaMA-3-70B's embedding and head alone are 4 GB)."""
        keys = _outside_blocks([key for key in self._owners if key in self.names], adapter)
        wanted = {key: self.names[key] for key in keys}
        for key, tensor in self.checkpoint.read(wanted).items():
            place(self._owners[key], _cast(tensor, _held(self._owners[key]), device))
        with blocks_replaced(adapter, nn.ModuleList()):
            _move_buffers(adapter.model, device)
        try:
            yield
        finally:
            self._drop(keys)
            with blocks_replaced(adapter, nn.ModuleList()):
                _move_buffers(adapter.model, "cpu")
            return_freed_memory()

    def _drop(self, keys: list[str]) -> None:
        """Turn the parameters under ``keys`` back to ``meta`` (buffers stay real)."""
        for key in keys:
            owners = self._owners[key]
            module, leaf = owners[0]
            param = module._parameters.get(leaf)
            if param is not None and not param.is_meta:
                place(owners, param.detach().to("meta"))

    def release(self, index: int, block: nn.Module, completed: bool) -> None:
        """Write the block if it was pruned to completion, then free its weights."""
        if completed and self.writer is not None:
            prefix, seen, tensors = self._prefix[id(block)], set(), {}
            for name, tensor in block.state_dict(prefix=prefix, keep_vars=True).items():
                if id(tensor) not in seen:  # a tensor held twice is stored once
                    seen.add(id(tensor))
                    tensors[name] = tensor.detach().to("cpu").contiguous()
            self.writer.write(index, tensors)
        self._drop(self._keys(block))
        _move_buffers(block, "cpu")
        # Its tensors are gone: hand their pages back (the engine does after every block too).
        return_freed_memory()


class OffloadedModel:
    """A model processed out of core from the safetensors checkpoint in ``directory``: the
    skeleton (every parameter on ``meta``), its tokenizer, and the stores that read the
    source, prune into ``output`` and read what was written. Blocks and the rest of the model
    (embeddings, head) are read only while they are needed. ``dtype`` and ``device`` choose
    the weights' dtype as the in-memory loader does."""

    def __init__(
        self,
        directory: str | Path,
        dtype: str = "auto",
        device: torch.device | None = None,
        trust_remote_code: bool = False,
    ):
        from sparsellm.models import get_adapter

        checkpoint = find_checkpoint(str(directory))
        if checkpoint is None:
            raise OffloadError(f"{str(directory)!r} is not a directory of safetensors shards")
        self.checkpoint = checkpoint
        device = device or torch.device("cpu")
        self.model = build_skeleton(checkpoint.directory, dtype, device, trust_remote_code)
        self.names = match_names(self.model, checkpoint)
        self.adapter = get_adapter(self.model)
        self.tokenizer = _tokenizer(checkpoint.directory, trust_remote_code)
        self.writer: ShardWriter | None = None

    def source_store(self) -> DiskStore:
        """Reads the dense blocks from the source checkpoint."""
        return DiskStore(self.model, self.checkpoint, self.names)

    def pruning_store(
        self, output: str | Path | None, record: RunRecord | None = None
    ) -> DiskStore:
        """Reads dense blocks and writes each pruned one under ``output`` (staged, or into
        ``record``, see :class:`ShardWriter`); ``None`` (a rank that does not write) drops
        them. The rest of the model, which pruning leaves as it is, is written first, so
        that :meth:`output_store` reads a whole model."""
        if output is not None:
            self.writer = ShardWriter(output, len(self.adapter.blocks()), record)
            self._write_rest()
        return DiskStore(self.model, self.checkpoint, self.names, self.writer)

    def _write_rest(self) -> None:
        """The last shard: everything outside the blocks, read from the source."""
        cpu = torch.device("cpu")
        with self.source_store().rest(self.adapter, cpu):
            seen, rest = set(), {}
            state = self.model.state_dict(keep_vars=True)
            for key in _outside_blocks(list(state), self.adapter):
                if id(state[key]) not in seen:  # tied weights are stored once, as save_pretrained
                    seen.add(id(state[key]))
                    rest[key] = state[key].detach().to(cpu).contiguous()
            self.writer.write(self.writer.count - 1, rest)
            del rest, state

    def output_store(self) -> DiskStore:
        """Reads the pruned blocks (and the rest of the model) back from the shards written so
        far."""
        written = self.writer.written()
        return DiskStore(self.model, written, {name: name for name in written.files})

    def finish(self, reports: dict | None = None) -> Path:
        """Write the index, config, tokenizer and ``reports``, and put the output in place
        (every shard is written by now)."""
        return self.writer.finish(self.model, self.tokenizer, reports)

    def discard(self) -> None:
        """Remove the staging directory of an unfinished output (a resume record stays)."""
        if self.writer is not None:
            self.writer.discard()


def _tokenizer(directory: Path, trust_remote_code: bool = False) -> object:
    from transformers import AutoTokenizer

    from sparsellm.loading import pretrained

    return pretrained(
        AutoTokenizer, str(directory), "tokenizer", trust_remote_code=trust_remote_code
    )
