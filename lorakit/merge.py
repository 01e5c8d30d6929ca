"""Merging adapters into the base weights and back: explicit, idempotent, drift-free in bf16/fp16.

Merge computes W + sum dW in fp32 and rounds once; unmerge subtracts the same deltas, restoring W to
within one rounding step of the weight's dtype.
"""

from __future__ import annotations

import warnings

from torch import nn

from lorakit.inject import lora_layers, unwrap_all


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
    output embeddings) get their own copy of the base weight first, and the config stops re-tying them."""
    layers = dict(lora_layers(model))
    adapted = {id(layer.stored_weight): path for path, layer in layers.items()}
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
                config = getattr(model, "config", None)
                if getattr(config, "tie_word_embeddings", False):
                    config.tie_word_embeddings = False
