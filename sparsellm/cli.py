"""``sparsellm prune`` / ``sparsellm eval``: argument parsing over the Python API.

Every problem with the user's input is reported as one line on stderr with exit code 2, and is
detected before anything is written.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict

from sparsellm.config import (
    ConfigError,
    EvalConfig,
    PruneConfig,
    load_recipe,
    merge,
    validate_prune,
)
from sparsellm.data import check_source, describe_sources
from sparsellm.errors import UserError
from sparsellm.methods import METHODS, needs_calibration
from sparsellm.solvers import NumericalError

REPORT = "sparsity_report.json"


def _prune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune",
        help="prune a model and save it",
        description="Prune a causal LM layer by layer and save it as a Hugging Face directory.",
    )
    p.add_argument("--recipe", help="TOML file with any of these options (flags override it)")
    p.add_argument("--model", help="hub id, local model directory, or .gguf file")
    p.add_argument("--output", help="directory to write the pruned model to")
    p.add_argument("--method", help=f"one of {', '.join(METHODS)} (default: sparsegpt)")
    p.add_argument("--sparsity", type=float, help="fraction of zeros per layer (default 0.5)")
    p.add_argument("--pattern", help="N:M structured sparsity: keep N of every M, e.g. 2:4")
    p.add_argument(
        "--calibration", help=f"calibration text (default: builtin): {describe_sources()}"
    )
    p.add_argument("--nsamples", type=int, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, help="tokens per calibration window (default 512)")
    p.add_argument("--seed", type=int, help="seed for window sampling (default 0)")
    p.add_argument(
        "--device", help="device for the block being pruned (default: cuda if available)"
    )
    p.add_argument("--dtype", help="auto (default), float32, float16 or bfloat16")
    p.add_argument("--dampening", type=float, help="Hessian damping, fraction of mean diagonal")
    p.add_argument("--blocksize", type=int, help="SparseGPT column block size (default 128)")
    p.add_argument(
        "--batch-size", type=int, help="calibration windows per forward pass (default 32)"
    )
    p.add_argument("--skip", help="regex on layer names to leave dense (e.g. 'layers\\.0\\.')")
    p.add_argument(
        "--overwrite", action="store_true", default=None, help="replace a non-empty output"
    )
    p.add_argument(
        "--no-guard",
        dest="guard",
        action="store_false",
        default=None,
        help="keep going when a block's output error exceeds 1 (default: re-do it with "
        "SparseGPT, stop if still above 1)",
    )
    p.add_argument("--epochs", type=int, help="sparsellm: alternation epochs (default 1)")
    p.add_argument("--alpha", type=float, help="sparsellm: penalty α (default: automatic)")
    p.add_argument("--beta", type=float, help="sparsellm: penalty β (default: automatic)")
    p.add_argument("--gamma", type=float, help="sparsellm: penalty γ (default: automatic)")
    p.add_argument("--eval", help="text source for perplexity before and after pruning")
    p.add_argument("--eval-seqlen", type=int, help="window length for --eval (default: seqlen)")
    p.add_argument("--eval-windows", type=int, help="at most this many windows for --eval")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run_prune)


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity of a model",
        description="Perplexity over consecutive windows of a text's test split.",
    )
    p.add_argument("--recipe", help="TOML file with any of these options (flags override it)")
    p.add_argument("--model", help="hub id, local model directory, or .gguf file")
    p.add_argument("--dataset", help=f"text (default wikitext2): {describe_sources()}")
    p.add_argument("--seqlen", type=int, help="tokens per window (default 2048)")
    p.add_argument("--max-windows", type=int, help="evaluate at most this many windows")
    p.add_argument("--batch-size", type=int, help="windows per forward pass (default 4)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", help="auto (default), float32, float16 or bfloat16")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run_eval)


class _Parser(argparse.ArgumentParser):
    """argparse with the toolkit's one-line error format (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"sparsellm: error: {message} (see '{self.prog} --help')\n")


