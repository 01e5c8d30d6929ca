"""Delta-LoRA (Zi et al. 2023), acting after each optimizer step: W also moves by the change of s B A.

    W <- W + s * (B' A' - B A)        B', A' after the step; W gets no gradient and no optimizer state

Only copies of A and B are kept between the pre- and post-step hooks, so memory stays at LoRA's level.
Because W itself changes, an adapter file carries the adapted layers' weights too (see docs/variants.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lorakit.errors import ConfigError
from lorakit.variants.lora import Lora

if TYPE_CHECKING:
    from lorakit.adapter import Adapter


class DeltaLora(Lora):
    name = "delta_lora"
    changes_base_weight = True
    needs_delta_weight = True  # W moves by the change of dW after each step


def check_targets(targets) -> None:
    for path, kind, _ in targets:
        if kind.quantized:
            raise ConfigError(
                f"variant='delta_lora' updates the base weight after every step, but {path} is quantized "
                "(4-bit / 8-bit): the update would be lost to rounding; use plain LoRA (QLoRA) or an unquantized base"
            )


def register_delta_lora(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Hooks Delta-LoRA's weight update onto `optimizer` for every trainable Delta-LoRA adapter in `model`."""
    from lorakit.inject import lora_layers

    pairs = [
        (layer, adapter)
        for _, layer in lora_layers(model)
        for adapter in layer.adapters.values()
        if isinstance(adapter.variant, DeltaLora)
    ]
    if not pairs:
        return
    before: dict[int, tuple[Tensor, Tensor]] = {}

    def snapshot(*_) -> None:
        for _, adapter in pairs:
            before[id(adapter)] = (adapter.lora_A.detach().clone(), adapter.lora_B.detach().clone())

    def update(*_) -> None:
        for layer, adapter in pairs:
            if adapter.lora_B.requires_grad:
                lora_A, lora_B = before[id(adapter)]
                apply_delta_update(layer.stored_weight, adapter, lora_A, lora_B)
        before.clear()

    optimizer._lorakit_delta_lora = True  # hooked here: the model's own hooks (lorakit.after_step) leave it alone
    optimizer.register_step_pre_hook(snapshot)
    optimizer.register_step_post_hook(update)


def apply_delta_update(weight: Tensor, adapter: Adapter, old_A: Tensor, old_B: Tensor) -> None:
    """W <- W + (s B'A' - s B A): the change of the low-rank product over one step."""
    kind = adapter.kind
    with torch.no_grad():
        change = kind.delta(adapter.lora_A, adapter.lora_B, adapter.scale) - kind.delta(old_A, old_B, adapter.scale)
        weight.add_(change.to(weight.dtype))
