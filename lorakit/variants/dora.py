"""DoRA (Liu et al. 2024), acting on the delta: W' = m * (W + dW) / ||W + dW||, per output feature.

    y = W x + (m/n - 1) * (W x) + (m/n) * s * B(A(x)),    n = ||W + s B A|| (detached, as in the paper, 4.3)

m (PEFT's lora_magnitude_vector) starts at n, so the adapter starts as the identity. Dropout, where set,
applies to the input of both terms, as in PEFT. Written once for every kind: the kind supplies W x.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lorakit import ops
from lorakit.errors import TargetError
from lorakit.kinds import Kind
from lorakit.variants.lora import Lora

if TYPE_CHECKING:
    from lorakit.adapter import Adapter


class Dora:
    name = "dora"
    changes_base_weight = False
    needs_delta_weight = True  # the norm ||W + dW||
    factors = Lora.factors

    def __init__(self) -> None:
        self._lora = Lora()  # A and B are LoRA's, initialised the same way

    def init_weights(self, adapter: Adapter, weight: Tensor, mode: bool | str, factory: dict) -> DoraState:
        """LoRA's factors, then m = ||W + dW|| so the adapter starts as the identity."""
        self._lora.init_weights(adapter, weight, mode, factory)
        norm = _column_norm(adapter, weight).to(factory["dtype"])
        return DoraState(norm.reshape(_magnitude_shape(weight, norm)))

    def dtype(self, adapter: Adapter) -> torch.dtype:
        return adapter.lora_B.dtype

    def contribution(self, adapter: Adapter, module: nn.Module, x: Tensor, base_out: Tensor | None = None) -> Tensor:
        kind = adapter.kind
        weight = kind.weight_of(module)
        magnitude = adapter.variant_state.lora_magnitude_vector
        ratio = magnitude / _column_norm(adapter, weight).reshape(magnitude.shape)
        dropping = adapter.training and isinstance(adapter.dropout, nn.Dropout)
        x = adapter.dropout(x)
        if base_out is not None and not dropping:
            base = kind.without_bias(module, base_out)  # W x as the layer computed it: no second product with W
        else:  # W times the dropped-out input, which the layer never computed
            base = kind.base_output(module, x, _for_product(weight, adapter.dtype, x.device.type))
        lora_B = adapter.lora_B
        rescaled_B = lora_B * ratio.reshape(-1, *(1 for _ in lora_B.shape[1:]))  # diag(m/n) B, (out x r ...)
        lora = kind.contribution(module, x, adapter.lora_A, rescaled_B, adapter.scale)  # (m/n) s B(A(x))
        return ops.dora_contribution(base, lora, ratio)

    def linear_output(self, adapter: Adapter, module: nn.Linear, x: Tensor) -> Tensor | None:
        """module(x) with this adapter alone, as (m/n) * (W x + s B A x) + b: the LoRA term through the fused op
        (added inside the base product, dX written once) and one multiply, where contribution's separate terms cost
        a few more passes over the output, forward and backward. None where dropout is drawn (the base term then
        takes the dropped-out input, which the fused product does not have)."""
        if adapter.training and isinstance(adapter.dropout, nn.Dropout) and adapter.dropout.p > 0:
            return None
        weight, magnitude = module.weight, adapter.variant_state.lora_magnitude_vector
        ratio = magnitude / _column_norm(adapter, weight).reshape(magnitude.shape)
        factors = ops.LoraFactors(adapter.lora_A, adapter.lora_B, adapter.scale)
        z = ops.lora_linear(x, weight, None, [factors], adapter.training)  # W x + s B A x
        y = z * ratio if ratio.dtype == z.dtype else (z * ratio).to(z.dtype)
        return y if module.bias is None else y + module.bias

    def delta_weight(self, adapter: Adapter) -> Tensor:
        return self._lora.delta_weight(adapter)

    def weight_scale(self, adapter: Adapter, weight: Tensor) -> Tensor:
        """m / ||W + dW|| laid out along W's output axis, so W' = scale * (W + dW)."""
        ratio = adapter.variant_state.lora_magnitude_vector.detach().flatten() / _column_norm(adapter, weight)
        if adapter.kind.transposed:
            return ratio.reshape(1, -1)
        return ratio.reshape(-1, *(1 for _ in weight.shape[1:]))

    def shared_tensors(self) -> dict[str, Tensor]:
        return {}


class DoraState(nn.Module):
    """DoRA's own tensor: the magnitude m per output feature (PEFT's lora_magnitude_vector)."""

    def __init__(self, magnitude: Tensor) -> None:
        super().__init__()
        self.lora_magnitude_vector = nn.Parameter(magnitude)


def check_targets(targets) -> None:
    for path, kind, _ in targets:
        if kind.acts_on_weight:
            raise TargetError(
                f"use_dora=True needs a layer's output, but {path} is adapted on its weight ({kind.name}); "
                "PEFT refuses DoRA there too: use plain LoRA for it"
            )


def _column_norm(adapter: Adapter, weight: Tensor) -> Tensor:
    """||W + dW|| per output feature, (out,), detached: the norm takes no gradient (DoRA paper, 4.3). Where W is a
    plain matrix and dW = s B A in the kind's layout (linear, GPT-2's Conv1D, embedding), in closed form without
    forming W + dW; other kinds (convolutions) form it."""
    kind, lora_A, lora_B = adapter.kind, adapter.lora_A, adapter.lora_B
    if weight.dim() == lora_A.dim() == lora_B.dim() == 2 and type(kind).delta is Kind.delta:
        return ops.low_rank_weight_norm(weight, lora_A, lora_B, adapter.scale, transposed=kind.transposed)
    with torch.no_grad():
        delta = kind.delta(lora_A, lora_B, adapter.scale)
    return ops.weight_norm(weight, delta, out_axis=1 if kind.transposed else 0)


def _for_product(weight: Tensor, dtype: torch.dtype, device_type: str) -> Tensor:
    """W cast to the adapter's dtype for W x, except where autocast would cast it straight back: W already in the
    autocast dtype comes out of that round trip bit for bit, so the two copies of W (out x in) are skipped."""
    if torch.is_autocast_enabled(device_type) and weight.dtype == torch.get_autocast_dtype(device_type):
        return weight
    return weight.to(dtype)


def _magnitude_shape(weight: Tensor, norm: Tensor) -> tuple[int, ...]:
    # PEFT's layout: (out,) for linear and embedding, (1, out, 1, ...) for convolutions
    return (1, norm.numel(), *(1 for _ in weight.shape[2:])) if weight.dim() > 2 else (norm.numel(),)