def _finetune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="sparse fine-tuning of a pruned model",
        description="Fine-tune a pruned model with its zeros held at zero (or, with "
        "--target-sparsity, sparsify a model while training) and save it.",
    )
    p.add_argument("--recipe", help="TOML file with any of these options (flags override it)")
    p.add_argument("--model", help="pruned model directory, hub id or .gguf file")
    p.add_argument("--output", help="directory to write the fine-tuned model to")
    p.add_argument("--data", help=f"training text (default builtin): {describe_sources()}")
    p.add_argument("--eval", help="held-out text (default: the last 10%% of --data)")
    p.add_argument("--steps", type=int, help="optimizer steps (default 200)")
    p.add_argument("--lr", type=float, help="peak learning rate of AdamW (default 1e-4)")
    p.add_argument("--batch-size", type=int, help="windows per step (default 4)")
    p.add_argument("--seqlen", type=int, help="tokens per window (default 512)")
    p.add_argument("--eval-windows", type=int, help="held-out windows to score (default 64)")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up (default 10%% of steps)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    p.add_argument("--target-sparsity", type=float, help="sparsify to this while training")
    p.add_argument(
        "--mixed-precision",
        help="autocast of the training step: auto (default: bf16 where the device has fast "
        "bf16, else none), bf16, fp16 or no",
    )
    p.add_argument("--seed", type=int, help="seed of the batch order (default 0)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", help="auto (default), float32, float16 or bfloat16")
    p.add_argument(
        "--overwrite", action="store_true", default=None, help="replace a non-empty output"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run_finetune)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparsellm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _prune_parser(sub)
    _eval_parser(sub)
    _finetune_parser(sub)
    return parser


def _options(args: argparse.Namespace, schema: type) -> dict:
    names = {name for name in vars(args) if name not in ("recipe", "run", "command", "quiet")}
    known = set(schema.__dataclass_fields__)
    return {name: getattr(args, name) for name in names & known}


