"""What a model's adapters look like now, layer by layer and as a whole: PEFT's get_layer_status / get_model_status,
with PEFT's field names and rules, so debugging code written for PEFT reads the same report."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

from torch import nn

from lorakit.inject import lora_layers, saved_modules
from lorakit.layer import LoraLayer
from lorakit.saved import SavedModule

Irregular = Literal["irregular"]  # layers that disagree: the model is in a state it was not meant to be in


@dataclass
class LayerStatus:
    """PEFT's TunerLayerStatus for one adapted layer or module saved per adapter."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None = None


@dataclass
class ModelStatus:
    """PEFT's TunerModelStatus: the layers' statuses folded together, "irregular" where they disagree."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Irregular = None


def layer_status(model: nn.Module, enabled: bool, active: list[str]) -> list[LayerStatus]:
    """Every adapted layer and module saved per adapter of `model`, in module order, named as PEFT's tuner names
    them (`model.` and the path); `enabled` and `active` are the model's, which PEFT sets on every adapted layer
    alike (a module saved per adapter lists the active ones it has a copy of, as PEFT's wrapper does)."""
    hosts = [(p, m, m.adapters) for p, m in lora_layers(model)] + [(p, m, m.copies) for p, m in saved_modules(model)]
    order = {id(m): i for i, m in enumerate(model.modules())}
    out = []
    for path, module, held in sorted(hosts, key=lambda h: order.get(id(h[1]), 0)):
        params = {name: list(adapter.parameters()) for name, adapter in held.items()}
        out.append(
            LayerStatus(
                name=f"model.{path}",
                module_type=_module_type(module),
                enabled=enabled,
                active_adapters=[n for n in active if n in held] if isinstance(module, SavedModule) else list(active),
                merged_adapters=list(module.merged_adapters) if isinstance(module, LoraLayer) else [],
                requires_grad={n: _agreed([p.requires_grad for p in ps]) for n, ps in params.items() if ps},
                available_adapters=sorted(held),
                devices={n: sorted({p.device.type for p in ps}) for n, ps in params.items()},
            )
        )
    if not out:
        raise ValueError("no adapter layers in this model: add an adapter first")
    return out


def model_status(
    model: nn.Module, enabled: bool, active: list[str], peft_types: dict[str, str], counts: tuple[int, int]
) -> ModelStatus:
    """The layers' statuses folded as PEFT folds them; counts = (trainable, total) parameters."""
    layers = layer_status(model, enabled, active)
    merged_all = sorted({n for s in layers for n in s.merged_adapters})
    half_merged = any(set(merged_all) & (set(s.available_adapters) - set(s.merged_adapters)) for s in layers)
    active = {tuple(s.active_adapters) for s in layers}
    grads, devices = defaultdict(list), defaultdict(set)
    for s in layers:
        for name, value in s.requires_grad.items():
            grads[name].append(value)
        for name, kinds in s.devices.items():
            devices[name].update(kinds)
    return ModelStatus(
        base_model_type=type(model).__name__,
        adapter_model_type="LoraModel",
        peft_types=peft_types,
        trainable_params=counts[0],
        total_params=counts[1],
        num_adapter_layers=len(layers),
        enabled=_agreed([s.enabled for s in layers]),
        active_adapters=list(active.pop()) if len(active) == 1 else "irregular",
        merged_adapters="irregular" if half_merged else merged_all,
        requires_grad={name: _agreed(values) for name, values in grads.items()},
        available_adapters=sorted({n for s in layers for n in s.available_adapters}),
        devices={name: sorted(kinds) for name, kinds in devices.items()},
    )


def _agreed(values: list) -> bool | Irregular:
    """True or False where every value says so, else "irregular" (PEFT's rule)."""
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _module_type(module: nn.Module) -> str:
    """PEFT's class name for the wrapper: lora.Linear, lora.Embedding, ... or ModulesToSaveWrapper."""
    if isinstance(module, SavedModule):
        return "ModulesToSaveWrapper"
    base = module.base_layer
    while isinstance(base, LoraLayer):
        base = base.base_layer
    return f"lora.{type(base).__name__}"
