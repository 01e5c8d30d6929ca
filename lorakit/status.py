"""What a model's adapters look like now, layer by layer and as a whole: PEFT's get_layer_status / get_model_status,
with PEFT's field names and rules, so debugging code written for PEFT reads the same report."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

from torch import nn
from torch.nn.utils import parametrize

from lorakit.inject import lora_layers, saved_modules
from lorakit.kinds import MULTIHEAD_ATTENTION
from lorakit.layer import LoraLayer
from lorakit.saved import SavedModule

Irregular = Literal["irregular"]  # layers that disagree: the model is in a state it was not meant to be in
_TOKENS = "TrainableTokensLayer"
_TUNERS = {"LORA": "LoraModel", "VERA": "VeraModel", "TRAINABLE_TOKENS": "TrainableTokensModel"}  # PEFT's, by type
# PEFT's dispatch order: the first of these classes the base module is an instance of names the LoRA layer class
_PEFT_CLASSES = (
    (nn.Embedding, "Embedding"),
    (nn.Conv2d, "Conv2d"),
    (nn.Conv3d, "Conv3d"),
    (nn.Conv1d, "Conv1d"),
    (nn.MultiheadAttention, "MultiheadAttention"),
    (nn.Linear, "Linear"),
)


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


def layer_status(
    model: nn.Module, enabled: bool, active: list[str], peft_types: dict[str, str] | None = None
) -> list[LayerStatus]:
    """Every adapted layer and module saved per adapter of `model`, in module order, named as PEFT's tuner names
    them (`model.` and the path); `enabled` and `active` are the model's, which PEFT sets on every adapted layer
    alike (a module saved per adapter lists the active ones it has a copy of, as PEFT's wrapper does).
    peft_types: each adapter's PEFT type, which decides where PEFT puts a trainable-tokens layer."""
    hosts = [(p, m, m.adapters) for p, m in lora_layers(model)] + [(p, m, m.copies) for p, m in saved_modules(model)]
    order = {id(m): i for i, m in enumerate(model.modules())}
    out = []
    for path, module, held in sorted(hosts, key=lambda h: order.get(id(h[1]), 0)):
        params = {name: list(adapter.parameters()) for name, adapter in held.items()}
        module_type = _module_type(module, _parent(model, path))
        out.append(
            LayerStatus(
                name=_layer_name(path, module_type, held, peft_types or {}),
                module_type=module_type,
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


def _layer_name(path: str, module_type: str, held: nn.ModuleDict, peft_types: dict[str, str]) -> str:
    """PEFT's name: `model.` and the path; trainable tokens that come with a LoRA adapter (trainable_token_indices)
    sit in a wrapper at the embedding's path, so the layer PEFT reports is the wrapper's token_adapter."""
    if module_type == _TOKENS and any(peft_types.get(name, "LORA") != "TRAINABLE_TOKENS" for name in held):
        return f"model.{path}.token_adapter"
    return f"model.{path}"


def model_status(
    model: nn.Module, enabled: bool, active: list[str], peft_types: dict[str, str], counts: tuple[int, int]
) -> ModelStatus:
    """The layers' statuses folded as PEFT folds them; counts = (trainable, total) parameters."""
    layers = layer_status(model, enabled, active, peft_types)
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
        adapter_model_type=_TUNERS.get(next(iter(peft_types.values()), "LORA"), "LoraModel"),
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


def _module_type(module: nn.Module, parent: nn.Module | None) -> str:
    """The class name PEFT's repr gives the module that holds these adapters there: lora.Linear, vera.Linear,
    lora.ParamWrapper, ..., TrainableTokensLayer, ModulesToSaveWrapper."""
    if isinstance(module, SavedModule):
        return "ModulesToSaveWrapper"
    variants = {adapter.variant.name for adapter in module.adapters.values()}
    if variants == {"trainable_tokens"}:
        return _TOKENS
    tuner = "vera" if variants == {"vera"} else "lora"
    base = module.weight_host
    # PEFT wraps an nn.MultiheadAttention whole and its out_proj in a lora.Linear, where lorakit adapts both on the
    # weight; anything else adapted on its weight is a target_parameters layer
    mha_out_proj = isinstance(parent, nn.MultiheadAttention) and parent._modules.get("out_proj") is module
    if module.acts_on_weight and not mha_out_proj:
        return f"{tuner}.{'MultiheadAttention' if module.kind == MULTIHEAD_ATTENTION else 'ParamWrapper'}"
    return f"{tuner}.{_peft_layer_class(base)}"


def _peft_layer_class(base: nn.Module) -> str:
    """The name of the PEFT layer class its dispatch picks for `base` (a linear subclass is a Linear, GPT-2's Conv1D
    too); bitsandbytes' layers get their own, matched by name as kinds.py does, so bitsandbytes stays optional."""
    # an adapter acting on the weight swaps the module's class for torch's Parametrized<Name> subclass
    cls = type(base).__bases__[0] if parametrize.is_parametrized(base) else type(base)
    names = {c.__name__ for c in cls.__mro__}
    for bnb in ("Linear8bitLt", "Linear4bit"):
        if bnb in names:
            return bnb
    for torch_class, name in _PEFT_CLASSES:
        if issubclass(cls, torch_class):
            return name
    return "Linear" if cls.__name__ == "Conv1D" else cls.__name__


def _parent(model: nn.Module, path: str) -> nn.Module | None:
    return model.get_submodule(path.rpartition(".")[0]) if path else None


def stored_numel(param: nn.Parameter) -> int:
    """Elements of `param` as PEFT counts them: DeepSpeed ZeRO-3 leaves an empty placeholder and the real size in
    ds_numel; bitsandbytes' Params4bit packs two 4-bit weights into each byte of its storage."""
    count = param.numel()
    if count == 0 and hasattr(param, "ds_numel"):
        count = param.ds_numel
    if type(param).__name__ == "Params4bit":  # by name, as PEFT checks it, so bitsandbytes stays optional
        count *= 2 * param.element_size()
    return count
