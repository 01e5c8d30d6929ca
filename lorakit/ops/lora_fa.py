"""LoRA-FA's contribution (Zhang et al. 2023): A frozen, so backward needs only A x, never x.

y = s * B (A x)       saved for backward: h = A x (r values per token) instead of x (in values)
"""

from __future__ import annotations

import torch
from torch import Tensor


class _FrozenAContribution(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
        hidden = x @ lora_A.T  # (..., r): the only activation kept
        ctx.save_for_backward(hidden, lora_A, lora_B)
        ctx.scale = scale
        return (hidden @ lora_B.T) * scale

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, lora_A, lora_B = ctx.saved_tensors
        # backward runs outside autocast: under bf16 autocast grad_out and hidden are bf16 while A and B stay fp32,
        # so compute in grad_out's dtype and hand B its gradient in B's dtype
        dtype = grad_out.dtype
        grad_out = grad_out * ctx.scale
        grad_B = grad_out.reshape(-1, grad_out.shape[-1]).T @ hidden.reshape(-1, hidden.shape[-1]).to(dtype)
        grad_x = (grad_out @ lora_B.to(dtype)) @ lora_A.to(dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, grad_B.to(lora_B.dtype) if ctx.needs_input_grad[2] else None, None


def frozen_a_linear_contribution(x: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """Semantics: linear_contribution(x, lora_A.detach(), lora_B, scale), keeping only A x for backward."""
    return _FrozenAContribution.apply(x, lora_A.detach(), lora_B, scale)
