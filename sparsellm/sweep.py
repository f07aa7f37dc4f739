"""``sparsellm sweep``: every method at every sparsity, scored, in a csv and a plot.

The dense model is loaded once and each point prunes a deep copy of it (``api.prune``); the
calibration and evaluation windows are tokenised once and shared by every point (each
method still captures its own block inputs: the engine captures per run). Every point is
scored on the same perplexity windows and lm-eval tasks, and written to ``sweep.csv`` at
once (the file replaced whole, so a kill never leaves half a row). A rerun into the same
directory skips the points already in the csv, and refuses settings that would mix
incomparable rows (``sweep.json`` records them). Each point's prune report goes to
``reports/<method>-<sparsity>/sparsity_report.json``, ready for ``sparsellm report``.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sparsellm.api import default_device, prune
from sparsellm.config import SweepConfig, prune_config
from sparsellm.errors import UserError
from sparsellm.evaluation import windows_perplexity
from sparsellm.jsonfile import read_json_object
from sparsellm.layer_report import REPORT
from sparsellm.pruners import get_method

CSV = "sweep.csv"
SETTINGS = "sweep.json"
PLOT = "sweep.png"
REPORTS = "reports"
MODELS = "models"
FIRST_COLUMNS = ("method", "sparsity", "measured_sparsity", "perplexity")
LAST_COLUMNS = ("prune_seconds", "eval_seconds")
# What makes two sweeps' rows comparable; methods and sparsities may grow between runs. The
# sources (model, texts, task directories) are compared by their files, not by how they were named.
FINGERPRINT = (
    "nsamples",
    "seqlen",
    "seed",
    "eval_seqlen",
    "max_windows",
    "tasks",
    "num_fewshot",
    "limit",
    "dtype",
)
FINGERPRINT_SOURCES = ("model", "calibration", "dataset")


class SweepError(UserError):
    """A sweep directory that cannot be resumed with these settings."""


DAMAGED = "repair it, or sweep into another --output"


@dataclass(frozen=True)
class Point:
    """One run of the sweep: a method at a sparsity (``dense``: the unpruned model)."""

    method: str
    sparsity: float

    @property
    def key(self) -> str:
        return "dense" if self.method == "dense" else f"{self.method}-{self.sparsity:g}"


DENSE = Point("dense", 0.0)


def plan_points(methods: list[str], sparsities: list[float]) -> list[Point]:
    """The dense point, then every method at each sparsity (sparsities in the order given)."""
    return [DENSE, *(Point(m, s) for s in sparsities for m in methods)]


def point_of(row: dict[str, Any]) -> Point:
    return Point(row["method"], float(row["sparsity"]))


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a sweep csv (none when it does not exist); ``SweepError`` naming the first
    row that is not a point (a method and a numeric sparsity), before anything is run."""
    if not path.is_file():
        return []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise SweepError(f"{str(path)!r} is not a sweep csv: {exc}") from None
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        try:
            point_of(row)
        except (KeyError, TypeError, ValueError):
            raise SweepError(
                f"{str(path)!r} line {line} is not a sweep point (a method and a sparsity): "
                f"{DAMAGED}"
            ) from None
    return rows


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` (sorted by method and sparsity) to ``path`` in one rename."""
    columns = list(FIRST_COLUMNS)
    for row in rows:
        columns += [c for c in row if c not in columns and c not in LAST_COLUMNS]
    columns += list(LAST_COLUMNS)
    ordered = sorted(rows, key=_order)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(ordered)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _order(row: dict[str, Any]) -> tuple:
    """Dense first, then by method and sparsity."""
    return (row["method"] != "dense", row["method"], float(row["sparsity"]))


def fingerprint(config: SweepConfig) -> dict[str, Any]:
    """The settings that decide every row, and the files of the model, the texts and the task
    directories (a relative and an absolute path to one file agree; an edited file does not)."""
    from sparsellm.lm_tasks import task_directories
    from sparsellm.resume import source_files

    values = {key: getattr(config, key) for key in FINGERPRINT}
    values.update(
        {key: source_files(getattr(config, key)) for key in FINGERPRINT_SOURCES},
        task_files=[source_files(str(d)) for d in task_directories(_task_dirs(config))],
    )
    return json.loads(json.dumps(values, default=str))  # tuples as lists, as read back


def _task_dirs(config: SweepConfig) -> list[str]:
    return [config.task_dir] if config.task_dir else []


def open_directory(config: SweepConfig) -> Path:
    """The sweep directory, created or resumed: its recorded settings must match ``config``
    (what differs is named), and a non-empty directory must be a sweep."""
    from sparsellm.resume import differences

    directory = Path(config.output)
    recorded_path = directory / SETTINGS
    wanted = fingerprint(config)
    if recorded_path.is_file():
        recorded = read_json_object(recorded_path, SweepError, DAMAGED)
        if diff := differences(recorded, wanted):
            raise SweepError(
                f"{str(directory)!r} holds a sweep with other settings ({diff}): rerun with "
                "the same settings to resume, or use another --output"
            )
        return directory
    if directory.is_dir() and any(directory.iterdir()):
        raise SweepError(f"output {str(directory)!r} is not empty and holds no {SETTINGS}")
    directory.mkdir(parents=True, exist_ok=True)
    recorded_path.write_text(json.dumps(wanted, indent=2) + "\n", encoding="utf-8")
    return directory


def prunable_sparsity(model: torch.nn.Module) -> float:
    """Zeros over the weights a prune would touch (every block's prunable layers)."""
    from sparsellm.models import get_adapter, linear_weight

    adapter = get_adapter(model)
    zeros = total = 0
    for block in adapter.blocks():
        for module in adapter.prunable(block).values():
            weight = linear_weight(module)
            zeros += int((weight == 0).sum())
            total += weight.numel()
    return zeros / total if total else 0.0


@contextlib.contextmanager
def on_device(model: torch.nn.Module, device: torch.device) -> Iterator[torch.nn.Module]:
    """``model`` on ``device`` for the duration, back on the host after (lm-eval runs the
    model where it is)."""
    if device.type == "cpu":
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to("cpu")


class Sweep:
    """The sweep ``config`` describes: load once, then prune and score each missing point."""

    def __init__(self, config: SweepConfig, progress: bool = True):
        self.config = config
        self.progress = progress
        self.directory = open_directory(config)
        self.csv = self.directory / CSV
        self.rows: list[dict[str, Any]] = read_rows(self.csv)
        self.tasks = _tasks(config.tasks)
        self.device = default_device(config.device)

    def missing(self) -> list[Point]:
        """Points of the plan not yet in the csv."""
        done = {point_of(row) for row in self.rows}
        plan = plan_points(self.config.method_list(), self.config.sparsity_list())
        return [p for p in plan if p not in done]

    def run(self) -> list[Point]:
        """Prune and score the missing points; returns the points run this time."""
        todo = self.missing()
        if not todo:
            return []
        pruned = [p for p in todo if p != DENSE]
        self._load(calibrate=any(get_method(p.method).needs_calibration for p in pruned))
        bar = tqdm(todo, desc="sweep", unit="point", disable=not self.progress)
        for point in bar:
            bar.set_postfix_str(point.key)
            row = self._run_point(point)
            self.rows = [r for r in self.rows if point_of(r) != point] + [row]
            write_rows(self.csv, self.rows)
            if self.progress:
                tqdm.write(_describe(row, self.tasks))
        return todo

    def _load(self, calibrate: bool) -> None:
        """Model, tokenizer and evaluation windows; calibration windows when a method of the
        points to run reads them."""
        from sparsellm.data import calibration_windows, evaluation_windows
        from sparsellm.loading import load_model_and_tokenizer

        config = self.config
        self.model, self.tokenizer = load_model_and_tokenizer(
            config.model,
            config.dtype,
            self.device,
            allow_pickle=config.allow_pickle,
            trust_remote_code=config.trust_remote_code,
        )
        seqlen = config.eval_seqlen or config.seqlen
        self.eval_windows = evaluation_windows(
            config.dataset, self.tokenizer, seqlen, config.max_windows
        )
        self.calibration = None
        if calibrate:
            self.calibration = calibration_windows(
                config.calibration, self.tokenizer, config.nsamples, config.seqlen, config.seed
            )

    def _run_point(self, point: Point) -> dict[str, Any]:
        if point == DENSE:
            return {**self._score(self.model, None), "method": "dense", "sparsity": 0.0}
        model = copy.deepcopy(self.model)
        values = {
            "method": point.method,
            "sparsity": point.sparsity,
            "calibration": "<tensor>",
            "nsamples": self.config.nsamples,
            "seqlen": self.config.seqlen,
            "seed": self.config.seed,
            "device": self.config.device,
        }
        prune_settings = prune_config(
            {k: v for k, v in values.items() if v is not None}, require_io=False
        )
        started = time.perf_counter()
        report = prune(
            model,
            self.tokenizer,
            prune_settings,
            calibration_ids=self.calibration,
            progress=self.progress,
        )
        seconds = time.perf_counter() - started
        report.model = self.config.model
        row = self._score(model, report)
        self._save(point, model, report)
        del model
        return {**row, "method": point.method, "sparsity": point.sparsity, "prune_seconds": seconds}

    def _score(self, model: torch.nn.Module, report: Any) -> dict[str, Any]:
        """Perplexity and task scores of ``model`` (the report gets them too)."""
        started = time.perf_counter()
        config = self.config
        row: dict[str, Any] = {"measured_sparsity": prunable_sparsity(model)}
        row["perplexity"] = windows_perplexity(
            model,
            self.eval_windows,
            batch_size=config.batch_size,
            device=self.device,
            progress=self.progress,
        )
        if report is not None:
            report.perplexity = {config.dataset: row["perplexity"]}
        if self.tasks:
            from sparsellm.lm_tasks import evaluate_tasks

            with on_device(model, self.device):
                results = evaluate_tasks(
                    model,
                    self.tokenizer,
                    self.tasks,
                    num_fewshot=config.num_fewshot,
                    limit=config.limit,
                    batch_size=config.batch_size,
                    task_dirs=_task_dirs(config),
                    progress=False,
                )
            for task, entry in results.tasks.items():
                for name, value in entry["metrics"].items():
                    row[f"{task}/{name}"] = value
        row["eval_seconds"] = time.perf_counter() - started
        return row

    def _save(self, point: Point, model: torch.nn.Module, report: Any) -> None:
        """The point's prune report (and, with ``save_models``, the model)."""
        folder = self.directory / REPORTS / point.key
        folder.mkdir(parents=True, exist_ok=True)
        report.save(folder / REPORT)
        if self.config.save_models:
            from sparsellm.saving import save_model

            save_model(
                model, self.tokenizer, self.directory / MODELS / point.key, reports={REPORT: report}
            )


def _tasks(text: str | None) -> list[str]:
    if text is None:
        return []
    from sparsellm.lm_tasks import parse_tasks

    return parse_tasks(text)


def accuracy_columns(rows: list[dict[str, Any]], tasks: list[str]) -> list[str]:
    """Each task's accuracy column present in ``rows``: ``acc_norm`` where the task has it
    (multiple choice: the raw log-likelihood sum favours short choices), else ``acc``, else
    ``exact_match``."""
    columns = []
    present = {c for row in rows for c in row}
    for task in tasks:
        candidates = [f"{task}/{m}" for m in ("acc_norm", "acc", "exact_match")]
        found = next((c for c in candidates if c in present), None)
        if found:
            columns.append(found)
    return columns


def _describe(row: dict[str, Any], tasks: list[str]) -> str:
    """One line for a finished point."""
    parts = [f"{row['method']} {float(row['sparsity']):.0%}: perplexity {row['perplexity']:.2f}"]
    parts += [f"{column} {float(row[column]):.3f}" for column in accuracy_columns([row], tasks)]
    return ", ".join(parts)


def plot(config: SweepConfig, rows: list[dict[str, Any]]) -> Path:
    """``sweep.png`` of the sweep's rows."""
    from sparsellm.plots import sweep_plot

    name = Path(config.model).name if config.model else ""
    title = f"{name}: perplexity on {Path(config.dataset).name}, {config.nsamples} x " + (
        f"{config.seqlen} calibration tokens"
    )
    return sweep_plot(
        rows,
        Path(config.output) / PLOT,
        accuracy=accuracy_columns(rows, _tasks(config.tasks)),
        title=title,
    )


def table(rows: list[dict[str, Any]], tasks: list[str]) -> str:
    """The sweep as a text table: method, sparsity, perplexity and task accuracies."""
    accuracy = accuracy_columns(rows, tasks)
    header = ["method", "sparsity", "measured", "perplexity", *accuracy]
    ordered = sorted(rows, key=_order)
    lines = [header]
    for row in ordered:
        lines.append(
            [
                row["method"],
                f"{float(row['sparsity']):.0%}",
                f"{float(row['measured_sparsity']):.2%}",
                f"{float(row['perplexity']):.2f}",
                *(_score(row.get(c)) for c in accuracy),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    )


def _score(value: Any) -> str:
    return "-" if value in (None, "") else f"{float(value):.3f}"
