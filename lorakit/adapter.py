"""Adapter: one named LoRA on one weight: factors A and B, scale, dropout and variant strategy.

The variant says which factors exist and which of them train (`variant.factors`); whatever else it needs
(DoRA's magnitude, VeRA's vectors) it keeps in its own module, `adapter.variant_state`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lorakit.kinds import Kind
from lorakit.state import tables_stale
from lorakit.variants import Variant
from lorakit.variants.lora import Lora


class Adapter(nn.Module):
    """ΔW = s · B A with A (r x in ...), B (out x r ...), s = alpha/r (or alpha/sqrt(r) with rsLoRA)."""

    changes = 0  # attributes set or deleted on any adapter so far: a routed layer's kept plan compares this one number
    # instead of re-reading each of its adapters' scale, variant and factors at every call (lorakit.layer)

    def __setattr__(self, name: str, value: object) -> None:
        Adapter.changes += 1
        tables_stale()
        super().__setattr__(name, value)
        if name in ("kind", "variant"):
            self._note_plain()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._note_plain()  # an adapter pickled before the flag existed gets it too

    def _note_plain(self) -> None:
        """plain: plain LoRA on a matmul kind, what the ops compute (lorakit.layer). Read by every forward: a bool of
        the adapter's own, so a compiled model guards one value per adapter instead of the identity of the kind and
        variant objects that all its layers share."""
        own = self.__dict__
        if "kind" in own and "variant" in own:
            own["plain"] = type(own["variant"]).contribution is Lora.contribution and own["kind"].is_plain_matmul

    def _apply(self, fn, recurse: bool = True):  # .to() / .half() give the factors new storage
        Adapter.changes += 1
        tables_stale()
        return super()._apply(fn, recurse)

    def __delattr__(self, name: str) -> None:
        Adapter.changes += 1
        tables_stale()
        super().__delattr__(name)

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
        lora_bias: bool = False,
    ) -> None:
        super().__init__()
        self.kind, self.variant = kind, variant
        self.r, self.alpha, self.scale = r, alpha, scale
        a_shape, b_shape = kind.factor_shapes(weight, r)
        factory = {"device": weight.device, "dtype": dtype or _adapter_dtype(weight.dtype)}
        for name, shape in (("lora_A", a_shape), ("lora_B", b_shape)):
            if name in variant.factors:  # init=False keeps these: a non-identity adapter, drawn as PEFT draws it
                if kind.zero_factor == "lora_A":  # an embedding's factors: N(0, 1), as PEFT's Embedding makes them
                    factor = torch.randn(shape, **factory)
                else:  # nn.Linear's default init
                    factor = nn.init.kaiming_uniform_(torch.empty(shape, **factory), a=math.sqrt(5))
                self._register_factor(name, factor, trains=variant.factors[name])
        # PEFT's lora_bias: lora_B is a layer with a bias, trained with the factors and scaled with them
        self.register_parameter("lora_B_bias", nn.Parameter(_layer_bias(b_shape, factory)) if lora_bias else None)
        self.dropout = nn.Dropout(dropout) if dropout > 0 and kind.takes_dropout else nn.Identity()
        self.variant_state = variant.init_weights(self, weight, init, factory)

    def _register_factor(self, name: str, factor: Tensor, trains: bool) -> None:
        """A factor that never trains (LoRA-FA's A) is a buffer: no gradient, no optimizer state, still saved."""
        if trains:
            self.register_parameter(name, nn.Parameter(factor))
        else:
            self.register_buffer(name, factor)

    def contribution(self, module: nn.Module, x: Tensor, base_out: Tensor | None = None) -> Tensor:
        """What this adapter adds to module(x) (= base_out, when the caller has it), in the adapter's dtype."""
        if x.is_floating_point():
            x = x.to(self.dtype)
        return self.variant.contribution(self, module, x, base_out)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the adapter computes in (its tensors' dtype, which model.to() may change)."""
        return self.variant.dtype(self)

    def delta_weight(self) -> Tensor:
        """ΔW in the layout of the adapted weight."""
        return self.variant.delta_weight(self)

    def bias_delta(self) -> Tensor | None:
        """What merging adds to the base bias: s * lora_B's bias (lora_bias), else None."""
        return None if self.lora_B_bias is None else self.scale * self.lora_B_bias

    def weight_scale(self, weight: Tensor) -> Tensor | float:
        """The factor merging applies to the rows of `weight` (1 for plain LoRA; DoRA's magnitude / norm)."""
        return self.variant.weight_scale(self, weight)

    def extra_repr(self) -> str:
        return f"{self.variant.name}, r={self.r}, alpha={self.alpha}, scale={self.scale:g}"


def _layer_bias(b_shape: tuple[int, ...], factory: dict) -> Tensor:
    # nn.Linear's / nn.ConvNd's default bias init over B's fan-in, as PEFT's lora_B layer has it with init=False
    bound = 1 / math.sqrt(math.prod(b_shape[1:]))
    return torch.empty(b_shape[0], **factory).uniform_(-bound, bound)


def _adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    # Low-precision bases still get fp32 factors by default: the small updates of A and B would
    # otherwise round away (PEFT's autocast_adapter_dtype default). float64 stays float64.
    return torch.float64 if base_dtype == torch.float64 else torch.float32
