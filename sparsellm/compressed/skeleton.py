"""The model a checkpoint's config builds, on the ``meta`` device: what the checkpoint must hold
(names, shapes, which weights are Linear layers and which of those are stored transposed), and
the skeleton a compressed checkpoint is loaded into tensor by tensor."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sparsellm.compressed.files import RECORD_KEY
from sparsellm.models.linear import is_linear


def build_skeleton(
    directory: Path, dtype: torch.dtype | None = None, trust_remote_code: bool = False
) -> nn.Module:
    """The causal LM of ``directory``'s config with its parameters on ``meta`` (buffers real),
    in ``dtype`` (``None``: the dtype the config records, float32 if none). The compression
    record is dropped from the model's config, so a model saved later is not mistaken for a
    compressed one."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from sparsellm.loading import pretrained
    from sparsellm.offload import parameters_on_meta

    trust = {"trust_remote_code": trust_remote_code}
    config = pretrained(AutoConfig, str(directory), "config", **trust)
    if hasattr(config, RECORD_KEY):
        delattr(config, RECORD_KEY)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or _stored(config), **trust)
    with contextlib.suppress(OSError, ValueError):  # no (or no valid) generation_config.json
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model.eval()


def _stored(config: object) -> torch.dtype:
    """The dtype ``config`` records (``dtype`` or the older ``torch_dtype``), else float32."""
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else torch.float32


@dataclass(frozen=True)
class Layout:
    """What a model expects of a checkpoint: every state-dict tensor's shape, its Linear
    weights (name -> stored transposed, as GPT-2's ``Conv1D``), the base-model prefix a
    checkpoint name may lack, and the groups of names sharing one tensor (tied weights)."""

    shapes: dict[str, tuple[int, ...]]
    linears: dict[str, bool]
    prefix: str
    aliases: tuple[tuple[str, ...], ...]

    @classmethod
    def of(cls, model: nn.Module) -> Layout:
        shapes = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
        linears = {
            f"{name}.weight" if name else "weight": not isinstance(module, nn.Linear)
            for name, module in model.named_modules()
            if is_linear(module)
        }
        groups: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(param), []).append(name)
        prefix = f"{getattr(model, 'base_model_prefix', '')}."
        return cls(shapes, linears, prefix, tuple(tuple(g) for g in groups.values()))

    def key(self, name: str) -> str | None:
        """The model's name for the checkpoint tensor ``name`` (exact, or with the base-model
        prefix in front); ``None`` when the model has no such tensor."""
        if name in self.shapes:
            return name
        return self.prefix + name if self.prefix + name in self.shapes else None

    def transposed(self, name: str, shape: tuple[int, ...]) -> bool | None:
        """For the checkpoint tensor ``name`` of ``shape``: whether it is a Linear weight
        stored ``[in, out]``, ``None`` when it is no Linear weight of this shape."""
        key = self.key(name)
        if key is None or key not in self.linears or self.shapes[key] != tuple(shape):
            return None
        return self.linears[key]

    def shared(self, key: str) -> bool:
        """Whether the parameter ``key`` is tied to another name."""
        return any(key in group and len(group) > 1 for group in self.aliases)
