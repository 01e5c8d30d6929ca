"""Plain LoRA (Hu et al. 2021): y = W x + s * B(A(dropout(x))), dW = s * B A."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from lorakit.adapter import Adapter


class Variant(Protocol):
    name: str

    def init_weights(self, adapter: Adapter, weight: Tensor, mode: bool | str) -> None: ...

    def contribution(self, adapter: Adapter, module: nn.Module, x: Tensor) -> Tensor: ...

    def delta_weight(self, adapter: Adapter) -> Tensor: ...


class Lora:
    name = "lora"

    def init_weights(self, adapter: Adapter, weight: Tensor, mode: bool | str) -> None:
        """B = 0 so training starts exactly at the base model; A random so gradients reach B."""
        if mode is False:
            return  # both factors keep their random init: a non-identity adapter (tests, debugging)
        with torch.no_grad():
            if adapter.kind.name == "embedding":
                # the embedding table is looked up through A, so A is the zero factor (PEFT, loralib)
                nn.init.zeros_(adapter.lora_A)
                nn.init.normal_(adapter.lora_B)
            elif mode == "gaussian":
                nn.init.normal_(adapter.lora_A, std=1 / adapter.r)
                nn.init.zeros_(adapter.lora_B)
            else:
                nn.init.kaiming_uniform_(adapter.lora_A, a=math.sqrt(5))
                nn.init.zeros_(adapter.lora_B)

    def contribution(self, adapter: Adapter, module: nn.Module, x: Tensor) -> Tensor:
        return adapter.kind.contribution(module, adapter.dropout(x), adapter.lora_A, adapter.lora_B, adapter.scale)

    def delta_weight(self, adapter: Adapter) -> Tensor:
        return adapter.kind.delta(adapter.lora_A, adapter.lora_B, adapter.scale)
