"""Dropout on the LoRA path without a stored mask: each kept/dropped bit is a function of (seed, row, col).

    keep[i, j] = uniform(seed, i * in + j) >= p          (philox on CUDA, a seeded generator on CPU)

Three ops read x (or write dX) once and redraw the same bits, so forward and backward agree and nothing of
x's size is kept for backward (PEFT keeps the dropped-out copy of x):
    dropout_shrink(x, A)      S  = drop(x) A^T                 forward, (N x r)
    dropout_expand(T, A, C)   C' = C + drop^T(T A)             backward's dX, (N x in)
    dropout_grad_a(T, x)      dA = T^T drop(x)                 backward's dA, (r x in), fp32
drop(x) = keep * x / (1 - p). Registered as torch.library ops (triton_ops where triton imports, so compiled code
launches the kernels itself; custom ops with fake impls elsewhere); the CPU paths define the semantics, the CUDA
ones are triton kernels (kernels.py) that must match them bit for bit in `keep`.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    from lorakit.ops.triton import kernels
except ImportError:  # no triton: CPU impls only
    kernels = None


def draw_seeds(count: int, device: torch.device) -> Tensor:
    """One dropout seed per adapter, from torch's generator (so torch.manual_seed reproduces a step)."""
    return torch.randint(0, 2**31 - 1, (count,), device=device, dtype=torch.int64)


def _wide(t: Tensor) -> Tensor:
    """fp32 for the CPU impls' sums (float64 stays float64), as the kernels accumulate in fp32."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _no_autocast(t: Tensor):
    """The CPU impls sum in fp32 as the kernels do, whatever autocast is on around the op (it changes no kernel)."""
    return torch.autocast(t.device.type, enabled=False)


@torch.library.custom_op("lorakit::dropout_keep_mask", mutates_args=())
def keep_mask(x: Tensor, seed: Tensor, p: float) -> Tensor:
    """The bool mask (N x in) of the elements of x (N x in) that dropout with this seed keeps."""
    gen = torch.Generator().manual_seed(int(seed.item()))
    return (torch.rand(x.shape, generator=gen, dtype=torch.float32) >= p).to(x.device)


def _dropout_shrink(x: Tensor, lora_A: Tensor, seed: Tensor, p: float) -> Tensor:
    """S = drop(x) @ A^T in x's dtype; x (N x in), A (r x in)."""
    if kernels is not None and x.is_cuda:
        return kernels.dropout_shrink(x, lora_A, seed, p)
    with _no_autocast(x):
        kept = _wide(x) * keep_mask(x, seed, p) / (1 - p)
        return (kept @ _wide(lora_A).T).to(x.dtype)


def _dropout_expand(t: Tensor, lora_A: Tensor, acc: Tensor | None, seed: Tensor, p: float) -> Tensor:
    """acc + drop^T(T @ A) (N x in) in T's dtype; T (N x r), A (r x in); acc None counts as zeros."""
    if kernels is not None and t.is_cuda:
        return kernels.dropout_expand(t, lora_A, acc, seed, p)
    with _no_autocast(t):
        low_rank = _wide(t) @ _wide(lora_A)
    out = low_rank * keep_mask(low_rank, seed, p) / (1 - p)
    if acc is not None:
        out = out + _wide(acc)
    return out.to(t.dtype)


def _dropout_grad_a(t: Tensor, x: Tensor, seed: Tensor, p: float) -> Tensor:
    """dA = T^T @ drop(x) in fp32; T (N x r), x (N x in) -> (r x in)."""
    if kernels is not None and x.is_cuda:
        return kernels.dropout_grad_a(t, x, seed, p)
    with _no_autocast(x):
        kept = _wide(x) * keep_mask(x, seed, p) / (1 - p)
        return (_wide(t).T @ kept).float()


@keep_mask.register_fake
def _(x, seed, p):
    return torch.empty(x.shape, dtype=torch.bool, device=x.device)


def _fake_shrink(x, lora_A, seed, p):
    return x.new_empty(x.shape[0], lora_A.shape[0])


def _fake_expand(t, lora_A, acc, seed, p):
    return t.new_empty(t.shape[0], lora_A.shape[1])


def _fake_grad_a(t, x, seed, p):
    return x.new_empty(t.shape[1], x.shape[1], dtype=torch.float32)


def _op(name: str, fn, fake):
    """The op `name` over fn. Where triton imports, a triton_op: torch.compile sees its kernels and launches them
    from the compiled code, where a custom op's call through the dispatcher and its Python wrapper cost the host
    tens of microseconds, three calls per dropout layer per step (a step bound by the host). Elsewhere (no triton,
    or torch < 2.6) a custom op with its fake impl."""
    if kernels is None or not hasattr(torch.library, "triton_op"):
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fake)
        return op
    return torch.library.triton_op(name, fn, mutates_args=())


dropout_shrink = _op("lorakit::dropout_shrink", _dropout_shrink, _fake_shrink)
dropout_expand = _op("lorakit::dropout_expand", _dropout_expand, _fake_expand)
dropout_grad_a = _op("lorakit::dropout_grad_a", _dropout_grad_a, _fake_grad_a)

if kernels is not None:
    keep_mask.register_kernel("cuda")(kernels.keep_mask)
