"""lm-evaluation-harness tasks on the model object we hold (the optional ``eval`` extra).

The model is handed to lm-eval as it is, wrapped in its ``HFLM`` (``pretrained=`` a model
object, so nothing is loaded again and a pruned or compressed checkpoint is scored exactly as
:func:`sparsellm.load_model` restored it). Task names resolve first against the task
directories (the repository's ``eval/tasks/`` and any ``task_dirs`` given), then against
lm-eval's own registry (hellaswag, arc_easy, ...; those download from the hub). A run whose
tasks are all local never builds lm-eval's 15 s index of its own tasks and runs with the hub
and datasets libraries offline, so it cannot touch the network.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparsellm.errors import UserError

TASK_DIR = Path(__file__).resolve().parents[1] / "eval" / "tasks"
INSTALL_HINT = "pip install 'sparsellm[eval]'"
# lm-eval's stderr of perplexity-like metrics is a bootstrap; 1000 draws take milliseconds.
BOOTSTRAP_ITERS = 1000


class MissingExtraError(UserError):
    """An optional dependency the command needs is not installed (the message says how)."""


class TaskError(UserError):
    """A task name or task directory lm-eval cannot use."""


def require_lm_eval() -> Any:
    """The ``lm_eval`` module, or one line saying how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise MissingExtraError(
            f"--tasks needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}"
        ) from None
    return lm_eval


def parse_tasks(text: str) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]``; an empty name is an error."""
    names = [name.strip() for name in text.split(",")]
    if not names or any(not name for name in names):
        raise TaskError(f"tasks {text!r} must be comma-separated task names, none empty")
    return names


def task_directories(extra: Sequence[str | Path] = ()) -> list[Path]:
    """The directories searched for task YAMLs: ``extra`` (checked), then ``eval/tasks``."""
    dirs = []
    for directory in extra:
        path = Path(directory)
        if not path.is_dir():
            raise TaskError(f"task directory {str(directory)!r} does not exist")
        dirs.append(path.resolve())
    if TASK_DIR.is_dir():
        dirs.append(TASK_DIR)
    return dirs


def _is_yaml_path(name: str) -> bool:
    return name.endswith((".yaml", ".yml"))


def task_manager(names: Sequence[str], dirs: Sequence[Path]) -> tuple[Any, bool]:
    """An lm-eval ``TaskManager`` that knows every name, and whether all of them are local.

    lm-eval's own tasks are indexed only when a name is not found in ``dirs`` (the index
    takes ~15 s). A name found nowhere is one line naming it and the local tasks."""
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=[str(d) for d in dirs], include_defaults=False)
    missing = [n for n in names if n not in local.all_tasks and not _is_yaml_path(n)]
    for name in names:
        if _is_yaml_path(name) and not Path(name).is_file():
            raise TaskError(f"task file {name!r} does not exist")
    if not missing:
        return local, True
    manager = TaskManager(include_path=[str(d) for d in dirs])
    unknown = [n for n in missing if n not in manager.all_tasks]
    if unknown:
        known = ", ".join(sorted(local.all_tasks)) or "none"
        raise TaskError(
            f"unknown task {unknown[0]!r}: not in the task directories (local tasks: {known}) "
            "nor among lm-eval's tasks ('lm_eval ls tasks' lists them)"
        )
    return manager, False


@contextlib.contextmanager
def _environment(offline: bool, progress: bool) -> Iterator[None]:
    """For the duration: the hub and datasets offline (local tasks only), lm-eval's
    bootstrap in this process, its info logging and (unless ``progress``) bars silenced."""
    values = {"DISABLE_MULTIPROC": "1"}
    if offline:
        values |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if not progress:
        values["TQDM_DISABLE"] = "1"
    saved = {key: os.environ.get(key) for key in values}
    logger = logging.getLogger("lm_eval")
    level = logger.level
    os.environ.update(values)
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class TaskResults:
    """Scores of lm-eval tasks: per task its metrics (``acc``, ``acc_stderr``, ...), the
    samples scored and the few-shot count."""

    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    lm_eval_version: str = ""

    def metric(self, task: str, name: str) -> float | None:
        """One metric of one task (``None`` when the task has no such metric)."""
        return self.tasks.get(task, {}).get("metrics", {}).get(name)

    def headline(self, task: str) -> tuple[str, float] | None:
        """The task's accuracy-like metric: acc_norm (multiple choice, length-normalised),
        else acc, else exact_match, else the first metric lm-eval reported."""
        metrics = {k: v for k, v in self.tasks[task]["metrics"].items() if "stderr" not in k}
        for name in ("acc_norm", "acc", "exact_match"):
            if name in metrics:
                return name, metrics[name]
        return next(iter(metrics.items()), None)

    def to_dict(self) -> dict[str, Any]:
        return {"lm_eval_version": self.lm_eval_version, "tasks": self.tasks}

    def table(self) -> str:
        """One row per task and metric: value, standard error, samples."""
        rows = [("task", "metric", "value", "stderr", "n")]
        for task, entry in self.tasks.items():
            metrics = entry["metrics"]
            for name, value in metrics.items():
                if name.endswith("_stderr"):
                    continue
                stderr = metrics.get(f"{name}_stderr")
                rows.append((task, name, _number(value), _number(stderr), str(entry["samples"])))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        return "\n".join(
            "  ".join(
                cell.ljust(w) if i < 2 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
            for row in rows
        )


def _number(value: Any) -> str:
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "-"
    return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"


def _metrics(entry: dict[str, Any]) -> dict[str, float]:
    """lm-eval's ``"acc,none"`` / ``"acc_stderr,none"`` keys as ``acc`` / ``acc_stderr``."""
    metrics = {}
    for key, value in entry.items():
        name, _, filter_name = key.partition(",")
        if not filter_name or not isinstance(value, int | float):
            continue  # "alias", "name", ...
        label = name if filter_name == "none" else f"{name}[{filter_name}]"
        metrics[label] = float(value)
    return metrics


