"""``sparsellm prune`` / ``eval`` / ``finetune``: flags derived from the settings and the
method registry, over the Python API.

Every problem with the user's input is reported as one line on stderr with exit code 2, and is
detected before anything is written.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

from sparsellm.config import (
    BenchInferConfig,
    CompressConfig,
    EvalConfig,
    FinetuneConfig,
    PlanConfig,
    PruneConfig,
    ReportConfig,
    SweepConfig,
    bench_infer_config,
    compress_config,
    eval_config,
    finetune_config,
    load_recipe,
    merge,
    plan_config,
    prune_config,
    report_config,
    sweep_config,
)
from sparsellm.data import check_source
from sparsellm.errors import UserError
from sparsellm.pruners import METHODS, methods_with, option_fields
from sparsellm.settings import add_flag, add_flags, describe
from sparsellm.solvers import NumericalError
from sparsellm.stopping import Terminated, raise_if_stopped, signals_unwind

if TYPE_CHECKING:
    from sparsellm.preflight import PreparedInputs

REPORT = "sparsity_report.json"
CLI_ONLY = ("recipe", "run", "command", "quiet")


class _Parser(argparse.ArgumentParser):
    """argparse with the toolkit's one-line error format (exit code 2)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.subcommands: dict[str, argparse.ArgumentParser] = {}  # by name, for error hints

    def error(self, message: str) -> None:  # type: ignore[override]
        message = message.replace("\r", "\\r").replace("\n", "\\n")  # one line, whatever was typed
        self.exit(2, f"sparsellm: error: {message} (see '{self.prog} --help')\n")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """Unknown flags are reported by the subcommand's parser, so the hint names the help
        that lists the flags (``sparsellm compress --help``, not ``sparsellm --help``)."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(parsed, "command", None)
            owner = self.subcommands.get(command, self)
            owner.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def _method_flags(p: argparse.ArgumentParser) -> None:
    """``--method`` and every registered method's options, from the registry."""
    listing = "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())
    group = p.add_argument_group("methods", f"--method is one of: {listing}")
    for name, field in option_fields().items():
        add_flag(group, field, f"{describe(field)} [{', '.join(methods_with(name))}]")


