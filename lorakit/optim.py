"""Optimizers for adapters: LoRA+ learning-rate groups (Hayou et al. 2024) and post-step hooks (Delta-LoRA).

LoRA+: B learns at lr * loraplus_lr_ratio, A at lr, adapters on embeddings at loraplus_lr_embedding
(the paper's reference code and PEFT's create_loraplus_optimizer). Frozen factors (LoRA-FA's A, VeRA's
shared pair) are buffers, so they never reach the optimizer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.inject import lora_layers
from lorakit.variants.delta_lora import register_delta_lora


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
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """PEFT's create_loraplus_optimizer: B at lr * loraplus_lr_ratio (default 16), A at lr."""
    return create_optimizer(
        model,
        optimizer_cls,
        lr=lr,
        loraplus_lr_ratio=loraplus_lr_ratio,
        loraplus_lr_embedding=loraplus_lr_embedding,
        **kwargs,
    )


def loraplus_groups(model: nn.Module, lr: float, ratio: float, lr_embedding: float) -> list[dict[str, Any]]:
    """Parameter groups: A-side (lr), B-side incl. 1-D vectors (lr * ratio), embedding adapters, the rest (lr)."""
    if ratio < 1:
        raise ValueError(f"loraplus_lr_ratio is eta_B / eta_A and should be >= 1, got {ratio}")
    side_a, side_b, embedding = [], [], []
    for _, layer in lora_layers(model):
        for adapter in layer.adapters.values():
            for name, param in adapter.named_parameters():
                if not param.requires_grad:
                    continue
                if layer.kind.is_embedding:
                    embedding.append(param)
                elif name.startswith("lora_B") or param.dim() == 1:  # B, DoRA's magnitude, VeRA's vectors
                    side_b.append(param)
                else:
                    side_a.append(param)
    grouped = {id(p) for p in side_a + side_b + embedding}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in grouped]
    return [
        {"params": side_a, "lr": lr},
        {"params": side_b, "lr": lr * ratio},
        {"params": embedding, "lr": lr_embedding},
        {"params": rest, "lr": lr},
    ]
