"""Merging adapters into the base weights and back: explicit, idempotent, drift-free in bf16/fp16.

Merge computes W + sum dW in fp32 and rounds once; unmerge subtracts the same deltas, restoring W to
within one rounding step of the weight's dtype.
"""

from __future__ import annotations

from torch import nn

from lorakit.inject import lora_layers, unwrap_all


def merge_adapters(model: nn.Module, names: list[str], safe: bool = False) -> None:
    layers = [layer for _, layer in lora_layers(model)]
    if safe:  # check every layer before changing any, so a failure leaves the model as it was
        for layer in layers:
            layer.check_mergeable(names)
    for layer in layers:
        layer.merge(names)


def unmerge_adapters(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module, names: list[str], safe: bool = False) -> nn.Module:
    """The base model with the named adapters folded into its weights and no LoRA modules left."""
    unmerge_adapters(model)
    merge_adapters(model, names, safe=safe)
    return unwrap_all(model, keep="active")


def unload(model: nn.Module) -> nn.Module:
    """The base model as it was: merged adapters are subtracted, LoRA modules removed."""
    unmerge_adapters(model)
    return unwrap_all(model, keep="original")
