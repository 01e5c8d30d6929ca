"""The LoRA arithmetic in plain PyTorch: the specification every faster kernel is tested against.

Notation (the paper's): W (out x in) is frozen, A (r x in), B (out x r), s = alpha / r.
    y = W x + s * B (A x)        the adapter's contribution is s * B(A(x))
    dW = s * B @ A               the delta weight, added to W when merging
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def linear_contribution(x: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """Semantics: s * x @ A.T @ B.T; x (..., in) -> (..., out), through the r-wide bottleneck."""
    return F.linear(F.linear(x, lora_A), lora_B) * scale


def embedding_contribution(
    ids: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, padding_idx: int | None = None
) -> Tensor:
    """Semantics: s * B @ A[:, ids]; A (r x num_embeddings) is looked up like an embedding table."""
    hidden = F.embedding(ids, lora_A.T, padding_idx=padding_idx)  # (..., r)
    return F.linear(hidden, lora_B) * scale


def conv_contribution(
    x: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, conv: Callable[..., Tensor], **conv_args
) -> Tensor:
    """Semantics: s * conv(conv(x, A, base's stride/padding/dilation), B as a 1x1 conv)."""
    return conv(conv(x, lora_A, **conv_args), lora_B) * scale


def low_rank_delta(lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """Semantics: s * B @ A, any trailing kernel dims of A kept: (out x r) @ (r x in x k...) -> (out x in x k...)."""
    delta = lora_B.flatten(1) @ lora_A.flatten(1)
    return (delta * scale).reshape(lora_B.shape[0], *lora_A.shape[1:])


def merge_delta_(weight: Tensor, deltas: Sequence[Tensor], sign: int = 1) -> None:
    """Semantics: W <- round(W + sign * sum(deltas)), summed in fp32 so bf16/fp16 weights round once."""
    if not deltas:
        return
    acc = weight.detach().to(torch.float32 if weight.dtype != torch.float64 else torch.float64)
    for delta in deltas:
        acc = acc + sign * delta.detach().to(acc.dtype)
    with torch.no_grad():
        weight.copy_(acc.to(weight.dtype))
