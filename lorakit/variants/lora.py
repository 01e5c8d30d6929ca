"""Plain LoRA (Hu et al. 2021): y = W x + s * B(A(dropout(x))), dW = s * B A."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor, nn

from lorakit.variants.init import init_from_weight, orthogonal_init

if TYPE_CHECKING:
    from lorakit.adapter import Adapter


class Variant(Protocol):
    """One strategy per variant, acting at one place: the delta, the init, the optimizer, the base storage."""

    name: str
    changes_base_weight: bool  # True: training changes W itself, so an adapter file carries W too
    needs_delta_weight: bool  # True: training or forward needs dW (not only merging), so dW must exist
    factors: dict[str, bool]  # the LoRA factors the adapter has -> whether each trains

    def init_weights(self, adapter: Adapter, weight: Tensor, mode: bool | str, factory: dict) -> nn.Module | None:
        """Initialises the factors; returns the variant's own tensors (kept as adapter.variant_state), if any."""
        ...

    def dtype(self, adapter: Adapter) -> torch.dtype: ...

    def contribution(self, adapter: Adapter, module: nn.Module, x: Tensor, base_out: Tensor | None = None) -> Tensor:
        """What the adapter adds to module(x); base_out is module(x) as the layer computed it, for reuse."""
        ...

    def delta_weight(self, adapter: Adapter) -> Tensor: ...

    def weight_scale(self, adapter: Adapter, weight: Tensor) -> Tensor | float: ...

    def shared_tensors(self) -> dict[str, Tensor]: ...


class Lora:
    name = "lora"
    changes_base_weight = False
    needs_delta_weight = False
    factors = {"lora_A": True, "lora_B": True}

    def dtype(self, adapter: Adapter) -> torch.dtype:
        return adapter.lora_B.dtype

    def init_weights(self, adapter: Adapter, weight: Tensor, mode: bool | str, factory: dict) -> None:
        """B = 0 so training starts exactly at the base model; A random so gradients reach B.

        "pissa", "pissa_niter_K" and "olora" take A, B from W's SVD / QR and leave the residual in W instead;
        "orthogonal" draws nonzero A, B with B A = 0.
        """
        if mode is False:
            return None  # both factors keep their random init: a non-identity adapter (tests, debugging)
        with torch.no_grad():
            if mode == "orthogonal":
                orthogonal_init(adapter)
            elif isinstance(mode, str) and mode != "gaussian":
                init_from_weight(adapter, weight, mode)
            elif adapter.kind.zero_factor == "lora_A":  # the factor an embedding looks up (PEFT, loralib)
                nn.init.zeros_(adapter.lora_A)
                nn.init.normal_(adapter.lora_B)
            elif mode == "gaussian":
                nn.init.normal_(adapter.lora_A, std=1 / adapter.r)
                nn.init.zeros_(adapter.lora_B)
            else:
                nn.init.kaiming_uniform_(adapter.lora_A, a=math.sqrt(5))
                nn.init.zeros_(adapter.lora_B)
            if adapter.lora_B_bias is not None:
                nn.init.zeros_(adapter.lora_B_bias)
        return None

    def contribution(self, adapter: Adapter, module: nn.Module, x: Tensor, base_out: Tensor | None = None) -> Tensor:
        """s * (B(A(drop(x))) + b), b being lora_B's bias where lora_bias trains one."""
        out = adapter.kind.contribution(module, adapter.dropout(x), adapter.lora_A, adapter.lora_B, adapter.scale)
        if adapter.lora_B_bias is None:
            return out
        return out + adapter.kind.output_bias(module, adapter.lora_B_bias) * adapter.scale

    def delta_weight(self, adapter: Adapter) -> Tensor:
        return adapter.kind.delta(adapter.lora_A, adapter.lora_B, adapter.scale)

    def weight_scale(self, adapter: Adapter, weight: Tensor) -> float:
        return 1.0

    def shared_tensors(self) -> dict[str, Tensor]:
        return {}
