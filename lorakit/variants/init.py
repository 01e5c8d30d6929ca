"""Initialisations from the base weight (they act at init): PiSSA (Meng et al. 2024) and OLoRA (Büyükakyüz 2024).

    W = W_res + s * B A        A, B from W's top-r SVD (PiSSA) or QR (OLoRA); W_res stays in the base layer

so the model's output is unchanged at init, and training starts on W's principal directions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lorakit.errors import ConfigError

if TYPE_CHECKING:
    from lorakit.adapter import Adapter
    from lorakit.config import LoraConfig

WEIGHT_INITS = ("pissa", "olora")  # and "pissa_niter_<K>"


def orthogonal_init(adapter: Adapter) -> None:
    """PEFT's "orthogonal": A and B from the two halves of one random orthogonal matrix, so B A = 0 (the model
    starts unchanged and W is left alone) while both factors are nonzero and train from the first step.
    Drawn from the global generator in PEFT's order, so a seed gives PEFT's factors."""
    r = adapter.r
    q, _ = torch.linalg.qr(torch.randn(r, r))
    in_f, out_f = adapter.lora_A.shape[1], adapter.lora_B.shape[0]
    lora_A = (torch.randn(in_f, r // 2) @ q[0::2]).T / 10.0  # (r x in), rows in the span of Q's odd rows
    lora_B = torch.randn(r // 2, out_f).T @ q[1::2] / 10.0  # (out x r), orthogonal to A's: B A = 0
    adapter.lora_A.copy_(lora_A)
    adapter.lora_B.copy_(lora_B)


def init_from_weight(adapter: Adapter, weight: Tensor, mode: str) -> None:
    """Sets A, B from `weight` (out x in, or in x out for transposed kinds) and leaves W_res in `weight`."""
    w = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
    w = w.T if adapter.kind.transposed else w  # (out x in)
    r, scale = adapter.r, adapter.scale
    if mode == "olora":
        q, upper = torch.linalg.qr(w)
        lora_A, lora_B = upper[:r], q[:, :r]
    else:
        if mode == "pissa":
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            u, s, vh = u[:, :r], s[:r], vh[:r]
        else:  # pissa_niter_K: randomized SVD, K subspace iterations
            u, s, v = torch.svd_lowrank(w, q=r, niter=int(mode.rsplit("_", 1)[1]))
            vh = v.T
        root = torch.sqrt(s / scale)  # s * B A = U_r S_r V_r^T
        lora_A, lora_B = root[:, None] * vh, u * root
    adapter.lora_A.copy_(lora_A)
    adapter.lora_B.copy_(lora_B)
    residual = w - scale * (lora_B @ lora_A)
    weight.copy_((residual.T if adapter.kind.transposed else residual).to(weight.dtype))


def converted_to_lora(trained: dict[str, Tensor], initial: dict[str, Tensor]) -> dict[str, Tensor]:
    """A plain LoRA of rank 2r against the original W: s (B A - B0 A0) = s [B | -B0] [A ; A0].

    `trained` and `initial` map the same PEFT keys (lora_A / lora_B) to tensors; other keys pass through.
    """
    out = dict(trained)
    for key, value in trained.items():
        if ".lora_A" in key or ".lora_embedding_A" in key:
            out[key] = torch.cat([value, initial[key].to(value)], dim=0)
        elif ".lora_B" in key or ".lora_embedding_B" in key:
            out[key] = torch.cat([value, -initial[key].to(value)], dim=1)
    return out


def converted_config(config: LoraConfig) -> LoraConfig:
    """The config of the converted adapter: rank 2r with the same scale s, plain init (as PEFT writes it)."""
    if config.use_dora or config.variant != "lora":
        raise ConfigError("converting to a plain LoRA works for plain LoRA adapters only (no DoRA, LoRA-FA, ...)")
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ConfigError("conversion with use_rslora cannot keep the scale of rank_pattern / alpha_pattern entries")
    alpha_factor = math.sqrt(2) if config.use_rslora else 2  # s = alpha/r or alpha/sqrt(r) stays the same
    return dataclasses.replace(
        config,
        r=config.r * 2,
        lora_alpha=config.lora_alpha * alpha_factor,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()},
        init_lora_weights=True,
    )
