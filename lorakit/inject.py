"""Putting adapters into a model and taking them out again, by module path."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from lorakit.adapter import Adapter
from lorakit.config import LoraConfig
from lorakit.errors import ConfigError, TargetError
from lorakit.fused_experts import convert_moe_targets
from lorakit.kinds import Kind, parameter_kind
from lorakit.layer import LoraLayer
from lorakit.saved import SavedModule
from lorakit.targets import (
    TASK_HEADS,
    check_fused_kernel_targets,
    default_targets,
    find_module_targets,
    find_parameter_targets,
    find_token_targets,
    logical_modules,
    modules_to_save,
    saved_name_matches,
)
from lorakit.variants import TrainableTokens, VeraConfig, variant_for


def inject_adapter(
    model: nn.Module, name: str, config: LoraConfig | VeraConfig, adapter_dtype: torch.dtype | None = None
) -> None:
    """Adds adapter `name` to every target of `config`, wrapping targets on first use."""
    targets = _lora_targets(model, config)
    token_targets = find_token_targets(model, config)
    saved_paths = _saved_module_paths(model, config)  # all lookups before any change to the model
    _check_lora_and_saved_apart(model, [p for p, _, _ in targets], saved_paths)
    both = [p for p, _ in token_targets if p in saved_paths]
    if both:
        raise TargetError(f"{both} cannot train in full (modules_to_save) and by token rows at once (as in PEFT)")
    if targets:
        variant = variant_for(config, [(path, kind, _base_module(model, path)) for path, kind, _ in targets])
        _add_lora(model, name, config, targets, variant, adapter_dtype)
    for path, indices in token_targets:
        variant = TrainableTokens(indices, getattr(config, "init_weights", True))
        module = _wrapped(model, path, parameter_kind(_base_module(model, path), "weight"))
        module.add_adapter(name, Adapter(module.kind, module.stored_weight, len(indices), 1.0, 1.0, 0.0, variant))
    for path in saved_paths:
        saved = model.get_submodule(path)
        if not isinstance(saved, SavedModule):
            saved = SavedModule(saved)
            _replace(model, path, saved)
        saved.add_copy(name)


def _lora_targets(model: nn.Module, config: LoraConfig | VeraConfig) -> list[tuple[str, Kind, str]]:
    """(path, kind, name rank_pattern matches) for every LoRA target, checked; the facts PEFT records are written
    into the config. A parameter target is matched by its parameter's path, as in PEFT (experts.gate_up_proj)."""
    if not getattr(config, "adapts_layers", True):
        return []
    convert_moe_targets(model, config)
    targets = [(path, kind, path) for path, kind in find_module_targets(model, config)]
    targets += [(path, kind, f"{path}.{kind.weight_name()}") for path, kind in find_parameter_targets(model, config)]
    check_fused_kernel_targets(model, config, [path for path, _, _ in targets])
    for path, kind, key in targets:
        if config.lora_dropout and kind.acts_on_weight:
            raise ConfigError(
                f"lora_dropout must be 0 for {path}: it is adapted on its weight (target_parameters, the fused MoE "
                "expert weights that all-linear or the expert names select, as PEFT does, or nn.MultiheadAttention), "
                "not on the layer input, so there is nothing to drop out; set lora_dropout=0 or leave it out"
            )
        kind.check_rank(path, config.rank_and_alpha(key)[0])
        if config.lora_bias and kind.is_embedding:
            raise TargetError(f"lora_bias=True does not work on embeddings (as in PEFT); exclude {path}")
    if config.target_modules is None and not config.target_parameters:
        config.target_modules = default_targets(model)  # recorded, as PEFT does, so the file says what it adapts
    if any(kind.fan_in_fan_out for _, kind, _ in targets):
        config.fan_in_fan_out = True  # recorded as PEFT does, so PEFT reads the file without a warning
    return targets


def _add_lora(model, name, config, targets, variant, adapter_dtype) -> None:
    for path, kind, key in targets:
        layer = _wrapped(model, path, kind)
        r, alpha = config.rank_and_alpha(key)
        try:
            adapter = Adapter(
                kind,
                layer.stored_weight,
                r,
                alpha,
                config.scale(r, alpha),
                config.lora_dropout,
                variant,
                init=config.init_lora_weights,
                dtype=adapter_dtype,
                lora_bias=config.lora_bias,
            )
        except (RuntimeError, MemoryError) as err:  # r so large that the factors cannot be allocated
            remove_adapter(model, name)
            raise ConfigError(f"r={r} is too large for {path}: its LoRA factors cannot be allocated ({err})") from None
        layer.add_adapter(name, adapter)


