"""Settings of ``prune``, ``eval`` and ``finetune``, TOML recipes, and their validation.

Each setting is declared once (:func:`~sparsellm.settings.setting`); its name is the CLI flag
(``-`` for ``_``), the recipe key and the ``prune_model()`` keyword. A pruning method's own
options are declared with the method (:mod:`sparsellm.pruners`) and checked here against the
method chosen. Flags given on the command line override the recipe. Every check here runs
before a model is loaded or a file written.
"""

from __future__ import annotations

import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from sparsellm.allocation import MAX_SPARSITY
from sparsellm.allocation import RULES as ALLOCATION_RULES
from sparsellm.data import describe_sources
from sparsellm.masks import SparsityTarget
from sparsellm.pruners import Method, get_method, methods_with, option_fields
from sparsellm.saving import FORMATS
from sparsellm.settings import ConfigError, check_settings, check_value, declared, setting

SOURCES = describe_sources()
DTYPES = ("auto", "float32", "float16", "bfloat16")
MODEL_HELP = "hub id, local model directory, or .gguf file"


def allow_pickle_setting() -> Any:
    """``--allow-pickle``, one declaration for every subcommand that loads a model."""
    return setting(
        False,
        "load a pickle checkpoint (pytorch_model.bin: unpickling runs code, so only from a "
        "source you trust); safetensors is always preferred",
        "bool",
    )


def trust_remote_code_setting() -> Any:
    """``--trust-remote-code``, one declaration for every subcommand that loads a model."""
    return setting(
        False, "run the model repository's own Python code (only for a source you trust)", "bool"
    )


@dataclass
class PruneConfig:
    """Everything a pruning run needs; ``options`` holds the chosen method's own settings."""

    model: str | None = setting(None, MODEL_HELP)
    output: str | None = setting(None, "directory to write the pruned model to")
    method: str = setting("sparsegpt", "pruning method (see below)")
    sparsity: float | None = setting(
        None, "fraction of zeros over the pruned layers (default 0.5)", "number"
    )
    pattern: str | None = setting(None, "N:M structured sparsity: keep N of every M, e.g. 2:4")
    allocation: str = setting(
        "uniform",
        "per-layer sparsity: uniform (every layer at the target), owl (blocks with more "
        "outlier scores keep more, Yin et al. 2023) or error (each layer by the relative "
        "output error its zeros cost); the overall sparsity stays exact",
        choices=ALLOCATION_RULES,
    )
    allocation_spread: float = setting(
        0.1,
        "with --allocation owl or error, each layer's sparsity stays within the target "
        "plus or minus this (and within [0, 0.99])",
        "non_negative_number",
    )
    calibration: str = setting("builtin", f"calibration text: {SOURCES}")
    nsamples: int = setting(128, "calibration windows", "positive_int")
    seqlen: int = setting(512, "tokens per calibration window", "positive_int")
    seed: int = setting(0, "seed for window sampling", "int")
    device: str | None = setting(None, "device for the block being pruned (default: cuda if any)")
    dtype: str = setting("auto", "weights' dtype", choices=DTYPES)
    batch_size: int = setting(32, "calibration windows per forward pass", "positive_int")
    device_memory: str = setting(
        "auto",
        "device memory the engine may use for one block and its chunk of activations "
        "(auto: what the device has free; on the CPU chunks follow --batch-size)",
        "size",
    )
    offload: str = setting(
        "auto",
        "where the model's blocks wait their turn: memory, disk (read from and written to "
        "safetensors shards one block at a time), or auto (disk when the checkpoint is larger "
        "than the free host memory)",
        choices=("auto", "memory", "disk"),
    )
    skip: str | None = setting(None, "regex on layer names to leave dense (e.g. 'layers\\.0\\.')")
    overwrite: bool = setting(False, "replace a non-empty output directory", "bool")
    resume: bool = setting(
        False,
        "continue an interrupted run into the same --output from its last finished block "
        "(same settings; the result equals an uninterrupted run)",
        "bool",
    )
    allow_pickle: bool = allow_pickle_setting()
    trust_remote_code: bool = trust_remote_code_setting()
    guard: bool = setting(
        True,
        "re-do a block whose output error exceeds 1 with SparseGPT and stop if it is still "
        "above 1 (default; --no-guard keeps going)",
        "bool",
    )
    save_format: str = setting("dense", "output format", choices=tuple(FORMATS))
    eval: str | None = setting(None, "text source for perplexity before and after pruning")
    eval_seqlen: int | None = setting(
        None, "window length for --eval (default: seqlen)", "positive_int"
    )
    eval_windows: int | None = setting(None, "at most this many windows for --eval", "positive_int")
    options: Any = field(default=None, repr=False)  # the method's options dataclass

    def target(self) -> SparsityTarget:
        """The sparsity target: ``sparsity`` or ``pattern`` (0.5 when neither is given)."""
        try:
            if self.pattern is not None and self.sparsity is not None:
                raise ValueError("give --sparsity or --pattern, not both")
            if self.pattern is None and self.sparsity is None:
                return SparsityTarget.parse(sparsity=0.5)
            return SparsityTarget.parse(sparsity=self.sparsity, pattern=self.pattern)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    @property
    def uses_calibration(self) -> bool:
        """Whether the run reads calibration text: for the method, or for the allocation."""
        return get_method(self.method).needs_calibration or self.allocation != "uniform"

    def check_allocation(self) -> None:
        """A non-uniform allocation needs an unstructured target it can spread."""
        if self.allocation == "uniform":
            return
        target = self.target()
        if target.is_nm:
            raise ConfigError(
                f"allocation {self.allocation} needs --sparsity: an N:M pattern fixes every "
                "layer's sparsity (use allocation uniform)"
            )
        if target.sparsity > MAX_SPARSITY:
            raise ConfigError(
                f"allocation {self.allocation} needs a sparsity of at most {MAX_SPARSITY}"
            )

    def to_dict(self) -> dict:
        """The settings as recipe keys, the method's options among them."""
        values = {f.name: getattr(self, f.name) for f in declared(PruneConfig)}
        return {**values, **(asdict(self.options) if self.options is not None else {})}


