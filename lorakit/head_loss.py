"""Cross-entropy of a model's output head without its full logits tensor.

A causal LM's head turns N hidden states into N x V logits (V, the vocabulary, is 32k-256k words), which the loss
upcasts to fp32: 8k tokens x 128k words is 4 GiB, more than the adapters' activations in the whole model. Here the
head and the loss run on chunks of rows, and each chunk's gradients (for its hidden states and for every trainable
parameter of the head: a LoRA on lm_head, a bias, a weight tied to the embeddings) are taken at once, so no chunk's
logits outlive it and backward recomputes nothing. It is Liger's fused linear cross-entropy made generic: the head
module itself is called, so whatever the head holds gets its own gradient.

A plain frozen nn.Linear head (the common case: a LoRA elsewhere, the head tied to the frozen embeddings) takes a
faster path: the loss's gradient for the logits is written down (softmax - one-hot) instead of recorded by autograd,
so a chunk holds its logits and their gradient only, and on CUDA that arithmetic is one compiled function (two
passes over the logits instead of the eager ops' dozen).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# fp32-logit bytes per chunk. On a CPU chunks cost nothing but their arithmetic, so they stay small and so does the
# RSS. On a GPU each chunk also costs a Python iteration and a dozen kernel launches, and a 128-row matmul leaves the
# tensor cores idle: 64 MiB would be 64 chunks for an 8k-token batch at 128k words, so a GPU takes 4x the bytes
# (16 chunks, 523 rows each) while a chunk's logits and their gradient (2 x bf16) stay at 256 MiB, far below the
# full 4 GiB of fp32 logits.
CHUNK_BYTES = 64 * 2**20
CUDA_CHUNK_BYTES = 256 * 2**20
CHUNK_ROWS = 1024  # when the vocabulary is not known


def chunk_rows(vocab: int, device: torch.device | str | None = None) -> int:
    """Rows per chunk for a `vocab`-word head on `device`: one chunk's fp32 logits fill CHUNK_BYTES (CUDA:
    CUDA_CHUNK_BYTES); 16 rows at least, so the head's matmul stays a matmul."""
    budget = CUDA_CHUNK_BYTES if device is not None and torch.device(device).type == "cuda" else CHUNK_BYTES
    return max(16, budget // (4 * vocab))


def head_loss(hidden: Tensor, head: nn.Module, labels: Tensor, ignore_index: int = -100,
              chunk_rows: int = CHUNK_ROWS, compiled: bool | None = None) -> tuple[Tensor, int]:  # fmt: skip
    """(summed cross-entropy, rows whose argmax is the label) of head(hidden) (N, H) -> (N, V) against labels (N,).
    `compiled`: compile a plain linear head's per-chunk loss arithmetic (None: on CUDA).

    Semantics: loss = F.cross_entropy(head(hidden).float(), labels, ignore_index=ignore_index, reduction="sum"),
    with the same gradients for `hidden` and for the head's trainable parameters.
    """
    params = [p for p in head.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
    compiled = hidden.is_cuda if compiled is None else compiled
    if params or (torch.is_grad_enabled() and hidden.requires_grad):
        loss, correct = _HeadLoss.apply(hidden, labels, head, ignore_index, chunk_rows, compiled, *params)
    else:
        loss, correct, _ = _chunks(hidden, head, labels, ignore_index, chunk_rows, compiled, [], grad_hidden=False)
    return loss, int(correct)


class _HeadLoss(torch.autograd.Function):
    """Forward takes each chunk's gradients as it goes; backward only scales them by the loss's gradient."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, labels: Tensor, head: nn.Module, ignore_index: int, chunk_rows: int,
                compiled: bool, *params: Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
        loss, correct, grads = _chunks(
            hidden, head, labels, ignore_index, chunk_rows, compiled, list(params), grad_hidden=ctx.needs_input_grad[0]
        )
        ctx.mark_non_differentiable(correct)
        ctx.grads = grads  # (hidden's or None, *params'): tensors, not saved_tensors, as none is an input or output
        return loss, correct

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, _grad_correct: Tensor) -> tuple[Tensor | None, ...]:
        scaled = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.grads]
        ctx.grads = None
        return scaled[0], None, None, None, None, None, *scaled[1:]


def _chunks(hidden: Tensor, head: nn.Module, labels: Tensor, ignore_index: int, chunk_rows: int, compiled: bool,
            params: list[Tensor], grad_hidden: bool) -> tuple[Tensor, Tensor, list[Tensor | None]]:  # fmt: skip
    """Loss sum, correct count and, when asked, the summed gradients (hidden's first, then each of `params`)."""
    if not params and _plain_linear(head):
        return _linear_chunks(hidden, head, labels, ignore_index, chunk_rows, compiled, grad_hidden)
    return _module_chunks(hidden, head, labels, ignore_index, chunk_rows, params, grad_hidden)


def _plain_linear(head: nn.Module) -> bool:
    """An nn.Linear itself (no LoRA wrapper, no subclass, no hook): its forward is F.linear and nothing else."""
    return type(head) is nn.Linear and not (head._forward_hooks or head._forward_pre_hooks)


def _module_chunks(hidden: Tensor, head: nn.Module, labels: Tensor, ignore_index: int, chunk_rows: int,
                   params: list[Tensor], grad_hidden: bool) -> tuple[Tensor, Tensor, list[Tensor | None]]:  # fmt: skip
    """Any head: each chunk through the module itself and autograd, so every trainable tensor in it gets its grad."""
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


def _linear_chunks(hidden: Tensor, head: nn.Linear, labels: Tensor, ignore_index: int, chunk_rows: int,
                   compiled: bool, grad_hidden: bool) -> tuple[Tensor, Tensor, list[Tensor | None]]:  # fmt: skip
    """A frozen nn.Linear head: logits = F.linear(h, W, b) in the dtype autocast would give them, the loss's
    gradient for them written down, hidden's gradient = d(logits) @ W, as autograd computes it."""
    dtype = _linear_dtype(hidden, head.weight)
    weight = head.weight.detach().to(dtype)  # cast once, not per chunk (autocast re-casts a frozen weight each call)
    bias = None if head.bias is None else head.bias.detach().to(dtype)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    grad_h = torch.zeros_like(hidden) if grad_hidden else None
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits, targets = F.linear(hidden[rows].detach().to(dtype), weight, bias), labels[rows]  # (chunk, V)
            if compiled:  # the last chunk is shorter, and a run's row count varies: one graph for every length
                torch._dynamo.maybe_mark_dynamic(logits, 0)
                torch._dynamo.maybe_mark_dynamic(targets, 0)
            chunk_loss, chunk_correct, grad_logits = _chunk_loss(compiled, logits, targets, ignore_index, grad_hidden)
            loss += chunk_loss
            correct += chunk_correct
            if grad_hidden:
                grad_h[rows] = grad_logits @ weight  # (chunk, V) @ (V, H)
            del logits, grad_logits
    return loss, correct, [grad_h]


def _linear_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype F.linear(hidden, weight) computes in here: autocast's when it is on for this device, else hidden's."""
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind) and hidden.is_floating_point():
        return torch.get_autocast_dtype(kind)
    return hidden.dtype


def _loss_and_grad(logits: Tensor, labels: Tensor, ignore_index: int,
                   with_grad: bool) -> tuple[Tensor, Tensor, Tensor | None]:  # fmt: skip
    """(summed fp32 cross-entropy, correct count, d(loss)/d(logits) in the logits' dtype or None) of one chunk:
    the gradient is softmax - one-hot on scored rows and 0 on ignored ones, computed in fp32 as autograd would."""
    x = logits.float()  # (chunk, V)
    valid = labels != ignore_index
    target = torch.where(valid, labels, 0)
    lse = torch.logsumexp(x, dim=-1)  # (chunk,)
    picked = x.gather(1, target[:, None])[:, 0]
    loss = torch.where(valid, lse - picked, 0.0).sum()
    correct = ((x.argmax(-1) == labels) & valid).sum()
    if not with_grad:
        return loss, correct, None
    one_hot = torch.arange(x.shape[1], device=x.device)[None, :] == target[:, None]
    grad = (torch.exp(x - lse[:, None]) - one_hot.float()) * valid[:, None]
    return loss, correct, grad.to(logits.dtype)


@functools.cache
def _compiled_loss_and_grad() -> Callable[..., tuple[Tensor, Tensor, Tensor | None]]:
    """_loss_and_grad compiled once per process: its reductions and its gradient become two passes over a chunk's
    logits, nothing of fp32 (chunk, V) size is stored."""
    return torch.compile(_loss_and_grad)


_compile_failed = False  # once the backend failed here, chunks run eagerly for the rest of the process


def _chunk_loss(compiled: bool, logits: Tensor, labels: Tensor, ignore_index: int,
                with_grad: bool) -> tuple[Tensor, Tensor, Tensor | None]:  # fmt: skip
    """_loss_and_grad, compiled when asked; a backend that fails (no compiler, no triton) costs speed, not the run."""
    global _compile_failed
    if compiled and not _compile_failed:
        try:
            return _compiled_loss_and_grad()(logits, labels, ignore_index, with_grad)
        except torch._dynamo.exc.TorchDynamoException as err:
            _compile_failed = True
            warnings.warn(f"torch.compile failed on the head loss ({type(err).__name__}: {str(err)[:200]}); its "
                          "chunks run eagerly", stacklevel=2)  # fmt: skip
    return _loss_and_grad(logits, labels, ignore_index, with_grad)
