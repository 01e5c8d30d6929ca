"""Adapter: one named LoRA on one weight: factors A and B, scale, dropout and variant strategy."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lorakit.kinds import Kind
from lorakit.variants import Variant


class Adapter(nn.Module):
    """ΔW = s · B A with A (r x in ...), B (out x r ...), s = alpha/r (or alpha/sqrt(r) with rsLoRA)."""

    def __init__(
        self,
        kind: Kind,
        weight: Tensor,
        r: int,
        alpha: float,
        scale: float,
        dropout: float,
        variant: Variant,
        init: bool | str = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.kind, self.variant = kind, variant
        self.r, self.alpha, self.scale = r, alpha, scale
        a_shape, b_shape = kind.factor_shapes(weight, r)
        factory = {"device": weight.device, "dtype": dtype or _adapter_dtype(weight.dtype)}
        self.lora_A = nn.Parameter(torch.empty(a_shape, **factory))
        self.lora_B = nn.Parameter(torch.empty(b_shape, **factory))
        with torch.no_grad():  # nn.Linear's default init, so init=False gives a random, non-identity adapter
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 and kind.takes_dropout else nn.Identity()
        variant.init_weights(self, weight, init)

    def contribution(self, module: nn.Module, x: Tensor, base_out: Tensor | None = None) -> Tensor:
        """What this adapter adds to module(x) (= base_out, when the caller has it), in the adapter's dtype."""
        if x.is_floating_point():
            x = x.to(self.dtype)
        return self.variant.contribution(self, module, x, base_out)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the adapter computes in: its first own parameter's (lora_A, or VeRA's vectors)."""
        return next(iter(self._parameters.values())).dtype

    def delta_weight(self) -> Tensor:
        """ΔW in the layout of the adapted weight."""
        return self.variant.delta_weight(self)

    def weight_scale(self, weight: Tensor) -> Tensor | float:
        """The factor merging applies to the rows of `weight` (1 for plain LoRA; DoRA's magnitude / norm)."""
        return self.variant.weight_scale(self, weight)

    def extra_repr(self) -> str:
        return f"{self.variant.name}, r={self.r}, alpha={self.alpha}, scale={self.scale:g}"


def _adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    # Low-precision bases still get fp32 factors by default: the small updates of A and B would
    # otherwise round away (PEFT's autocast_adapter_dtype default). float64 stays float64.
    return torch.float64 if base_dtype == torch.float64 else torch.float32