def _split_prune_keys(values: dict[str, Any], method: str) -> tuple[dict, dict]:
    """``values`` into common settings and the method's options; a key of another method or
    of none is an error naming it."""
    common_names = {f.name for f in declared(PruneConfig)}
    own_names = {f.name for f in declared(get_method(method).options)}
    common, own = {}, {}
    for key, value in values.items():
        if key in common_names:
            common[key] = value
        elif key in own_names:
            own[key] = value
        elif owners := methods_with(key):
            owner_list = ", ".join(owners)
            raise ConfigError(f"{key} is an option of {owner_list}, not of method {method!r}")
        else:
            raise ConfigError(f"unknown setting {key!r}")
    return common, own


def _method(schema: type, values: dict[str, Any]) -> Method:
    """The method ``values`` names, its type checked first (a recipe's ``method = 3`` is a
    wrong type, not an unknown method)."""
    field = next(f for f in declared(schema) if f.name == "method")
    name = values.get("method", field.default)
    check_value(field, name)
    return get_method(name)


def prune_config(values: dict[str, Any], require_io: bool = True) -> PruneConfig:
    """A checked :class:`PruneConfig` from flat keys (recipe, flags or keywords)."""
    method = _method(PruneConfig, values)  # named before its options
    common, own = _split_prune_keys(values, method.name)
    config = PruneConfig(**common)
    check_settings(config)
    config.options = method.make_options(own, config.target())
    config.check_allocation()
    if config.skip is not None:
        try:
            re.compile(config.skip)
        except re.error as exc:
            message = f"skip {config.skip!r} is not a valid regular expression: {exc}"
            raise ConfigError(message) from None
    check_device(config.device)
    if require_io:
        require_model(config.model)
        check_output(config.output, config.overwrite)
    return config


_DEVICE_KINDS = "cpu, cuda, cuda:N, mps or xpu"


def _device_count(kind: str) -> int:
    """How many devices of ``kind`` this machine has (0: none usable)."""
    import torch

    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "mps":
        return int(torch.backends.mps.is_available())
    xpu = getattr(torch, "xpu", None)
    return xpu.device_count() if xpu is not None and xpu.is_available() else 0


