"""LoRA-FA (Zhang et al. 2023), acting on the optimizer groups: A frozen after init, only B trains.

y = W x + s * B (A x)     A is a buffer (saved in files, never trained); backward keeps A x, not x
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lorakit import ops
from lorakit.errors import TargetError
from lorakit.variants.lora import Lora

if TYPE_CHECKING:
    from lorakit.adapter import Adapter


class LoraFA:
    name = "lora_fa"
    changes_base_weight = False
    needs_delta_weight = False
    factors = {"lora_A": False, "lora_B": True}  # A is a buffer: no gradient, no optimizer state, still saved

    def __init__(self) -> None:
        self._lora = Lora()

    def init_weights(self, adapter: Adapter, weight: Tensor, mode: bool | str, factory: dict) -> None:
        return self._lora.init_weights(adapter, weight, mode, factory)

    def dtype(self, adapter: Adapter) -> torch.dtype:
        return adapter.lora_B.dtype

    def contribution(self, adapter: Adapter, module: nn.Module, x: Tensor, base_out: Tensor | None = None) -> Tensor:
        x = adapter.dropout(x)
        if adapter.kind.is_plain_matmul:
            return ops.frozen_a_linear_contribution(x, adapter.lora_A, adapter.lora_B, adapter.scale)
        return adapter.kind.contribution(module, x, adapter.lora_A, adapter.lora_B, adapter.scale)

    def delta_weight(self, adapter: Adapter) -> Tensor:
        return self._lora.delta_weight(adapter)

    def weight_scale(self, adapter: Adapter, weight: Tensor) -> float:
        return 1.0

    def shared_tensors(self) -> dict[str, Tensor]:
        return {}


def check_targets(targets) -> None:
    for path, kind, _ in targets:
        if kind.zero_factor == "lora_A" or kind.acts_on_weight:
            raise TargetError(
                f"variant='lora_fa' freezes A, which for {kind.name} targets ({path}) is the zero factor or a raw "
                "weight: nothing would train; exclude it, or use plain LoRA for it"
            )