def collect(results: dict[str, Any], version: str) -> TaskResults:
    """:class:`TaskResults` from the dict ``lm_eval.simple_evaluate`` returns."""
    out = TaskResults(lm_eval_version=version)
    for task, entry in results["results"].items():
        samples = results.get("n-samples", {}).get(task, {}).get("effective")
        config = results.get("configs", {}).get(task, {})
        out.tasks[task] = {
            "metrics": _metrics(entry),
            "samples": samples,
            "num_fewshot": config.get("num_fewshot"),
        }
    return out


def make_lm(model: torch.nn.Module, tokenizer: object, batch_size: int) -> Any:
    """lm-eval's ``HFLM`` around the model object (no second load; it runs where the model
    is)."""
    import copy

    from lm_eval.models.huggingface import HFLM

    # HFLM gives the tokenizer it gets a pad token: a copy keeps the caller's as it was.
    tokenizer = copy.deepcopy(tokenizer)
    with _environment(offline=False, progress=False):
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer: object,
    tasks: Sequence[str],
    *,
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: int = 8,
    task_dirs: Sequence[str | Path] = (),
    progress: bool = True,
    lm: Any = None,
) -> TaskResults:
    """Run lm-evaluation-harness ``tasks`` on ``model`` (a ``transformers`` causal LM, on the
    device it should run on) and return the scores.

    ``tasks``: names in the task directories (``eval/tasks`` and ``task_dirs``), YAML paths, or
    lm-eval's own task names (those download their data). ``num_fewshot`` overrides the tasks'
    own; ``limit``: at most this many samples per task (a fraction below 1: that share).
    ``lm``: an lm-eval ``LM`` to use instead of wrapping ``model`` (tests pass scripted ones).
    """
    lm_eval = require_lm_eval()
    from lm_eval import simple_evaluate

    manager, offline = task_manager(list(tasks), task_directories(task_dirs))
    with _environment(offline, progress):
        lm = lm if lm is not None else make_lm(model, tokenizer, batch_size)
        results = simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            bootstrap_iters=BOOTSTRAP_ITERS,
            log_samples=False,
        )
    return collect(results, getattr(lm_eval, "__version__", ""))
