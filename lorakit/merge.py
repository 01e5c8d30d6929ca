"""Merging adapters into the base weights and back: explicit, idempotent, drift-free in bf16/fp16.

Merge computes W + sum dW in fp32 and rounds once; unmerge subtracts the same deltas, restoring W to
within one rounding step of the weight's dtype.
"""

from __future__ import annotations

import warnings

from torch import nn
from torch.nn.utils import parametrize

from lorakit.inject import lora_layers, unwrap_all
from lorakit.layer import LoraLayer


def merge_adapters(model: nn.Module, names: list[str], safe: bool = False) -> None:
    layers = [layer for _, layer in lora_layers(model)]
    _untie_shared_weights(model)
    if safe:  # check every layer before changing any, so a failure leaves the model as it was
        for layer in layers:
            layer.check_mergeable(names)
    for layer in layers:
        layer.merge(names)


def unmerge_adapters(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module, names: list[str], safe: bool = False) -> nn.Module:
    """The base model with the named adapters folded into its weights and no LoRA modules left; adapters merged
    before stay merged (as PEFT: the model returned gives the outputs it gave, plus the named ones)."""
    merge_adapters(model, names, safe=safe)
    return unwrap_all(model, keep="active")


def unload(model: nn.Module) -> nn.Module:
    """The base model as it was: merged adapters are subtracted, LoRA modules removed."""
    unmerge_adapters(model)
    return unwrap_all(model, keep="original")


def _untie_shared_weights(model: nn.Module) -> None:
    """A merged delta belongs to the adapted layer alone: modules that share its weight (tied input and
    output embeddings) get their own copy of the base weight first, and the config stops re-tying them. Two adapted
    layers on one tensor (BART's encoder and decoder embed_tokens) each merge into a copy of their own."""
    layers = dict(lora_layers(model))
    adapted: dict[int, str] = {}
    for path, layer in layers.items():
        weight = layer.stored_weight
        if id(weight) not in adapted:
            adapted[id(weight)] = path
            continue
        _give_own_weight(layer, weight)
        warnings.warn(
            f"{path} shared its weight with the adapted {adapted[id(weight)]}; it takes its own copy of the base "
            "weight so that each merges only its own delta",
            stacklevel=3,
        )
        _stop_retying(model)
    for path, module in model.named_modules(remove_duplicate=False):
        if any(path == p or path.startswith(p + ".") for p in layers):
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) in adapted:
                setattr(module, name, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))
                warnings.warn(
                    f"{path}.{name} shared its weight with the adapted {adapted[id(param)]}; it keeps the base "
                    "weight as its own copy so merging changes only the adapted layer",
                    stacklevel=3,
                )
                _stop_retying(model)


def _stop_retying(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False


def _give_own_weight(layer: LoraLayer, weight: nn.Parameter) -> None:
    """The layer's stored base weight replaced by a copy (where a parametrization keeps it, its `original`)."""
    own = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    name, host = layer.kind.weight_name(), layer.weight_host
    if layer.kind.acts_on_weight and parametrize.is_parametrized(host, name):
        host.parametrizations[name].original = own
    else:
        setattr(host, name, own)