def build_parser() -> argparse.ArgumentParser:
    """The ``sparsellm`` parser; its prune flags follow the methods registered now."""
    # No abbreviations: with --eval, --eval-seqlen and --eval-windows side by side, a prefix
    # taken for a longer flag changes a run silently (sweep has no --eval: '--eval 64' was
    # read as --eval-seqlen 64).
    parser = _Parser(
        prog="sparsellm",
        allow_abbrev=False,
        description="Prune causal language models to a target sparsity (SparseLLM, SparseGPT, "
        "Wanda, magnitude), evaluate, fine-tune and store them sparse. "
        "`sparsellm COMMAND --help` lists a command's flags.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help, description, schema, run in SUBCOMMANDS:
        p = sub.add_parser(name, help=help, description=description, allow_abbrev=False)
        parser.subcommands[name] = p
        for dest, (metavar, text, *nargs) in getattr(schema, "POSITIONAL", {}).items():
            p.add_argument(dest, metavar=metavar, help=text, nargs=nargs[0] if nargs else None)
        p.add_argument("--recipe", help="TOML file with any of these options (flags override it)")
        add_flags(p, schema)
        if schema is PruneConfig:
            _method_flags(p)
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.set_defaults(run=run)
    return parser


def _settings(args: argparse.Namespace, schema: type) -> dict:
    """Recipe keys overridden by the flags given."""
    recipe = load_recipe(args.recipe, schema) if args.recipe else {}
    flags = {k: v for k, v in vars(args).items() if k not in CLI_ONLY}
    return merge(recipe, flags)


def run_prune(args: argparse.Namespace) -> int:
    from sparsellm.distributed import is_main
    from sparsellm.offload import offload_mode

    started = time.perf_counter()
    config = prune_config(_settings(args, PruneConfig))
    if config.uses_calibration:
        check_source(config.calibration)
    if config.eval:
        check_source(config.eval)
    from sparsellm.loading import check_checkpoint

    # Pickle refusal and truncated shards before offload_mode opens the checkpoint.
    check_checkpoint(config.model, config.allow_pickle)
    # Where the blocks wait: decided from the source's files alone, before any of it is read.
    offload = offload_mode(config.offload, config.model) == "disk"
    if offload and config.save_format != "dense":
        raise UserError(
            f"--offload disk writes the dense format only, not {config.save_format!r}; "
            "compress the output afterwards with 'sparsellm compress'"
        )
    from sparsellm.preflight import check_prune_inputs

    # Model source, output, windows within positions and vocabulary, before the model loads.
    prepared = check_prune_inputs(config, offload)
    _remove_stale(config.output)
    session = _PruneSession(config, prepared, progress=not args.quiet, offload=offload)
    report = session.run(started)
    if not is_main():
        return 0
    output = session.write(report)
    print(report.summary())
    print(f"pruned model written to {output}")
    return 0


class _PruneSession:
    """One ``sparsellm prune`` run: load, score the dense model, prune, score again, write.

    In memory, the model is loaded whole and saved at the end. Offloaded (``offload``), it is
    a skeleton whose blocks are read from the checkpoint's shards one at a time; the pruning
    store writes each pruned block into the staged output at once, and evaluation streams the
    blocks from the source (dense) or from the shards written (pruned). ``prepared``: what
    the preflight read (tokenizer, windows), used rather than read and tokenized again."""

    def __init__(
        self, config: PruneConfig, prepared: PreparedInputs, progress: bool, offload: bool = False
    ):
        from sparsellm.api import default_device
        from sparsellm.distributed import init_from_environment, is_main

        self.config = config
        self.prepared = prepared
        # Under torchrun every rank runs this; rank 0 alone reports and writes.
        self.device = init_from_environment(default_device(config.device))
        self.main_rank = is_main()
        self.progress = progress and self.main_rank
        self.offload = offload
        self.offloaded = None
        self.record = None  # the --resume record (sparsellm.resume), opened before loading

    def run(self, started: float):
        try:
            return self._run(started)
        except BaseException:
            self.discard()
            raise

    def _run(self, started: float):
        from sparsellm.api import prune
        from sparsellm.resume import open_record

        config = self.config
        # Before loading: a record that cannot be resumed is refused in seconds.
        self.record = open_record(config, self.offload, self.device)
        self._load()
        loaded = time.perf_counter()
        eval_windows = self._eval_windows()
        perplexity = {"dense": self._score(eval_windows, "dense")} if config.eval else {}
        store = None
        if self.offloaded is not None:  # only rank 0 writes; the other ranks drop blocks
            output = config.output if self.main_rank else None
            store = self.offloaded.pruning_store(output, self.record)
        report = prune(
            self.model,
            self.tokenizer,
            config,
            calibration_ids=self.prepared.calibration,
            progress=self.progress,
            store=store,
            record=self.record,
        )
        report.model = config.model
        report.timings["load"] = loaded - started
        if config.eval:
            perplexity["pruned"] = self._score(eval_windows, "pruned")
            report.perplexity = perplexity
        report.timings["total"] = time.perf_counter() - started
        return report

    def _load(self) -> None:
        config = self.config
        if self.offload:
            from sparsellm.offload import OffloadedModel

            self.offloaded = OffloadedModel(
                config.model, config.dtype, self.device, config.trust_remote_code
            )
            self.model, self.tokenizer = self.offloaded.model, self.offloaded.tokenizer
        else:
            self.model, self.tokenizer = _load(config, self.device, self.prepared.tokenizer)

    def write(self, report) -> object:
        """Write the pruned model and its report (rank 0); the output directory. The resume
        record is removed once the output is in place (kept if writing fails)."""
        from sparsellm.saving import OutputError

        try:
            output = self._save(report)
        except OutputError as exc:
            self.discard()
            if self.record is None:
                raise
            raise OutputError(
                f"{exc}; every pruned block is kept in {self.record.directory}: make room and "
                "rerun with --resume to write them without pruning again"
            ) from None
        except BaseException:
            self.discard()
            raise
        if self.record is not None:
            self.record.remove()
        return output

    def _save(self, report) -> object:
        if self.offloaded is not None:
            return self.offloaded.finish({REPORT: report})
        from sparsellm.saving import save_model

        config = self.config
        return save_model(
            self.model,
            self.tokenizer,
            config.output,
            save_format=config.save_format,
            reports={REPORT: report},
        )

    def discard(self) -> None:
        if self.offloaded is not None:
            self.offloaded.discard()
        if self.record is not None:  # kept for --resume; only its lock is let go
            self.record.release()

    def _eval_windows(self):
        if not self.config.eval or self.prepared.evaluation is not None:
            return self.prepared.evaluation
        from sparsellm.data import evaluation_windows

        config = self.config
        seqlen = config.eval_seqlen or config.seqlen
        return evaluation_windows(config.eval, self.tokenizer, seqlen, config.eval_windows)

    def _score(self, windows, label: str) -> float:
        from sparsellm.evaluation import windows_perplexity

        store, across_ranks = None, True
        if self.offloaded is not None:
            dense = label == "dense"
            store = self.offloaded.source_store() if dense else None
            if not dense:
                # Only rank 0 wrote the pruned blocks, so it scores them alone.
                if not self.main_rank:
                    return float("nan")
                store, across_ranks = self.offloaded.output_store(), False
        # The model stays where it was loaded; blocks stream through the device if needed.
        value = windows_perplexity(
            self.model,
            windows,
            batch_size=self.config.batch_size,
            device=self.device,
            progress=self.progress,
            across_ranks=across_ranks,
            store=store,
        )
        if self.main_rank and label == "dense":
            print(f"dense perplexity: {value:.3f}", flush=True)
        return value


def _load(
    config: PruneConfig | EvalConfig | FinetuneConfig, device: object, tokenizer: object = None
) -> tuple:
    """The model and tokenizer ``config`` names, with its pickle and remote-code consent
    (``tokenizer``: one the preflight already loaded)."""
    from sparsellm.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(
        config.model,
        config.dtype,
        device,
        allow_pickle=config.allow_pickle,
        trust_remote_code=config.trust_remote_code,
        tokenizer=tokenizer,
    )


def _remove_stale(output: str) -> None:
    """Remove (and say so) what killed runs left next to ``output``."""
    from sparsellm.saving import remove_stale_temporaries

    for path in remove_stale_temporaries(output):
        print(f"sparsellm: removed {path}, left by an earlier run that was killed", file=sys.stderr)


def run_eval(args: argparse.Namespace) -> int:
    from sparsellm.api import default_device
    from sparsellm.distributed import init_from_environment, is_main

    config = eval_config(_settings(args, EvalConfig))
    tasks = _task_names(config.tasks)
    report = _eval_report_path(config)
    if report is not None:  # an hour of evaluation must not end in an unwritable path
        from sparsellm.evaluation import check_report_path

        check_report_path(report)
    windows = tokenizer = None
    if config.dataset is not None:
        from sparsellm.preflight import check_eval_inputs

        check_source(config.dataset)
        # read and checked before the model loads
        tokenizer, _, windows = check_eval_inputs(config)
    else:
        from sparsellm.preflight import check_model_source

        check_model_source(config.model, config.allow_pickle, config.trust_remote_code)
    device = init_from_environment(default_device(config.device))
    model, tokenizer = _load(config, device, tokenizer)
    from sparsellm.guard import check_weights_finite

    check_weights_finite(model)  # a damaged checkpoint would score NaN; name the tensor instead
    progress = not args.quiet and is_main()
    perplexity = _eval_perplexity(config, model, tokenizer, windows, device, progress)
    results = _eval_tasks(config, model, tokenizer, tasks, device, progress) if tasks else None
    if not is_main():
        return 0
    if report is not None:
        from sparsellm.evaluation import record_evaluation

        tasks_entry = results.to_dict() if results is not None else None
        record_evaluation(report, config.model, perplexity, tasks_entry)
        print(f"results added to {report}")
    return 0


def _task_names(text: str | None) -> list[str]:
    """The tasks asked for, lm-eval checked to be installed first (one line if not)."""
    if text is None:
        return []
    from sparsellm.lm_tasks import parse_tasks, require_lm_eval

    require_lm_eval()
    return parse_tasks(text)


def _eval_perplexity(config: EvalConfig, model, tokenizer, windows, device, progress: bool):
    """Perplexity on ``config.dataset`` (printed); the report's entry, or ``None``."""
    if windows is None:
        return None
    from sparsellm.api import evaluate_perplexity
    from sparsellm.distributed import is_main

    ppl = evaluate_perplexity(
        model,
        tokenizer,
        windows,
        seqlen=config.seqlen,
        batch_size=config.batch_size,
        device=device,
        progress=progress,
        across_ranks=True,
    )
    if not math.isfinite(ppl):  # finite weights: the forward overflowed; record nothing
        raise NumericalError(
            f"perplexity is {ppl} ({config.model} on {config.dataset}): the model's activations "
            "overflow on this text; try --dtype float32 or bfloat16"
        )
    if is_main():
        print(f"perplexity {ppl:.4f} ({config.model} on {config.dataset}, seqlen {config.seqlen})")
    entry = {"perplexity": ppl, "seqlen": config.seqlen, "windows": int(windows.shape[0])}
    return {config.dataset: entry}


def _eval_tasks(config: EvalConfig, model, tokenizer, tasks: list[str], device, progress: bool):
    """lm-eval ``tasks`` on the model (moved to ``device``: lm-eval runs it whole there);
    the table is printed."""
    from sparsellm.lm_tasks import evaluate_tasks

    results = evaluate_tasks(
        model.to(device),
        tokenizer,
        tasks,
        num_fewshot=config.num_fewshot,
        limit=config.limit,
        batch_size=config.batch_size,
        task_dirs=[config.task_dir] if config.task_dir else [],
        progress=progress,
    )
    print(results.table())
    return results


def _eval_report_path(config: EvalConfig):
    """Where results go: ``--report``, else the model directory's sparsity report if any."""
    from pathlib import Path

    if config.report is not None:
        return Path(config.report)
    own = Path(config.model) / REPORT
    return own if own.is_file() else None


def _finetune_windows(config: FinetuneConfig, tokenizer: object):
    """Training windows and held-out windows (default: the last 10% of the training text)."""
    from sparsellm.data import consecutive_windows, evaluation_windows, load_text, tokenize

    ids = tokenize(load_text(config.data, split="train"), tokenizer)
    if config.eval:
        held_out = evaluation_windows(config.eval, tokenizer, config.seqlen, config.eval_windows)
    else:
        split = int(ids.numel() * 0.9)
        ids, rest = ids[:split], ids[split:]
        held_out = consecutive_windows(rest, config.seqlen, config.eval_windows)
    return consecutive_windows(ids, config.seqlen, None), held_out


def run_finetune(args: argparse.Namespace) -> int:
    from sparsellm.api import default_device
    from sparsellm.finetune import finetune_from_config
    from sparsellm.saving import save_model

    config = finetune_config(_settings(args, FinetuneConfig))
    check_source(config.data)
    if config.eval:
        check_source(config.eval)
    from sparsellm.preflight import check_finetune_inputs

    # Model source, output and the windows (made here), before the model loads.
    (train, held_out), tokenizer = check_finetune_inputs(config, _finetune_windows)
    device = default_device(config.device)
    _remove_stale(config.output)
    model, tokenizer = _load(config, device, tokenizer)
    result = finetune_from_config(
        model, train, config, eval_windows=held_out, device=device, progress=not args.quiet
    )
    model.to("cpu")
    report = {"config": asdict(config), **result.to_dict()}
    output = save_model(
        model,
        tokenizer,
        config.output,
        save_format=config.save_format,
        reports={"finetune_report.json": report},
    )
    print(
        f"fine-tuned {config.steps} steps in {result.seconds:.0f} s: held-out perplexity "
        f"{result.perplexity_before:.3f} -> {result.perplexity_after:.3f}, sparsity "
        f"{result.sparsity_before:.2%} -> {result.sparsity_after:.2%}"
    )
    print(f"model written to {output}")
    return 0


def run_plan(args: argparse.Namespace) -> int:
    from sparsellm.plan import Workload, dumps, format_plan, make_plan
    from sparsellm.preflight import check_length, load_config

    config = plan_config(_settings(args, PlanConfig))
    model_config = load_config(config.model, config.trust_remote_code)
    check_length("seqlen", config.seqlen, model_config)  # the prune itself would refuse it
    work = Workload(config.method, config.nsamples, config.seqlen, config.epochs, config.batch_size)
    plan = make_plan(model_config, work, config.dtype, config.device_memory, config.ranks)
    print(dumps(plan) if config.json else format_plan(plan, config.model))
    return 0


def _convert_directory(args: argparse.Namespace, compress: bool) -> int:
    """``sparsellm compress`` / ``decompress``: one directory into the other format."""
    from sparsellm.compressed import compress_directory, decompress_directory
    from sparsellm.memory import parse_size

    config = compress_config(_settings(args, CompressConfig))
    _remove_stale(config.output)
    convert = compress_directory if compress else decompress_directory
    sizes = convert(
        config.source,
        config.output,
        parse_size(config.max_shard_size),
        config.trust_remote_code,
        progress=not args.quiet,
    )
    print(sizes.summary() if compress else sizes.summary(restored=True))
    print(f"{'compressed' if compress else 'dense'} model written to {config.output}")
    return 0


def run_compress(args: argparse.Namespace) -> int:
    return _convert_directory(args, compress=True)


def run_decompress(args: argparse.Namespace) -> int:
    return _convert_directory(args, compress=False)


def run_sweep(args: argparse.Namespace) -> int:
    from sparsellm.sweep import Sweep, plot, table

    config = sweep_config(_settings(args, SweepConfig))
    tasks = _task_names(config.tasks)
    if config.plot:
        from sparsellm.plots import require_matplotlib

        require_matplotlib("sweep's plot (--no-plot: csv only)")
    for source in (config.calibration, config.dataset):
        check_source(source)
    from sparsellm.preflight import check_model_source

    check_model_source(config.model, config.allow_pickle, config.trust_remote_code)
    sweep = Sweep(config, progress=not args.quiet)
    done = sweep.run()
    print(table(sweep.rows, tasks))
    skipped = len(sweep.rows) - len(done)
    print(f"{len(done)} point(s) run, {skipped} already in {sweep.csv}")
    if config.plot and sweep.rows:
        print(f"plot written to {plot(config, sweep.rows)}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from sparsellm.layer_report import block_rows, depth_table, label_of, load_report, summary_line

    config = report_config(_settings(args, ReportConfig))
    if config.plot is not None:
        from sparsellm.plots import require_matplotlib

        require_matplotlib()
    reports = [(path, load_report(path)) for path in config.outputs]
    labels = _unique([label_of(path, report) for path, report in reports])
    outputs = [(label, block_rows(r)) for label, (_, r) in zip(labels, reports, strict=True)]
    for label, (_, report) in zip(labels, reports, strict=True):
        print(summary_line(label, report))
    print(depth_table(outputs))
    if config.plot is not None:
        from sparsellm.plots import depth_plot

        print(f"plot written to {depth_plot(outputs, config.plot)}")
    return 0


def _unique(labels: list[str]) -> list[str]:
    """``labels`` with repeats numbered (two outputs of the same method and target)."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if labels.count(label) == 1 else f"{label} ({seen[label]})")
    return out


def run_bench_infer(args: argparse.Namespace) -> int:
    from sparsellm.sparse.bench import run

    return run(bench_infer_config(_settings(args, BenchInferConfig)))


# name, help, description, settings, run: one entry a subcommand.
SUBCOMMANDS = (
    (
        "prune",
        "prune a model and save it",
        "Prune a causal LM layer by layer and save it as a Hugging Face directory.",
        PruneConfig,
        run_prune,
    ),
    (
        "eval",
        "perplexity and lm-evaluation-harness tasks of a model",
        "Perplexity over consecutive windows of a text's test split, and/or "
        "lm-evaluation-harness tasks (--tasks) on the loaded model; results are printed and "
        "added to the report JSON.",
        EvalConfig,
        run_eval,
    ),
    (
        "sweep",
        "prune at several methods and sparsities, score each, plot",
        "Prune the model with every method at every sparsity (from one loaded copy), score "
        "each point (perplexity, optionally lm-eval tasks), write sweep.csv and sweep.png to "
        "--output; a rerun skips the points already in the csv.",
        SweepConfig,
        run_sweep,
    ),
    (
        "report",
        "per-layer sparsity, error and fallbacks across depth of pruned outputs",
        "Per block of one or more pruned outputs, side by side: the sparsity of its layers, "
        "their mean reconstruction error, the block's output error and fallbacks, from each "
        "output's sparsity_report.json; --plot draws them.",
        ReportConfig,
        run_report,
    ),
    (
        "finetune",
        "sparse fine-tuning of a pruned model",
        "Fine-tune a pruned model with its zeros held at zero (or, with --target-sparsity, "
        "sparsify a model while training) and save it.",
        FinetuneConfig,
        run_finetune,
    ),
    (
        "plan",
        "memory and disk a prune needs, from the config alone",
        "Peak device memory, host memory and disk of a prune, for the model in memory, "
        "offloaded to disk, and over K ranks, from the model's config (no weights loaded) "
        "and the formula the engine sizes its chunks with.",
        PlanConfig,
        run_plan,
    ),
    (
        "bench-infer",
        "decode and prefill speed of a pruned model, dense vs sparse",
        "Greedy decode (batch 1) and prefill tokens/s of the model and of its sparse form "
        "(sparsellm.sparse) in one process with the same threads, the bytes of weights a token "
        "reads, the speed-up they bound, and whether the greedy tokens agree.",
        BenchInferConfig,
        run_bench_infer,
    ),
    (
        "compress",
        "store a pruned model's sparse weights compressed",
        "Rewrite a safetensors model directory as a compressed checkpoint (sparse-bitmask: "
        "each sparse Linear weight as a bitmask and its non-zeros, N:M weights as values and "
        "positions), tensor by tensor; load it with sparsellm.load_model.",
        CompressConfig,
        run_compress,
    ),
    (
        "decompress",
        "restore a compressed checkpoint as a dense one",
        "Rewrite a compressed checkpoint as a dense safetensors directory, bit for bit, every "
        "tensor checked first.",
        CompressConfig,
        run_decompress,
    ),
)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: exit 0, 2 for bad input, 1 for a numerical failure, 130 / 143
    when stopped by SIGINT / SIGTERM (one line each; a staged output is removed first)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with signals_unwind():
            code = args.run(args)
            raise_if_stopped()  # a stop a finalizer swallowed still ends the run as a stop
            return code
    except UserError as exc:
        print(f"sparsellm: error: {exc}", file=sys.stderr)
        return 2
    except NumericalError as exc:
        print(f"sparsellm: numerical failure: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sparsellm: interrupted (Ctrl-C); {_STOPPED}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"sparsellm: terminated (SIGTERM); {_STOPPED}", file=sys.stderr)
        return 143


_STOPPED = "nothing half-written was left at the output"


if __name__ == "__main__":
    sys.exit(main())