def check_device(device: str | None) -> None:
    """A ``--device`` this machine has, checked when the settings are (before any model
    loads): a CUDA run on a machine without CUDA fails here, not after an hour of loading."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not a device name; use {_DEVICE_KINDS}") from None
    if parsed.type == "cpu":
        return
    if parsed.type not in ("cuda", "mps", "xpu"):
        raise ConfigError(f"device {device!r} is not supported; use {_DEVICE_KINDS}")
    count = _device_count(parsed.type)
    if count == 0:
        raise ConfigError(
            f"device {device!r} is not available: this machine has no {parsed.type} device "
            "(or this torch build cannot use it); use --device cpu"
        )
    if parsed.index is not None and parsed.index >= count:
        raise ConfigError(
            f"device {device!r} does not exist: this machine has {count} {parsed.type} "
            f"device(s), {parsed.type}:0 to {parsed.type}:{count - 1}"
        )


TASKS_HELP = (
    "comma-separated lm-evaluation-harness tasks: the offline ones in eval/tasks "
    "(sotu_lastword, sotu_continuation), your own (--task-dir), or lm-eval's (hellaswag, "
    "arc_easy, ...: downloaded from the hub); needs pip install 'sparsellm[eval]'"
)


def task_settings() -> dict[str, Any]:
    """The lm-eval settings ``eval`` and ``sweep`` share, one declaration each."""
    return {
        "tasks": setting(None, TASKS_HELP),
        "task_dir": setting(None, "a directory of your own lm-eval task YAMLs"),
        "num_fewshot": setting(
            None,
            "few-shot examples per task (default: the task's own, else 0)",
            "non_negative_int",
        ),
        "limit": setting(
            None,
            "at most this many samples per task (below 1: that fraction)",
            "positive_number",
        ),
    }


_EVAL_TASKS = task_settings()  # a dataclass field belongs to one class: one dict each


@dataclass
class EvalConfig:
    """Settings of ``sparsellm eval``: perplexity on ``dataset``, lm-eval ``tasks``, or both
    (one recipe may hold both)."""

    model: str | None = setting(None, MODEL_HELP)
    dataset: str | None = setting(
        None, f"text for perplexity (default wikitext2 when no --tasks): {SOURCES}"
    )
    seqlen: int = setting(2048, "tokens per window", "positive_int")
    max_windows: int | None = setting(None, "evaluate at most this many windows", "positive_int")
    tasks: str | None = _EVAL_TASKS["tasks"]
    task_dir: str | None = _EVAL_TASKS["task_dir"]
    num_fewshot: int | None = _EVAL_TASKS["num_fewshot"]
    limit: float | None = _EVAL_TASKS["limit"]
    report: str | None = setting(
        None,
        "JSON file the results are added to (default: the model directory's "
        "sparsity_report.json when it has one)",
    )
    batch_size: int = setting(4, "windows (or task requests) per forward pass", "positive_int")
    device: str | None = setting(None, "default: cuda if available, else cpu")
    dtype: str = setting("auto", "weights' dtype", choices=DTYPES)
    allow_pickle: bool = allow_pickle_setting()
    trust_remote_code: bool = trust_remote_code_setting()


_SWEEP_TASKS = task_settings()


@dataclass
class SweepConfig:
    """Settings of ``sparsellm sweep``: every method at every sparsity, pruned from one
    loaded dense model and scored; a csv and a plot in ``output``, resumable."""

    model: str | None = setting(None, MODEL_HELP)
    output: str | None = setting(
        None, "directory of the sweep (sweep.csv, sweep.png, reports/); rerun to resume"
    )
    methods: str = setting("magnitude,wanda,sparsegpt,sparsellm", "comma-separated pruning methods")
    sparsities: str = setting("0.5,0.6,0.7,0.8", "comma-separated sparsities, each in (0, 1)")
    calibration: str = setting("builtin", f"calibration text: {SOURCES}")
    nsamples: int = setting(128, "calibration windows", "positive_int")
    seqlen: int = setting(512, "tokens per calibration window", "positive_int")
    seed: int = setting(0, "seed for window sampling", "int")
    dataset: str = setting("builtin-heldout", f"text for perplexity: {SOURCES}")
    eval_seqlen: int | None = setting(
        None, "tokens per perplexity window (default: seqlen)", "positive_int"
    )
    max_windows: int | None = setting(None, "at most this many perplexity windows", "positive_int")
    tasks: str | None = _SWEEP_TASKS["tasks"]
    task_dir: str | None = _SWEEP_TASKS["task_dir"]
    num_fewshot: int | None = _SWEEP_TASKS["num_fewshot"]
    limit: float | None = _SWEEP_TASKS["limit"]
    batch_size: int = setting(8, "windows (or task requests) per evaluation pass", "positive_int")
    plot: bool = setting(True, "draw sweep.png (needs matplotlib; --no-plot: csv only)", "bool")
    save_models: bool = setting(
        False, "also save each pruned model under models/ (disk: one model per point)", "bool"
    )
    device: str | None = setting(None, "default: cuda if available, else cpu")
    dtype: str = setting("auto", "weights' dtype", choices=DTYPES)
    allow_pickle: bool = allow_pickle_setting()
    trust_remote_code: bool = trust_remote_code_setting()

    def method_list(self) -> list[str]:
        """The methods, each registered (an unknown one is named)."""
        names = [name.strip() for name in self.methods.split(",")]
        if any(not name for name in names):
            raise ConfigError(f"methods {self.methods!r} has an empty name")
        for name in names:
            get_method(name)
        return list(dict.fromkeys(names))

    def sparsity_list(self) -> list[float]:
        """The sparsities, each a number in (0, 1) (a bad one is named)."""
        values = []
        for text in self.sparsities.split(","):
            try:
                value = float(text)
            except ValueError:
                value = float("nan")
            if not 0 < value < 1:
                raise ConfigError(
                    f"sparsities: {text.strip()!r} is not a number between 0 and 1 "
                    f"(in {self.sparsities!r})"
                )
            values.append(value)
        return list(dict.fromkeys(values))


@dataclass
class ReportConfig:
    """Settings of ``sparsellm report``: per-layer figures of pruned outputs across depth."""

    POSITIONAL: ClassVar[dict[str, tuple[str, ...]]] = {
        "outputs": (
            "DIR",
            "pruned output directories (or their sparsity_report.json files)",
            "+",
        ),
    }
    outputs: Any = field(default=None)  # the positional list: not a setting, no flag
    plot: str | None = setting(
        None, "also draw the figures across depth into this PNG (needs matplotlib)"
    )


@dataclass
class FinetuneConfig:
    """Settings of ``sparsellm finetune``."""

    model: str | None = setting(None, "pruned model directory, hub id or .gguf file")
    output: str | None = setting(None, "directory to write the fine-tuned model to")
    data: str = setting("builtin", f"training text: {SOURCES}")
    eval: str | None = setting(None, "held-out text (default: the last 10%% of --data)")
    steps: int = setting(200, "optimizer steps", "positive_int")
    lr: float = setting(1e-4, "peak learning rate of AdamW", "positive_number")
    batch_size: int = setting(4, "windows per step", "positive_int")
    seqlen: int = setting(512, "tokens per window", "positive_int")
    eval_windows: int | None = setting(64, "held-out windows to score", "positive_int")
    warmup_steps: int | None = setting(
        None, "linear warm-up (default 10%% of steps)", "non_negative_int"
    )
    weight_decay: float = setting(0.0, "AdamW weight decay", "non_negative_number")
    target_sparsity: float | None = setting(None, "sparsify to this while training", "number")
    mixed_precision: str = setting(
        "auto",
        "autocast of the training step: auto (bf16 where the device has fast bf16, else none)",
        choices=("auto", "bf16", "fp16", "no"),
    )
    seed: int = setting(0, "seed of the batch order", "int")
    device: str | None = setting(None, "default: cuda if available, else cpu")
    dtype: str = setting("auto", "weights' dtype", choices=DTYPES)
    save_format: str = setting("dense", "output format", choices=tuple(FORMATS))
    overwrite: bool = setting(False, "replace a non-empty output directory", "bool")
    allow_pickle: bool = allow_pickle_setting()
    trust_remote_code: bool = trust_remote_code_setting()


@dataclass
class PlanConfig:
    """Settings of ``sparsellm plan`` (the prune settings that decide memory)."""

    model: str | None = setting(None, MODEL_HELP)
    method: str = setting("sparsegpt", "pruning method the plan is for")
    nsamples: int = setting(128, "calibration windows", "positive_int")
    seqlen: int = setting(512, "tokens per calibration window", "positive_int")
    dtype: str = setting("auto", "weights' dtype (auto: the config's)", choices=DTYPES)
    batch_size: int = setting(32, "calibration windows per forward pass", "positive_int")
    epochs: int = setting(1, "SparseLLM alternation epochs", "non_negative_int")
    device_memory: str = setting(
        "24GiB", "device memory the engine may use (no device is asked)", "size"
    )
    ranks: int = setting(8, "processes of the multi-rank rows (torchrun)", "positive_int")
    json: bool = setting(False, "print a JSON dict instead of the table", "bool")
    trust_remote_code: bool = trust_remote_code_setting()


@dataclass
class CompressConfig:
    """Settings of ``sparsellm compress`` / ``decompress`` (``source`` and ``output`` are the
    positional DIR and OUT)."""

    # name -> (metavar, help) of the positional arguments, in order
    POSITIONAL: ClassVar[dict[str, tuple[str, str]]] = {
        "source": ("DIR", "model directory to read (safetensors)"),
        "output": ("OUT", "directory to write"),
    }
    source: str | None = setting(None, "model directory to read", cli=False)
    output: str | None = setting(None, "directory to write", cli=False)
    overwrite: bool = setting(False, "replace a non-empty output directory", "bool")
    max_shard_size: str = setting("5GiB", "largest safetensors shard written", "size")
    trust_remote_code: bool = trust_remote_code_setting()


def compress_config(values: dict[str, Any]) -> CompressConfig:
    """A checked :class:`CompressConfig`: a source directory, an output that may be written."""
    config = _build(CompressConfig, values)
    if not config.source or not Path(config.source).is_dir():
        raise ConfigError(f"model directory {config.source!r} does not exist")
    check_output(config.output, config.overwrite)
    if config.max_shard_size == "auto":
        raise ConfigError("max_shard_size must be a size such as 5GiB or 500MB, not auto")
    if Path(config.output).resolve() == Path(config.source).resolve():
        raise ConfigError("the output directory must differ from the model directory")
    return config


@dataclass
class BenchInferConfig:
    """Settings of ``sparsellm bench-infer``."""

    model: str | None = setting(
        None, "pruned model: directory (dense or compressed), hub id or .gguf"
    )
    new_tokens: int = setting(
        128, "greedy tokens decoded (batch 1, after a short prompt)", "positive_int"
    )
    prompt_tokens: int = setting(512, "tokens of the prefill measurement", "positive_int")
    threads: int | None = setting(
        None, "threads of torch and the sparse kernel (default: torch's)", "positive_int"
    )
    repeats: int = setting(3, "runs of each measurement, the best kept", "positive_int")
    dtype: str = setting("float32", "weights' dtype", choices=("float32", "bfloat16"))
    min_sparsity: float = setting(0.3, "layers with fewer zeros stay dense", "non_negative_number")
    json: bool = setting(False, "print a JSON dict instead of the report", "bool")
    trust_remote_code: bool = trust_remote_code_setting()


def bench_infer_config(values: dict[str, Any]) -> BenchInferConfig:
    """A checked :class:`BenchInferConfig`."""
    config = _build(BenchInferConfig, values)
    require_model(config.model)
    if config.min_sparsity > 1:
        raise ConfigError(f"min_sparsity {config.min_sparsity} is above 1")
    return config


def plan_config(values: dict[str, Any]) -> PlanConfig:
    """A checked :class:`PlanConfig`."""
    config = _build(PlanConfig, values)
    require_model(config.model)
    get_method(config.method)  # its type was checked with the other settings
    if config.device_memory == "auto":
        raise ConfigError("device_memory must be a size for a plan (there is no device to ask)")
    return config


def require_model(model: str | None) -> None:
    if not model:
        raise ConfigError("no model given (--model or 'model' in the recipe)")


def check_output(output: str | None, overwrite: bool) -> None:
    """An output directory that may be written: absent, empty, or ``overwrite`` given."""
    if not output:
        raise ConfigError("no output directory given (--output or 'output' in the recipe)")
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output {output!r} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ConfigError(
            f"output directory {output!r} is not empty; pass --overwrite to replace it"
        )


def eval_config(values: dict[str, Any]) -> EvalConfig:
    """A checked :class:`EvalConfig`; without ``tasks`` the dataset defaults to wikitext2."""
    config = _build(EvalConfig, values)
    require_model(config.model)
    check_device(config.device)
    if config.dataset is None and config.tasks is None:
        config.dataset = "wikitext2"
    _check_tasks(config)
    return config


def _check_tasks(config: EvalConfig | SweepConfig) -> None:
    """Task settings that need no lm-eval to check."""
    if config.tasks is not None and not all(t.strip() for t in config.tasks.split(",")):
        raise ConfigError(f"tasks {config.tasks!r} has an empty name")
    if config.task_dir is not None and not Path(config.task_dir).is_dir():
        raise ConfigError(f"task_dir {config.task_dir!r} is not a directory")
    if config.tasks is None and (config.num_fewshot is not None or config.limit is not None):
        raise ConfigError("num_fewshot and limit apply to --tasks, and no tasks were given")


def sweep_config(values: dict[str, Any]) -> SweepConfig:
    """A checked :class:`SweepConfig` (methods registered, sparsities in (0, 1))."""
    config = _build(SweepConfig, values)
    require_model(config.model)
    if not config.output:
        raise ConfigError("no output directory given (--output or 'output' in the recipe)")
    if Path(config.output).exists() and not Path(config.output).is_dir():
        raise ConfigError(f"output {config.output!r} exists and is not a directory")
    config.method_list()
    config.sparsity_list()
    check_device(config.device)
    _check_tasks(config)
    return config


def report_config(values: dict[str, Any]) -> ReportConfig:
    """A checked :class:`ReportConfig` (the positional outputs taken as they are)."""
    outputs = values.pop("outputs", None) or []
    config = _build(ReportConfig, values)
    config.outputs = list(outputs)
    if not config.outputs:
        raise ConfigError("no pruned output given")
    if config.plot is not None and not config.plot.lower().endswith(".png"):
        raise ConfigError(f"plot {config.plot!r} must be a .png file")
    return config


def finetune_config(values: dict[str, Any]) -> FinetuneConfig:
    """A checked :class:`FinetuneConfig`."""
    config = _build(FinetuneConfig, values)
    require_model(config.model)
    if config.target_sparsity is not None and not 0 <= config.target_sparsity < 1:
        raise ConfigError(f"target_sparsity {config.target_sparsity} is outside [0, 1)")
    check_device(config.device)
    check_output(config.output, config.overwrite)
    return config


def _build(schema: type, values: dict[str, Any]):
    known = {f.name for f in declared(schema)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
    config = schema(**values)
    check_settings(config)
    return config


def recipe_keys(schema: type) -> set[str]:
    """Keys a recipe for ``schema`` may hold (for pruning: every method's options too)."""
    keys = {f.name for f in declared(schema)}
    return keys | set(option_fields()) if schema is PruneConfig else keys


def load_recipe(path: str | Path, schema: type) -> dict:
    """Keys of a TOML recipe (``-`` read as ``_``), each known to ``schema``."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"recipe {str(path)!r} is a directory, not a TOML file")
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} not found")
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"recipe {str(path)!r} is not valid TOML: {exc}") from None
    except OSError as exc:  # unreadable (permissions, a FIFO's peer gone)
        raise ConfigError(f"recipe {str(path)!r} cannot be read: {exc.strerror}") from None
    known = recipe_keys(schema)
    values = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(
                f"recipe {str(path)!r}: unknown key {key!r} (known: {', '.join(sorted(known))})"
            )
        values[name] = value
    return values


def merge(recipe: dict, flags: dict) -> dict:
    """Recipe keys overridden by the flags given (``None`` = not given)."""
    return {**recipe, **{k: v for k, v in flags.items() if v is not None}}
