"""The flag-style settings of :class:`~sparsellm.optim.SparseOptimizer`, turned into rules."""

from __future__ import annotations

from dataclasses import dataclass

from sparsellm.optim.rules import FrozenMask, HardThreshold, L1Proximal, SparsityRule
from sparsellm.optim.schedule import SALIENCIES, GradualSparsity

__all__ = ["PENALTIES", "SparsityFlags"]

PENALTIES = {"l1": L1Proximal, "l0": HardThreshold}


@dataclass(frozen=True)
class SparsityFlags:
    """The ``SparseOptimizer`` keywords that pick its rules (see its docstring for each)."""

    penalty: str = "l1"
    lam: float = 0.0
    target_sparsity: float | None = None
    initial_sparsity: float = 0.0
    schedule_steps: int | None = None
    schedule: str = "cubic"
    schedule_start: int = 0
    saliency: str = "fisher"
    keep_mask: bool = False
    preconditioned: bool = True

    def rules(self) -> list[SparsityRule]:
        """Validate the flags and build the rules they mean, in the order they apply:
        :class:`FrozenMask` first (its zeros are held before the schedule counts them), then
        the schedule or, with ``lam > 0``, the proximal step of ``penalty``."""
        if self.penalty not in PENALTIES:
            raise ValueError(f"penalty must be 'l1' or 'l0', not {self.penalty!r}")
        # The proximal rule validates lam; built even when lam == 0 so a bad lam always fails.
        prox = PENALTIES[self.penalty](self.lam, preconditioned=self.preconditioned)
        rules: list[SparsityRule] = [FrozenMask()] if self.keep_mask else []
        if self.target_sparsity is not None:
            rules.append(self._schedule())
            if prox.lam > 0.0:
                raise ValueError("lam must be 0 with target_sparsity (the schedule sets τ)")
        elif prox.lam > 0.0:
            rules.append(prox)
        # Checked in every mode, so a typo fails even where the schedule is off.
        if int(self.schedule_start) < 0:
            raise ValueError(f"schedule_start must be >= 0, got {self.schedule_start}")
        if self.saliency not in SALIENCIES:
            raise ValueError(f"saliency must be 'fisher' or 'magnitude', not {self.saliency!r}")
        return rules

    def _schedule(self) -> GradualSparsity:
        return GradualSparsity(
            self.target_sparsity,
            initial=self.initial_sparsity,
            steps=self.schedule_steps,
            schedule=self.schedule,
            start=self.schedule_start,
            saliency=self.saliency,
        )