def run_prune(args: argparse.Namespace) -> int:
    import torch

    from sparsellm.api import default_device, prune_model
    from sparsellm.distributed import init_from_environment, is_main
    from sparsellm.evaluation import windows_perplexity
    from sparsellm.loading import load_model_and_tokenizer
    from sparsellm.saving import save_model

    started = time.perf_counter()
    recipe = load_recipe(args.recipe, PruneConfig) if args.recipe else {}
    config: PruneConfig = merge(PruneConfig, recipe, _options(args, PruneConfig))
    target = validate_prune(config)
    if needs_calibration(config.method):
        check_source(config.calibration)
    if config.eval:
        check_source(config.eval)
    # Under torchrun every rank runs this; rank 0 alone reports and writes.
    device = init_from_environment(default_device(config.device))
    main_rank = is_main()
    progress = not args.quiet and main_rank

    model, tokenizer = load_model_and_tokenizer(config.model, config.dtype, device)
    loaded = time.perf_counter()
    eval_windows = None
    perplexity = {}

    def score(windows: torch.Tensor) -> float:
        # The model stays where it was loaded; blocks stream through ``device`` if needed.
        return windows_perplexity(
            model,
            windows,
            batch_size=config.batch_size,
            device=device,
            progress=progress,
            across_ranks=True,
        )

    if config.eval:
        from sparsellm.data import evaluation_windows

        eval_windows = evaluation_windows(
            config.eval, tokenizer, config.eval_seqlen or config.seqlen, config.eval_windows
        )
        perplexity["dense"] = score(eval_windows)
        if main_rank:
            print(f"dense perplexity: {perplexity['dense']:.3f}", flush=True)

    options = {
        k: v
        for k, v in config.to_dict().items()
        if k
        not in (
            "model",
            "output",
            "overwrite",
            "eval",
            "method",
            "sparsity",
            "pattern",
            "calibration",
        )
    }
    report = prune_model(
        model,
        tokenizer,
        sparsity=target.sparsity if not target.is_nm else None,
        pattern=config.pattern,
        method=config.method,
        calibration=config.calibration,
        progress=progress,
        **options,
    )
    report.model = config.model
    report.config.update(model=config.model, output=config.output, eval=config.eval)
    report.timings["load"] = loaded - started
    if eval_windows is not None:
        perplexity["pruned"] = score(eval_windows)
        report.perplexity = perplexity
    report.timings["total"] = time.perf_counter() - started
    if not main_rank:
        return 0
    output = save_model(model, tokenizer, {REPORT: report.to_dict()}, config.output)
    print(report.summary())
    print(f"pruned model written to {output}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from sparsellm.api import default_device, evaluate_perplexity
    from sparsellm.distributed import init_from_environment, is_main
    from sparsellm.loading import load_model_and_tokenizer

    recipe = load_recipe(args.recipe, EvalConfig) if args.recipe else {}
    config: EvalConfig = merge(EvalConfig, recipe, _options(args, EvalConfig))
    if not config.model:
        raise ConfigError("no model given (--model or 'model' in the recipe)")
    for name in ("seqlen", "batch_size", "max_windows"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    check_source(config.dataset)
    device = init_from_environment(default_device(config.device))
    model, tokenizer = load_model_and_tokenizer(config.model, config.dtype, device)
    ppl = evaluate_perplexity(
        model,
        tokenizer,
        config.dataset,
        seqlen=config.seqlen,
        max_windows=config.max_windows,
        batch_size=config.batch_size,
        device=device,
        progress=not args.quiet and is_main(),
        across_ranks=True,
    )
    if not is_main():
        return 0
    print(f"perplexity {ppl:.4f} ({config.model} on {config.dataset}, seqlen {config.seqlen})")
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    from sparsellm.api import default_device
    from sparsellm.config import FinetuneConfig, validate_finetune
    from sparsellm.data import consecutive_windows, evaluation_windows, load_text, tokenize
    from sparsellm.finetune import finetune
    from sparsellm.loading import load_model_and_tokenizer
    from sparsellm.saving import save_model

    recipe = load_recipe(args.recipe, FinetuneConfig) if args.recipe else {}
    config: FinetuneConfig = merge(FinetuneConfig, recipe, _options(args, FinetuneConfig))
    validate_finetune(config)
    check_source(config.data)
    if config.eval:
        check_source(config.eval)
    device = default_device(config.device)
    model, tokenizer = load_model_and_tokenizer(config.model, config.dtype, device)

    ids = tokenize(load_text(config.data, split="train"), tokenizer)
    if config.eval:
        held_out = evaluation_windows(config.eval, tokenizer, config.seqlen, config.eval_windows)
    else:
        split = int(ids.numel() * 0.9)
        ids, rest = ids[:split], ids[split:]
        held_out = consecutive_windows(rest, config.seqlen, config.eval_windows)
    train = consecutive_windows(ids, config.seqlen, None)

    result = finetune(
        model,
        train,
        steps=config.steps,
        lr=config.lr,
        batch_size=config.batch_size,
        eval_windows=held_out,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        seed=config.seed,
        device=device,
        progress=not args.quiet,
        target_sparsity=config.target_sparsity,
        mixed_precision=config.mixed_precision,
    )
    model.to("cpu")
    report = {"config": asdict(config), **result.to_dict()}
    output = save_model(model, tokenizer, {"finetune_report.json": report}, config.output)
    print(
        f"fine-tuned {config.steps} steps in {result.seconds:.0f} s: held-out perplexity "
        f"{result.perplexity_before:.3f} -> {result.perplexity_after:.3f}, sparsity "
        f"{result.sparsity_before:.2%} -> {result.sparsity_after:.2%}"
    )
    print(f"model written to {output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UserError as exc:
        print(f"sparsellm: error: {exc}", file=sys.stderr)
        return 2
    except NumericalError as exc:
        print(f"sparsellm: numerical failure: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
