"""Cross-entropy of a model's output head without its full logits tensor.

A causal LM's head turns N hidden states into N x V logits (V, the vocabulary, is 32k-256k words), which the loss
upcasts to fp32: 8k tokens x 128k words is 4 GiB, more than the adapters' activations in the whole model. Here the
head and the loss run on chunks of rows, and each chunk's gradients (for its hidden states and for every trainable
parameter of the head: a LoRA on lm_head, a bias, a weight tied to the embeddings) are taken at once, so no chunk's
logits outlive it and backward recomputes nothing. It is Liger's fused linear cross-entropy made generic: the head
module itself is called, so whatever the head holds gets its own gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CHUNK_BYTES = 64 * 2**20  # fp32 logits alive at once (the whole batch's: 4 x 2048 tokens x 128k words = 4 GiB)
CHUNK_ROWS = 1024  # when the vocabulary is not known


def chunk_rows(vocab: int) -> int:
    """Rows per chunk for a `vocab`-word head: one chunk's fp32 logits fill CHUNK_BYTES; 16 rows at least, so the
    head's matmul stays a matmul."""
    return max(16, CHUNK_BYTES // (4 * vocab))


def head_loss(
    hidden: Tensor, head: nn.Module, labels: Tensor, ignore_index: int = -100, chunk_rows: int = CHUNK_ROWS
) -> tuple[Tensor, int]:
    """(summed cross-entropy, rows whose argmax is the label) of head(hidden) (N, H) -> (N, V) against labels (N,).

    Semantics: loss = F.cross_entropy(head(hidden).float(), labels, ignore_index=ignore_index, reduction="sum"),
    with the same gradients for `hidden` and for the head's trainable parameters.
    """
    params = [p for p in head.parameters() if p.requires_grad]
    if torch.is_grad_enabled() and (hidden.requires_grad or params):
        loss, correct = _HeadLoss.apply(hidden, labels, head, ignore_index, chunk_rows, *params)
    else:
        loss, correct, _ = _chunks(hidden, head, labels, ignore_index, chunk_rows, [], grad_hidden=False)
    return loss, int(correct)


class _HeadLoss(torch.autograd.Function):
    """Forward takes each chunk's gradients as it goes; backward only scales them by the loss's gradient."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, labels: Tensor, head: nn.Module, ignore_index: int, chunk_rows: int,
                *params: Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
        loss, correct, grads = _chunks(
            hidden, head, labels, ignore_index, chunk_rows, list(params), grad_hidden=ctx.needs_input_grad[0]
        )
        ctx.mark_non_differentiable(correct)
        ctx.grads = grads  # (hidden's or None, *params'): tensors, not saved_tensors, as none is an input or output
        return loss, correct

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, _grad_correct: Tensor) -> tuple[Tensor | None, ...]:
        scaled = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.grads]
        ctx.grads = None
        return scaled[0], None, None, None, None, *scaled[1:]


def _chunks(hidden: Tensor, head: nn.Module, labels: Tensor, ignore_index: int, chunk_rows: int,
            params: list[Tensor], grad_hidden: bool) -> tuple[Tensor, Tensor, list[Tensor | None]]:  # fmt: skip
    """Loss sum, correct count and, when asked, the summed gradients (hidden's first, then each of `params`)."""
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    wants_grad = grad_hidden or bool(params)
    grad_h = torch.zeros_like(hidden) if grad_hidden else None
    grad_params: list[Tensor | None] = [None] * len(params)
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        h = hidden[rows].detach().requires_grad_(grad_hidden)
        with torch.enable_grad() if wants_grad else torch.no_grad():
            logits = head(h).float()  # (chunk, V)
            chunk_loss = F.cross_entropy(logits, labels[rows], ignore_index=ignore_index, reduction="sum")
        if wants_grad:
            grads = torch.autograd.grad(chunk_loss, ([h] if grad_hidden else []) + params, allow_unused=True)
            if grad_hidden:
                grad_h[rows] = grads[0]
            for i, g in enumerate(grads[int(grad_hidden) :]):
                if g is not None:
                    grad_params[i] = g if grad_params[i] is None else grad_params[i].add_(g)
        with torch.no_grad():
            loss += chunk_loss.detach()
            correct += ((logits.argmax(-1) == labels[rows]) & (labels[rows] != ignore_index)).sum()
        del logits, chunk_loss
    return loss, correct, [grad_h, *grad_params]
