"""After-step behaviour owned by the model (Delta-LoRA's W update), so any optimizer and any loop gets it.

A LoraModel with a Delta-LoRA adapter registers itself here; torch's global optimizer hooks then act on every
optimizer step whose parameter groups hold that model's trainable Delta-LoRA factors:

    before the step: keep A, B          after the step: W <- W + s * (B' A' - B A)

The registry holds models weakly, so a deleted model drops out. An optimizer already hooked by
lorakit.variants.delta_lora.register_delta_lora (lorakit.optim does that) is left to those hooks.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from lorakit.inject import lora_layers
from lorakit.variants.delta_lora import apply_delta_update

if TYPE_CHECKING:
    from lorakit.adapter import Adapter
    from lorakit.layer import LoraLayer
    from lorakit.model import LoraModel

_MODELS: weakref.WeakSet[LoraModel] = weakref.WeakSet()
_BEFORE: dict[int, list[tuple[LoraLayer, Adapter, Tensor, Tensor]]] = {}  # id(optimizer) -> snapshots
_HOOKS: list = []


def register(model: LoraModel) -> None:
    """Makes optimizer steps over `model`'s Delta-LoRA factors also update the base weights they adapt."""
    if not _HOOKS:  # torch's hooks are global: installed once, for every model registered here
        _HOOKS.append(register_optimizer_step_pre_hook(_snapshot))
        _HOOKS.append(register_optimizer_step_post_hook(_update))
    _MODELS.add(model)


def _stepped_pairs(optimizer: torch.optim.Optimizer) -> list[tuple[LoraLayer, Adapter]]:
    """(layer, adapter) for every registered model's trainable Delta-LoRA adapter this optimizer steps."""
    if getattr(optimizer, "_lorakit_delta_lora", False):
        return []
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return [
        (layer, adapter)
        for model in list(_MODELS)
        for _, layer in lora_layers(model.model)
        for adapter in layer.adapters.values()
        if adapter.variant.changes_base_weight and adapter.lora_B.requires_grad and id(adapter.lora_B) in stepped
    ]


def _snapshot(optimizer: torch.optim.Optimizer, *_) -> None:
    pairs = _stepped_pairs(optimizer) if _MODELS else []
    if pairs:
        _BEFORE[id(optimizer)] = [(lay, a, a.lora_A.detach().clone(), a.lora_B.detach().clone()) for lay, a in pairs]


def _update(optimizer: torch.optim.Optimizer, *_) -> None:
    for layer, adapter, old_A, old_B in _BEFORE.pop(id(optimizer), []):
        apply_delta_update(layer.stored_weight, adapter, old_A, old_B)
