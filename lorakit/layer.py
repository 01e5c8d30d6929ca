"""LoraLayer: a base layer and its named adapters; one forward, one merge, for every kind.

    forward(x) = base(x) + sum_{a active, not merged} s_a * B_a(A_a(dropout(x)))

Kinds that act on the weight (target_parameters) get W + sum_a dW_a through torch parametrization
instead, so the base module's own forward runs unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lorakit import ops
from lorakit.adapter import Adapter
from lorakit.errors import LorakitError
from lorakit.kinds import Kind


class LoraLayer(nn.Module):
    def __init__(self, base_layer: nn.Module, kind: Kind) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.kind = kind
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self._merge_steps: list[tuple[list[str], list[Tensor | float]]] = []
        self.enabled = True
        if kind.acts_on_weight:
            parametrize.register_parametrization(base_layer, kind.weight_name(), _WeightDelta(self))

    @property
    def weight(self) -> Tensor:
        """The stored base weight (merged adapters included, unmerged ones not)."""
        name = self.kind.weight_name()
        if parametrize.is_parametrized(self.base_layer, name):
            return self.base_layer.parametrizations[name].original
        return self.kind.weight_of(self.base_layer)

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        base_out = out = self.base_layer(x, *args, **kwargs)
        if self.kind.acts_on_weight:
            return out  # the parametrization has already added the deltas to the weight
        for adapter in self.live_adapters():
            out = out + adapter.contribution(self.base_layer, x, base_out).to(out.dtype)
        return out

    def live_adapters(self) -> list[Adapter]:
        """Adapters that take part in forward: enabled, active, present here and not merged."""
        if not self.enabled:
            return []
        return [
            self.adapters[name]
            for name in self.active_adapters
            if name in self.adapters and name not in self.merged_adapters
        ]

    def add_adapter(self, name: str, adapter: Adapter) -> None:
        if name in self.merged_adapters:
            raise LorakitError(f"adapter {name!r} is merged into the weights; unmerge before replacing it")
        self.adapters[name] = adapter

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise LorakitError(f"adapter {name!r} is merged into the weights; unmerge before deleting it")
        del self.adapters[name]

    def merge(self, names: list[str]) -> None:
        """W <- W + sum dW for the named adapters not merged yet (rows rescaled first where a variant asks)."""
        names = self._unmerged(names)
        if not names:
            return
        weight = self.weight
        scales = [self.adapters[n].weight_scale(weight) for n in names]
        merged = ops.rescaled_merge(weight, scales, [self.adapters[n].delta_weight() for n in names])
        self._store_weight(weight, merged)
        self._merge_steps.append((names, scales))  # the scales depend on W, so unmerge needs these ones
        self.merged_adapters.extend(names)

    def check_mergeable(self, names: list[str]) -> None:
        """Raises if merging the named adapters would put NaN or inf into the weight."""
        names = self._unmerged(names)
        weight = self.weight
        scales = [self.adapters[n].weight_scale(weight) for n in names]
        merged = ops.rescaled_merge(weight, scales, [self.adapters[n].delta_weight() for n in names])
        if names and not torch.isfinite(merged).all():
            raise LorakitError(
                f"merging {names} would put NaN/inf into the weights of this "
                f"{type(self.base_layer).__name__}; the adapter weights are broken, nothing was merged"
            )

    def _store_weight(self, weight: Tensor, value: Tensor) -> Tensor:
        """A stored Parameter is updated in place (ties and optimizers keep it); a computed weight, such as
        a 4-bit base's dequantized one, is assigned, so the base layer stores it its own way."""
        with torch.no_grad():
            if isinstance(weight, nn.Parameter):
                return weight.copy_(value.to(weight.dtype))
            self.kind.store_weight(self.base_layer, value.to(weight.dtype))
        return self.weight

    def _unmerged(self, names: list[str]) -> list[str]:
        return [n for n in names if n in self.adapters and n not in self.merged_adapters]

    def unmerge(self) -> None:
        """W <- W - sum dW for every merged adapter: back to the base weight within one rounding step."""
        weight = self.weight
        for names, scales in reversed(self._merge_steps):
            restored = ops.rescaled_unmerge(weight, scales, [self.adapters[n].delta_weight() for n in names])
            weight = self._store_weight(weight, restored)
        self._merge_steps = []
        self.merged_adapters = []

    def unwrap(self) -> nn.Module:
        """The base layer alone, with whatever is merged kept in its weight."""
        name = self.kind.weight_name()
        if parametrize.is_parametrized(self.base_layer, name):
            parametrize.remove_parametrizations(self.base_layer, name, leave_parametrized=False)
        return self.base_layer

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.kind.after_copy(self.base_layer)  # a deep copy: the kind makes the copied base its own

    def extra_repr(self) -> str:
        return f"kind={self.kind.name}, active={self.active_adapters}, merged={self.merged_adapters}"


class _WeightDelta(nn.Module):
    """Parametrization W -> W + sum dW of the owning layer's live adapters."""

    def __init__(self, layer: LoraLayer) -> None:
        super().__init__()
        # a plain attribute, not a submodule: the layer already owns this module (no cycle in state_dict)
        self.__dict__["layer"] = layer

    def forward(self, weight: Tensor) -> Tensor:
        for adapter in self.layer.live_adapters():
            weight = weight + adapter.delta_weight().to(weight.dtype)
        return weight
