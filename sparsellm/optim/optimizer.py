"""``SparseOptimizer``: any ``torch.optim`` step, then held masks and sparsity rules."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from sparsellm.optim.flags import SparsityFlags
from sparsellm.optim.rules import SparsityRule
from sparsellm.optim.schedule import GradualSparsity
from sparsellm.optim.selection import ParamSelection, select_parameters, zero_fraction

__all__ = ["SparseOptimizer"]

_STATE_KEY = "sparse_optimizer"
# torch.optim.Optimizer's hook registries, rebuilt by hand (see __init__).
_HOOKS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


class SparseOptimizer(torch.optim.Optimizer):
    """Wrap any ``torch.optim.Optimizer`` and sparsify selected weights after each of its steps.

    The wrapper *is* an Optimizer sharing ``param_groups``, ``state`` and ``defaults`` with the
    base (they are properties that delegate), so LR schedulers, ``torch.amp.GradScaler``,
    ``transformers.Trainer`` and accelerate see the base's groups and learning rates. Each
    ``step()``: mask gradients of held zeros → base step → re-apply held masks → each rule's
    ``apply`` in order (see :mod:`sparsellm.optim.rules`). Parameters that are not selected get
    the base update only.

    The mode flags build the rules (combinable except where noted):

    * ``penalty="l1"``, ``lam > 0`` — :class:`~sparsellm.optim.rules.L1Proximal`, soft
      threshold with ``τ = lr·lam`` (``lr`` of each param group at every step). ``lam=0`` adds
      no rule and is bit-identical to the base optimizer.
    * ``penalty="l0"`` — :class:`~sparsellm.optim.rules.HardThreshold`, the prox of
      ``lam·‖w‖₀``: zero ``w_i`` iff ``|w_i| ≤ √(2τ_i)``.
    * ``target_sparsity=s_f`` — :class:`~sparsellm.optim.schedule.GradualSparsity`: after every
      step each selected tensor has exactly ``round(s_t·numel)`` zeros on a cubic or linear ramp
      from ``initial_sparsity`` over ``schedule_steps`` steps starting after ``schedule_start``,
      chosen by ``saliency`` rank, never regrowing. ``lam`` must be 0 here.
    * ``keep_mask=True`` — :class:`~sparsellm.optim.rules.FrozenMask`: zeros of the selected
      params present now stay exactly zero (sparse fine-tuning after one-shot pruning).

    With an Adam-style base and ``preconditioned=True`` (default) the proximal rules threshold
    in Adam's metric, ``τ_i = lr·lam / (√v̂_i + eps)``; ``False`` uses the scalar ``τ``.
    Or pass ``rules=[...]`` (any :class:`~sparsellm.optim.rules.SparsityRule`) instead of flags.

    Args:
        base_optimizer: the optimizer doing the gradient step; it must optimise every selected
            parameter.
        params_to_sparsify: which tensors the rules act on. ``None`` → with ``model``,
            :func:`~sparsellm.optim.sparsifiable_parameters` of it, otherwise every parameter
            of the base optimizer; an iterable of tensors or of ``(name, tensor)`` pairs; or a
            callable ``(name, param) -> bool`` applied to ``model.named_parameters()``.
        model: used for the default selection, a callable selection and for naming params.
        penalty: ``"l1"`` (soft threshold) or ``"l0"`` (hard threshold).
        lam: penalty weight ``λ ≥ 0``.
        target_sparsity: final sparsity ``s_f`` in ``[0, 1)`` of the schedule mode.
        initial_sparsity: schedule start ``s_0``, ``0 ≤ s_0 ≤ s_f``.
        schedule_steps: ``T ≥ 1``, steps of the ramp (required with ``target_sparsity``).
        schedule: ``"cubic"`` or ``"linear"``.
        schedule_start: steps before the ramp begins (``s_0`` until then), ``≥ 0``.
        saliency: ``"fisher"`` (``w²·F``) or ``"magnitude"`` (``|w|``), the schedule's ranking.
        keep_mask: freeze the zeros present now.
        preconditioned: take the prox in the Adam metric (see above).
        rules: the rules to apply, in order, instead of those the flags build (then every flag
            must keep its default).
    """

    # GradScaler must unscale and check for infs itself, never hand them to ``step``: the rules
    # have to be skipped together with the base update on an overflow step.
    _step_supports_amp_scaling = False

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        *,
        params_to_sparsify: ParamSelection = None,
        model: nn.Module | None = None,
        penalty: str = "l1",
        lam: float = 0.0,
        target_sparsity: float | None = None,
        initial_sparsity: float = 0.0,
        schedule_steps: int | None = None,
        schedule: str = "cubic",
        schedule_start: int = 0,
        saliency: str = "fisher",
        keep_mask: bool = False,
        preconditioned: bool = True,
        rules: Sequence[SparsityRule] | None = None,
    ) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer: {base_optimizer!r}")
        if isinstance(base_optimizer, SparseOptimizer):
            raise TypeError("wrapping a SparseOptimizer in another is not supported")
        flags = SparsityFlags(
            penalty=penalty,
            lam=lam,
            target_sparsity=target_sparsity,
            initial_sparsity=initial_sparsity,
            schedule_steps=schedule_steps,
            schedule=schedule,
            schedule_start=schedule_start,
            saliency=saliency,
            keep_mask=keep_mask,
            preconditioned=preconditioned,
        )
        if rules is not None and flags != SparsityFlags():
            raise ValueError("pass either rules= or the mode flags, not both")
        self.rules: list[SparsityRule] = flags.rules() if rules is None else list(rules)

        # Deliberately not Optimizer.__init__: it would build a second set of param_groups,
        # while ours must stay the base's own (properties below). Only its hook machinery is
        # reproduced, so step/state-dict hooks and the profiler patching work on the wrapper.
        self.base_optimizer = base_optimizer
        self._init_hooks()
        self._warned_capturable_if_run_uncaptured = True
        self.sparse_step = 0  # optimizer steps taken through the wrapper

        self.sparsified_parameters = select_parameters(params_to_sparsify, model, self.param_groups)
        optimized = {id(p) for g in self.param_groups for p in g["params"]}
        missing = [n for n, p in self.sparsified_parameters if id(p) not in optimized]
        if missing:
            raise ValueError(f"the base optimizer does not optimise {missing[:5]}")
        # Per selected param: bool tensor of entries held at zero (True), or None (no mask yet).
        # Rules write it, this wrapper enforces it.
        self.masks: list[torch.Tensor | None] = [None] * len(self.sparsified_parameters)
        for rule in self.rules:
            rule.bind(self)

    def _init_hooks(self) -> None:
        for name in _HOOKS:
            self.__dict__.setdefault(name, OrderedDict())
        self._patch_step_function()

    # --- shared with the base optimizer ---------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.base_optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.base_optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.base_optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.base_optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.base_optimizer.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer (new params are not sparsified)."""
        self.base_optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset gradients through the base optimizer."""
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        return (
            f"SparseOptimizer(rules={self.rules!r}, "
            f"tensors={len(self.sparsified_parameters)}, base={self.base_optimizer!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        # Hooks and the scheduler's instance-level ``step`` patch may not pickle; the base
        # optimizer, rules and masks are the real state.
        skip = {"step", *_HOOKS}
        return {k: v for k, v in self.__dict__.items() if k not in skip}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_hooks()

    # --- reporting ------------------------------------------------------------------------
    def sparsity(self) -> float:
        """Fraction of exact zeros over all selected parameters."""
        return zero_fraction(p for _, p in self.sparsified_parameters)

    def scheduled_sparsity(self, step: int | None = None) -> float | None:
        """The schedule's ``s_t`` after ``step`` steps (default: steps taken so far); ``None``
        without a :class:`~sparsellm.optim.schedule.GradualSparsity` rule."""
        schedule = self._schedule_rule()
        if schedule is None:
            return None
        return schedule.sparsity_at(self.sparse_step if step is None else step)

    def _schedule_rule(self) -> GradualSparsity | None:
        return next((r for r in self.rules if isinstance(r, GradualSparsity)), None)

    @property
    def _fisher(self) -> list[torch.Tensor | None]:
        """The wrapper's own Fisher EMAs per selected param (all ``None`` where the base
        optimizer's second moment serves, or no Fisher-ranked schedule runs)."""
        schedule = self._schedule_rule()
        fisher = schedule.fisher if schedule is not None else None
        return fisher if fisher is not None else [None] * len(self.sparsified_parameters)

    # --- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradients of held-at-zero entries. ``step`` does this itself; call it
        before gradient clipping so pruned entries do not count in the norm."""
        for (_, p), mask in zip(self.sparsified_parameters, self.masks, strict=True):
            if mask is not None and p.grad is not None:
                p.grad.masked_fill_(mask, 0)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Base optimizer step, then held masks and the rules."""
        wrapped = None
        if closure is not None:

            def wrapped() -> float:
                # Closures recompute gradients inside the base step, after our pre-masking.
                loss = closure()
                self.mask_gradients()
                return loss

        self.mask_gradients()
        loss = self.base_optimizer.step() if wrapped is None else self.base_optimizer.step(wrapped)
        self.sparse_step += 1
        self._after_base_step()
        return loss

    @torch.no_grad()
    def _after_base_step(self) -> None:
        # Momentum and weight decay move held entries off zero; put them back before any rule
        # ranks or thresholds the weights.
        for (_, p), mask in zip(self.sparsified_parameters, self.masks, strict=True):
            if mask is not None:
                p.masked_fill_(mask, 0)
        for rule in self.rules:
            rule.apply(self)

    # --- checkpointing -----------------------------------------------------------------------
    def _global_indices(self) -> list[int]:
        """Each selected param's index in the packed ``state_dict`` numbering."""
        index: dict[int, int] = {}
        for group in self.param_groups:
            for p in group["params"]:
                index.setdefault(id(p), len(index))
        return [index[id(p)] for _, p in self.sparsified_parameters]

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus a ``"sparse_optimizer"`` entry (step count,
        selected param indices, held masks and the rules' own state such as the Fisher EMAs,
        tensors keyed by param index)."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state_dict = self.base_optimizer.state_dict()
        indices = self._global_indices()
        own: dict[str, Any] = {
            "step": self.sparse_step,
            "params": indices,
            "masks": {i: m for i, m in zip(indices, self.masks, strict=True) if m is not None},
            # Always present, as in every checkpoint written so far; a Fisher schedule fills it.
            "fisher": {},
        }
        for rule in self.rules:
            own.update(rule.state_dict(self, indices))
        state_dict[_STATE_KEY] = own
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (a plain base-optimizer state dict loads
        too, leaving the wrapper's own state as it is)."""
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = dict(result)
        own = state_dict.pop(_STATE_KEY, None)
        self.base_optimizer.load_state_dict(state_dict)
        if own is not None:
            self._load_own(own)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _load_own(self, own: dict[str, Any]) -> None:
        indices = self._global_indices()
        if list(own["params"]) != indices:
            raise ValueError(
                "the saved SparseOptimizer sparsified other parameters "
                f"({list(own['params'])[:8]}…) than this one ({indices[:8]}…)"
            )
        masks: list[torch.Tensor | None] = []
        for idx, (name, p) in zip(indices, self.sparsified_parameters, strict=True):
            mask = own["masks"].get(idx)
            if mask is not None:
                if mask.shape != p.shape:
                    raise ValueError(f"saved mask of {name} has shape {tuple(mask.shape)}")
                mask = mask.to(device=p.device, dtype=torch.bool, copy=True)
            masks.append(mask)
        self.masks = masks
        for rule in self.rules:
            rule.load_state_dict(self, own, indices)
        self.sparse_step = int(own["step"])
