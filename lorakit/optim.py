"""Optimizers for adapters: LoRA+ learning-rate groups (Hayou et al. 2024), post-step hooks (Delta-LoRA), and
LoRA-FA's projected-gradient AdamW (lorakit.lorafa, here beside PEFT's other optimizer factory).

LoRA+: B learns at lr * loraplus_lr_ratio, A at lr, adapters on embeddings at loraplus_lr_embedding
(the paper's reference code and PEFT's create_loraplus_optimizer). Frozen factors (LoRA-FA's A, VeRA's
shared pair) are buffers, so they never reach the optimizer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.inject import lora_layers
from lorakit.lorafa import LoraFAOptimizer, create_lorafa_optimizer
from lorakit.variants.delta_lora import register_delta_lora

__all__ = [
    "LoraFAOptimizer",
    "create_loraplus_optimizer",
    "create_lorafa_optimizer",
    "create_optimizer",
    "loraplus_groups",
]


def create_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    *,
    lr: float,
    loraplus_lr_ratio: float | None = None,
    loraplus_lr_embedding: float = 1e-6,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """`optimizer_cls` over the trainable parameters; LoRA+ groups when loraplus_lr_ratio is set."""
    if loraplus_lr_ratio is None:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
    else:
        groups = loraplus_groups(model, lr, loraplus_lr_ratio, loraplus_lr_embedding)
    optimizer = optimizer_cls([g for g in groups if g["params"]], lr=lr, **kwargs)
    register_delta_lora(optimizer, model)
    return optimizer


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    *,
    lr: float,
    loraplus_lr_ratio: float = 16.0,
    loraplus_lr_embedding: float = 1e-6,
    loraplus_weight_decay: float = 0.0,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """PEFT's create_loraplus_optimizer, step for step: B at lr * loraplus_lr_ratio (default 16), A at lr, and
    loraplus_weight_decay on every group but the biases and LayerNorm weights (which get none)."""
    if "weight_decay" in kwargs:  # PEFT passes it on, then every group overrides it: it never applies there
        raise ConfigError(
            "create_loraplus_optimizer takes its weight decay as loraplus_weight_decay (PEFT's groups override "
            f"weight_decay={kwargs['weight_decay']!r}, so PEFT trains without it): pass "
            "loraplus_weight_decay=... instead, or drop it for PEFT's result"
        )
    _check_rate("loraplus_weight_decay", loraplus_weight_decay)
    groups = loraplus_groups(model, lr, loraplus_lr_ratio, loraplus_lr_embedding, base_vectors_at_b_rate=True)
    no_decay = _no_decay(model)
    split = []
    for group in groups:
        decayed = [p for p in group["params"] if id(p) not in no_decay]
        kept = [p for p in group["params"] if id(p) in no_decay]
        split += [group | {"params": decayed, "weight_decay": loraplus_weight_decay}, group | {"params": kept}]
    optimizer = optimizer_cls(
        [g | {"weight_decay": g.get("weight_decay", 0.0)} for g in split if g["params"]], lr=lr, **kwargs
    )
    register_delta_lora(optimizer, model)
    return optimizer


def loraplus_groups(
    model: nn.Module, lr: float, ratio: float, lr_embedding: float, base_vectors_at_b_rate: bool = False
) -> list[dict[str, Any]]:
    """LoRA+ groups: the factors of embedding adapters (lr_embedding); B and the adapters' 1-D tensors (DoRA's
    magnitude, VeRA's vectors) (lr * ratio); the rest, A among them (lr). base_vectors_at_b_rate: the trained 1-D
    tensors outside the adapters (biases, norm weights) join B, as PEFT's create_loraplus_optimizer puts them."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio < 1:
        raise ConfigError(
            f"loraplus_lr_ratio is eta_B / eta_A, a finite number >= 1 (the paper uses 2 to 32; 16 by default), "
            f"got {ratio!r}"
        )
    _check_rate("loraplus_lr_embedding", lr_embedding)
    embedding_factors, b_side, in_adapters = set(), set(), set()
    for _, layer in lora_layers(model):
        for adapter in layer.adapters.values():
            for name, param in adapter.named_parameters():
                in_adapters.add(id(param))
                if layer.kind.is_embedding and name in ("lora_A", "lora_B"):
                    embedding_factors.add(id(param))
                elif name.startswith("lora_B") or param.dim() == 1:
                    b_side.add(id(param))
    side_a, side_b, embedding = [], [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if id(param) in embedding_factors:
            embedding.append(param)
        elif id(param) in b_side or (base_vectors_at_b_rate and id(param) not in in_adapters and param.dim() == 1):
            side_b.append(param)
        else:
            side_a.append(param)
    return [
        {"params": side_a, "lr": lr},
        {"params": side_b, "lr": lr * ratio},
        {"params": embedding, "lr": lr_embedding},
    ]


def _no_decay(model: nn.Module) -> set[int]:
    """PEFT's exceptions to weight decay: tensors whose name holds "bias", and LayerNorm weights."""
    found = {id(p) for name, p in model.named_parameters() if "bias" in name}
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            found |= {id(p) for p in module.parameters(recurse=False)}
    return found


def _check_rate(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
