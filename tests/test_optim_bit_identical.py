"""SparseOptimizer and finetune() produce bit-identical numbers to those recorded before the
issue-11 split of ``optim.py`` into rules and of ``finetune()`` into steps.

Each case trains the tiny LLaMA of ``conftest.small_llama`` for a few steps on CPU (one thread)
and hashes every parameter and, for the optimizer cases, every entry of ``state_dict()`` (keys,
tensors and plain values, so the checkpoint format is pinned too: a state dict saved by the old
code has the same layout and loads). ``finetune()`` cases hash the parameters and every field of
the report except its wall-clock ``seconds``. Re-record (only for an intended change of numbers)
with ``SPARSELLM_RECORD_HASHES=1 pytest tests/test_optim_bit_identical.py``.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import FIXTURES, check_recorded, recorded, small_llama
from torch import nn

from sparsellm.finetune import finetune
from sparsellm.optim import (
    FrozenMask,
    GradualSparsity,
    HardThreshold,
    L1Proximal,
    SparseOptimizer,
    sparsifiable_parameters,
)

HASHES = FIXTURES / "optim_hashes.json"
STEPS = 6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Bit-identity needs a fixed reduction order: one intra-op thread, as recorded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _feed(digest: Any, value: Any) -> None:
    """Hash ``value`` (nested dicts / lists of tensors and plain values) in a fixed order."""
    if isinstance(value, torch.Tensor):
        t = value.detach().contiguous().cpu()
        digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(b"{")
        for key in sorted(value, key=repr):
            digest.update(repr(key).encode())
            _feed(digest, value[key])
        digest.update(b"}")
    elif isinstance(value, list | tuple):
        digest.update(b"[")
        for item in value:
            _feed(digest, item)
        digest.update(b"]")
    elif isinstance(value, float):
        digest.update(value.hex().encode())
    else:
        digest.update(repr(value).encode())


def _hash(model: nn.Module, extra: Any) -> str:
    digest = hashlib.sha256()
    _feed(digest, dict(model.named_parameters()))
    _feed(digest, extra)
    return digest.hexdigest()


def _prune_half(model: nn.Module) -> nn.Module:
    """Zero the smaller-magnitude half of each decoder Linear weight (rank-based, exact)."""
    with torch.no_grad():
        for _, p in sparsifiable_parameters(model):
            order = torch.sort(p.abs().reshape(-1), stable=True).indices
            p.view(-1)[order[: p.numel() // 2]] = 0
    return model


def _windows(seed: int = 0, n: int = 8) -> torch.Tensor:
    return torch.randint(0, 128, (n, 16), generator=torch.Generator().manual_seed(seed))


def _train(model: nn.Module, opt: SparseOptimizer, steps: range, closure: bool = False) -> None:
    """A few LM steps under a decaying LR, so the thresholds see per-step learning rates."""
    # A resumed run continues the same LR sequence from ``steps.start``.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9 ** (s + steps.start))
    for step in steps:
        ids = _windows(seed=100 + step, n=2)

        def loss_fn(ids: torch.Tensor = ids) -> torch.Tensor:
            opt.zero_grad()
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            return loss

        if closure:
            opt.step(loss_fn)
        else:
            loss_fn()
            opt.step()
        sched.step()


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)


# name → (pruned start?, base optimizer, SparseOptimizer keywords)
OPTIM_CASES: dict[str, tuple[bool, Callable, dict[str, Any]]] = {
    "l1-adamw": (False, _adamw, {"penalty": "l1", "lam": 2e-4}),
    "l1-adamw-decoupled": (False, _adamw, {"penalty": "l1", "lam": 0.5, "preconditioned": False}),
    "l1-sgd": (False, _sgd, {"penalty": "l1", "lam": 0.005}),
    "l0-sgd": (False, _sgd, {"penalty": "l0", "lam": 2e-4}),
    "l0-adamw": (False, _adamw, {"penalty": "l0", "lam": 1e-6}),
    "schedule-fisher-adamw": (
        False,
        _adamw,
        {"target_sparsity": 0.6, "schedule_steps": 4, "schedule_start": 1},
    ),
    "schedule-fisher-sgd": (
        False,
        _sgd,
        {"target_sparsity": 0.5, "initial_sparsity": 0.1, "schedule_steps": 3},
    ),
    "schedule-magnitude-adamw": (
        False,
        _adamw,
        {
            "target_sparsity": 0.7,
            "schedule_steps": 4,
            "schedule": "linear",
            "saliency": "magnitude",
        },
    ),
    "schedule-keep-mask-sgd": (
        True,
        _sgd,
        {"target_sparsity": 0.75, "initial_sparsity": 0.5, "schedule_steps": 4, "keep_mask": True},
    ),
    "frozen-mask-adamw": (True, _adamw, {"keep_mask": True}),
    "frozen-mask-l1-sgd": (True, _sgd, {"keep_mask": True, "lam": 0.005}),
}


def _build(case: str, seed: int = 0) -> tuple[nn.Module, SparseOptimizer]:
    pruned, make_base, options = OPTIM_CASES[case]
    model = small_llama(seed)
    if pruned:
        _prune_half(model)
    return model, SparseOptimizer(make_base(model), model=model, **options)


def _run_optim(case: str) -> str:
    model, opt = _build(case)
    _train(model, opt, range(STEPS))
    return _hash(model, opt.state_dict())


def _run_closure() -> str:
    model, opt = _build("l1-sgd")
    _train(model, opt, range(STEPS), closure=True)
    return _hash(model, opt.state_dict())


def _run_resumed() -> str:
    """Half a schedule, a checkpoint, and the rest on a fresh wrapper that loaded it."""
    model, opt = _build("schedule-fisher-sgd")
    _train(model, opt, range(STEPS // 2))
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    resumed, opt2 = _build("schedule-fisher-sgd", seed=1)
    resumed.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    _train(resumed, opt2, range(STEPS // 2, STEPS))
    return _hash(resumed, opt2.state_dict())


FINETUNE_CASES: dict[str, tuple[bool, dict[str, Any]]] = {
    "keep-mask": (True, {"weight_decay": 0.1, "warmup_steps": 2, "eval": True}),
    "keep-mask-linear-noclip": (True, {"lr_schedule": "linear", "max_grad_norm": None}),
    "keep-mask-bf16": (True, {"mixed_precision": "bf16", "steps": 3}),
    "keep-mask-fp16-scaler": (True, {"mixed_precision": "fp16", "steps": 3}),
    "target-dense": (False, {"target_sparsity": 0.5, "warmup_steps": 2, "eval": True}),
    "target-from-pruned": (True, {"target_sparsity": 0.7, "schedule_steps": 3, "batch_size": 3}),
}


def _run_finetune(case: str) -> str:
    pruned, options = FINETUNE_CASES[case]
    options = dict(options)
    model = small_llama(0)
    if pruned:
        _prune_half(model)
    windows = _windows()
    report = finetune(
        model,
        windows,
        steps=options.pop("steps", 8),
        lr=1e-2,
        batch_size=options.pop("batch_size", 4),
        eval_windows=windows[:4] if options.pop("eval", False) else None,
        progress=False,
        mixed_precision=options.pop("mixed_precision", "no"),
        **options,
    )
    fields = report.to_dict()
    del fields["seconds"]
    return _hash(model, fields)


RUNS: dict[str, Callable[[], str]] = {
    **{f"optim/{case}": (lambda case=case: _run_optim(case)) for case in OPTIM_CASES},
    "optim/closure-l1-sgd": _run_closure,
    "optim/resumed-schedule-fisher-sgd": _run_resumed,
    **{f"finetune/{case}": (lambda case=case: _run_finetune(case)) for case in FINETUNE_CASES},
}


# The case whose digest tells machines whose kernels round differently apart (conftest).
CANARIES = [("optim/l1-sgd", RUNS["optim/l1-sgd"])]


@pytest.mark.parametrize("key", list(RUNS))
def test_optimizer_and_finetune_are_bit_identical(key):
    check_recorded(HASHES, key, RUNS[key](), "parameters or optimizer state changed", CANARIES)


@pytest.mark.parametrize(
    ("case", "rules"),
    [
        (
            "schedule-keep-mask-sgd",
            lambda: [FrozenMask(), GradualSparsity(0.75, initial=0.5, steps=4)],
        ),
        ("frozen-mask-l1-sgd", lambda: [FrozenMask(), L1Proximal(0.005)]),
        ("l0-adamw", lambda: [HardThreshold(1e-6)]),
    ],
)
def test_explicit_rules_match_the_flags(case, rules):
    """``rules=[...]`` built by hand gives the very numbers of the flags that build them."""
    pruned, make_base, _ = OPTIM_CASES[case]
    model = small_llama(0)
    if pruned:
        _prune_half(model)
    opt = SparseOptimizer(make_base(model), model=model, rules=rules())
    _train(model, opt, range(STEPS))
    assert _hash(model, opt.state_dict()) == recorded(HASHES, f"optim/{case}", CANARIES)
    with pytest.raises(ValueError, match="either rules= or"):
        SparseOptimizer(make_base(model), model=model, rules=rules(), keep_mask=True)
