"""Numerical checks of what a block pruner assumes about a block, made on the dense block.

SparseLLM takes two shortcuts when a block allows them, and this module decides whether it
does, on the first calibration batch, before any weight changes:

* **FFN wiring.** The joint solve needs ``down(act(up(x)))`` (or the gated form) to be what the
  block's FFN computes. Each candidate wiring (the family's own, then every one the Linear
  shapes allow) is run on the inputs the up layer saw and compared with what the down layer
  produced; the first that reproduces it is used. None: the FFN is pruned layer by layer.
* **Residual target.** If the block output is ``r + F`` with ``r`` independent of the FFN
  output ``F`` (pre-norm blocks), the FFN may be asked to absorb the attention's error
  (target ``B₀ − r``) and the pruned block's output is ``r + FFN(X)`` without a forward pass.
  Checked by adding a random ``δ`` to ``F`` inside a forward pass: the block output must move by
  exactly ``δ``. A norm after the FFN (Gemma 2/3, OLMo 2 "sandwich" blocks) or after the
  residual sum (OPT-350m), a scale on the branch, anything else fails it, and the pruner takes
  the general path: the FFN's own dense output as target, outputs from running the block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from sparsellm.distributed import all_reduce_sum_
from sparsellm.errors import NonFiniteError
from sparsellm.models import FeedForward, UnsupportedModelError

if TYPE_CHECKING:
    from sparsellm.engine import BlockStore


@dataclass(frozen=True)
class Layout:
    """What the checks allow for one block, and why (for the report)."""

    ffn: FeedForward | None  # a wiring that reproduces the block's FFN, or None
    residual: bool  # block output = r + FFN output, with r independent of the FFN
    reason: str  # the same words for every block that took this path for this reason
    deviation: float | None = None  # residual test: ‖ΔB − δ‖ / ‖δ‖ (0 when B = r + F)


def tolerance(dtype: torch.dtype) -> float:
    """Relative error that still counts as "the same computation" in ``dtype``."""
    return max(1e-3, 4 * torch.finfo(dtype).eps)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).float()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _agreed(failed: bool, device: torch.device) -> bool:
    """Whether any rank failed: ranks must take the same path, or their collectives would not
    pair up."""
    return bool(all_reduce_sum_(torch.tensor([float(failed)], device=device)) > 0)


@torch.no_grad()
def _observe(
    block: nn.Module, batch: tuple, names: set[str], add: dict[str, torch.Tensor] | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Run ``block`` on ``batch``: its output, the first input and output of each layer in
    ``names``, and with ``add`` a tensor added to those layers' outputs on the way."""
    from sparsellm.engine import block_output

    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            inputs.setdefault(name, args[0].detach())
            # A copy: some blocks (Falcon) add into the FFN output in place afterwards.
            outputs.setdefault(name, output.detach().clone())
            return output + add[name] if add and name in add else None

        return record

    handles = [block.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        hidden, args, kwargs = batch
        out = block_output(block(hidden, *args, **kwargs))
    finally:
        for handle in handles:
            handle.remove()
    return out, inputs, outputs


def _matching_wiring(
    candidates: list[FeedForward],
    layers: dict[str, nn.Module],
    inputs: dict[str, torch.Tensor],
    outputs: dict[str, torch.Tensor],
    tol: float,
    device: torch.device,
) -> FeedForward | None:
    """The first candidate that reproduces the FFN output on every rank (tried in order: the
    family's own wiring usually matches at once, sparing the others' FFN passes)."""
    for ffn in candidates:
        failed = ffn.up not in inputs or ffn.down not in outputs
        if not failed:
            try:
                computed = ffn.forward(_flat(inputs[ffn.up]), layers)
                failed = not _relative(computed, _flat(outputs[ffn.down])) <= tol
            except (RuntimeError, TypeError, ValueError):  # a guess whose parts do not fit
                failed = True
        if not _agreed(failed, device):
            return ffn
    return None


def first_windows(batch: tuple, count: int) -> tuple:
    """The first ``count`` windows of a calibration ``batch``: every tensor (hidden states,
    masks, rotary tables) whose leading size is the batch's window count is cut to ``count``;
    tensors shared by all windows (leading size 1) and other values stay as they are."""
    hidden = batch[0]
    windows = hidden.shape[0]
    if hidden.dim() < 3 or windows <= count:
        return batch

    def cut(value: object) -> object:
        if isinstance(value, torch.Tensor):
            return value[:count] if value.dim() > 0 and value.shape[0] == windows else value
        if isinstance(value, tuple | list):
            return type(value)(cut(v) for v in value)
        if isinstance(value, dict):
            return {key: cut(v) for key, v in value.items()}
        return value

    return cut(batch)


@torch.no_grad()
def check_layout(block: nn.Module, candidates: list[FeedForward], batch: tuple) -> Layout:
    """Check ``candidates`` (FFN wirings) and the residual shortcut on the dense ``block``
    with one calibration ``batch`` (hidden states, positional and keyword arguments)."""
    device = batch[0].device
    if not candidates:
        return Layout(None, False, "no two-layer feed-forward among the block's Linear layers")
    tol = tolerance(batch[0].dtype)
    layers = dict(block.named_modules())
    names = {n for c in candidates for n in (c.up, c.down)}
    out, inputs, outputs = _observe(block, batch, names)
    ffn = _matching_wiring(candidates, layers, inputs, outputs, tol, device)
    if ffn is None:
        return Layout(None, False, "no feed-forward wiring reproduces the block's FFN output")

    # Large enough that the block output's own rounding is small against it.
    generator = torch.Generator().manual_seed(0)
    scale = float(out.float().square().mean().sqrt()) + float(outputs[ffn.down].float().std())
    delta = torch.randn(outputs[ffn.down].shape, generator=generator) * scale
    delta = delta.to(device=device, dtype=outputs[ffn.down].dtype)
    moved, _, _ = _observe(block, batch, {ffn.down}, add={ffn.down: delta})
    deviation = float("inf")
    if moved.numel() == delta.numel():  # OPT's FFN works on [B·T, d] rows of [B, T, d]
        deviation = _relative(_flat(moved) - _flat(out), _flat(delta))
    if _agreed(not deviation <= tol, device):
        return Layout(
            ffn,
            False,
            "block output is not residual + FFN output (a norm or scale after the FFN or the "
            "residual sum); FFN target = its own dense output, outputs from running the block",
            deviation,
        )
    return Layout(ffn, True, "block output = residual + FFN output (checked)", deviation)


def _check_finite(model: nn.Module, outputs: dict[int, torch.Tensor]) -> None:
    """One line naming the first block whose dense output is not finite, instead of letting
    later checks misread it: the weight that holds NaN/Inf where one does, else overflow."""
    from sparsellm.guard import check_weights_finite

    for index in sorted(outputs):
        if not torch.isfinite(outputs[index]).all():
            check_weights_finite(model)
            dtype = str(outputs[index].dtype).removeprefix("torch.")
            raise NonFiniteError(
                f"the dense model's block {index} outputs NaN/Inf in {dtype} on the calibration "
                "text (overflow or broken weights); load it in float32 or bfloat16 (--dtype)"
            )


@torch.no_grad()
def check_block_chain(
    model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor, store: BlockStore | None = None
) -> None:
    """The engine hands block ``i``'s output to block ``i + 1``; check on a forward of the dense
    model over ``ids`` (a few tokens) that the model does the same, and refuse it otherwise
    (:class:`UnsupportedModelError`: several parallel ModuleLists, blocks run out of order).

    With a ``store`` (out-of-core models, whose blocks wait on ``meta``), each block is fetched
    where the rest of the model is just before it runs and released right after it ran, as not
    completed: its dense weights are not a result to keep."""
    from sparsellm.engine import block_output

    entered: dict[int, torch.Tensor] = {}
    left: dict[int, torch.Tensor] = {}

    def on_entry(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hidden, torch.Tensor):
                entered.setdefault(index, hidden.detach().clone())

        return hook

    def on_exit(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
            left.setdefault(index, block_output(out).detach().clone())

        return hook

    handles = []
    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(on_entry(index), with_kwargs=True))
        handles.append(block.register_forward_hook(on_exit(index), with_kwargs=True))
    if store is not None:
        handles.extend(_visits_through(store, model, blocks))
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    _check_finite(model, left)
    for index in range(len(blocks) - 1):
        out, nxt = left.get(index), entered.get(index + 1)
        same = out is not None and nxt is not None and out.numel() == nxt.numel()
        if same:
            same = _relative(_flat(nxt), _flat(out)) <= tolerance(out.dtype)
        if not same:
            raise UnsupportedModelError(
                f"unsupported layout {type(model).__name__}: block {index + 1} of the "
                f"{len(blocks)} found does not receive block {index}'s output, so they cannot "
                "be pruned one after the other"
            )


def _visits_through(store: BlockStore, model: nn.Module, blocks: nn.ModuleList) -> list:
    """Hooks that fetch each block from ``store`` (onto the device of the rest of the model)
    as it is entered and release it as it is left, so one block is resident at a time."""
    home = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
    handles = []
    for index, block in enumerate(blocks):

        def enter(module: nn.Module, args: tuple, index: int = index) -> None:
            store.fetch(index, module, home)

        def leave(module: nn.Module, args: tuple, out: object, index: int = index) -> None:
            store.release(index, module, completed=False)

        # prepend: the block must be real before any other hook (or the block) sees it
        handles.append(block.register_forward_pre_hook(enter, prepend=True))
        handles.append(block.register_forward_hook(leave))
    return handles