def _check_lora_and_saved_apart(model: nn.Module, lora_paths: list[str], saved_paths: list[str]) -> None:
    """A module is either trained in full (modules_to_save) or wrapped with LoRA, by every adapter alike: a file
    could not hold both, and PEFT refuses the mix."""
    wrapped = [p for p in saved_paths if isinstance(model.get_submodule(p), LoraLayer)]
    saved = [p for p in lora_paths if isinstance(model.get_submodule(p), SavedModule)]
    if wrapped or saved:
        raise TargetError(
            f"modules_to_save {wrapped} are wrapped with LoRA by another adapter, or target_modules {saved} are "
            "trained in full (modules_to_save) by another adapter; a module cannot be both: remove it from one list"
        )


def remove_adapter(model: nn.Module, name: str) -> None:
    for _, layer in lora_layers(model):
        if name in layer.adapters:
            layer.delete_adapter(name)
    for _, saved in saved_modules(model):
        if name in saved.copies:
            del saved.copies[name]


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for path, module in _hosts_and_bases(model):
        if isinstance(module, LoraLayer):
            yield path, module


def saved_modules(model: nn.Module) -> Iterator[tuple[str, SavedModule]]:
    for path, module in _hosts_and_bases(model):
        if isinstance(module, SavedModule):
            yield path, module


def _hosts_and_bases(module: nn.Module, prefix: str = "", seen: set[int] | None = None) -> Iterator[tuple]:
    """named_modules() without descending into adapters (a layer's `adapters`, a saved module's `copies`): those
    hold no further hosts, and with many adapters they are most of the modules, so a walk per add stays cheap."""
    seen = set() if seen is None else seen
    if id(module) in seen:
        return
    seen.add(id(module))
    yield prefix, module
    skip = "adapters" if isinstance(module, LoraLayer) else "copies" if isinstance(module, SavedModule) else None
    for name, child in module._modules.items():
        if child is not None and name != skip:
            yield from _hosts_and_bases(child, f"{prefix}.{name}" if prefix else name, seen)


def unwrap_all(model: nn.Module, keep: str = "original") -> nn.Module:
    """Puts every base layer back in place of its LoraLayer, and one module in place of each SavedModule.

    keep="active" keeps the active adapter's copy of each saved module (merge), "original" the original.
    """
    for path, layer in reversed(list(lora_layers(model))):  # inner layers first: their paths run through outer ones
        _replace(model, path, layer.unwrap())
    for path, saved in list(saved_modules(model)):
        _replace(model, path, saved.current() if keep == "active" else saved.original_module)
    return model


def _base_module(model: nn.Module, path: str) -> nn.Module:
    module = model.get_submodule(path)
    return module.weight_host if isinstance(module, LoraLayer) else module


def _wrapped(model: nn.Module, path: str, kind: Kind) -> LoraLayer:
    """The layer at `path` that adapts `kind`, made on first use. Another weight of a module whose weights are
    adapted gets a layer of its own around the others (PEFT nests its ParamWrappers the same way)."""
    module = model.get_submodule(path)
    chain = layer_chain(module)
    same = [layer for layer in chain if layer.kind == kind]
    if same:
        return same[0]
    clash = [
        layer.kind for layer in chain if not layer.kind.acts_on_weight or layer.kind.weight_name() == kind.weight_name()
    ]
    if chain and (clash or not kind.acts_on_weight):
        held = ", ".join(f"{k.name} ({k.weight_name()})" for k in clash or [layer.kind for layer in chain])
        raise TargetError(
            f"{path} is already adapted as {held}; it cannot also take a {kind.name} adapter on "
            f"{kind.weight_name()}: a module is adapted either as a whole (target_modules) or on its parameters "
            "(target_parameters, several of them if needed), and each parameter in one way, as in PEFT; "
            "remove it from one of the lists"
        )
    layer = LoraLayer(module, kind)
    layer.path = path  # its siblings (q, k and v) are found by it: lorakit.layer's gathered groups
    _replace(model, path, layer)
    return layer


def layer_chain(module: nn.Module) -> list[LoraLayer]:
    """The LoraLayers at one path, outermost first: one, or one per adapted weight of the module."""
    chain = []
    while isinstance(module, LoraLayer):
        chain.append(module)
        module = module.base_layer
    return chain


def _saved_module_paths(model: nn.Module, config: LoraConfig) -> list[str]:
    wanted = modules_to_save(config)
    hits = [p for p, _ in logical_modules(model) if saved_name_matches(p, wanted)]
    paths = [p for p in hits if not any(p.startswith(outer + ".") for outer in hits)]  # the outermost of nested hits
    # a task's usual head names (PEFT writes them into the config) may be absent; other names may not
    optional = TASK_HEADS.get(config.task_type or "", [])
    required = [w for w in config.modules_to_save or [] if w not in optional]
    missing = [w for w in required if not any(saved_name_matches(p, [w]) for p in hits)]
    if missing:
        names = sorted({p.rsplit(".", 1)[-1] for p, _ in logical_modules(model)} - {""})
        names = [n for n in names if not n.isdigit()]  # a ModuleList's indices name no module kind
        raise TargetError(f"modules_to_save {missing} match no module; module names in this model: {names}")
    return paths


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)
