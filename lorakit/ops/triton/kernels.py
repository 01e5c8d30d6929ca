"""Triton kernels for the dropout ops in dropout.py (CUDA impls; the CPU impls there are their spec).

Every kernel redraws keep[i, j] from one philox call per 8 columns (counter i * ceil(n_cols / 8) + j // 8, int32;
philox is the costly part, and 64-bit counters are several times slower; past 2**32 groups the bits repeat), so
the three agree bit for bit. A call's 128 bits are 8 uniforms of 16 bits each, u in {0 .. 65535}, and an element is
kept where u >= round(65536 p): the drop probability is p to within 2**-17, for half the philox rounds of 32-bit
uniforms (which made no measurable difference to a compiled step: its dropout cost was the host's, see dropout.py's
triton ops). Column tiles start at multiples of 8.
Rank r is padded to a power of two >= 16 inside the kernel (masked loads), never in memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

try:
    from torch.library import wrap_triton
except ImportError:  # torch < 2.6 has no triton_op either (dropout.py): the kernels are launched as they are

    def wrap_triton(kernel):
        return kernel


@triton.jit
def _keep(seed, rows, first_col, n_cols, threshold, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """keep for rows x [first_col, first_col + BLOCK_K): 8 uniforms of 16 bits per philox call (first_col % 8 == 0),
    kept where >= threshold (round(65536 p))."""
    groups = first_col // 8 + tl.arange(0, BLOCK_K // 8)
    r0, r1, r2, r3 = tl.randint4x(seed, rows[:, None] * tl.cdiv(n_cols, 8) + groups[None, :])
    words = tl.join(tl.join(r0, r1), tl.join(r2, r3)).to(tl.uint32, bitcast=True)
    uniform = tl.reshape(tl.join(words & 0xFFFF, words >> 16), (BLOCK_N, BLOCK_K))
    return uniform >= threshold


@triton.jit
def _keep_mask_kernel(out_ptr, seed_ptr, n_rows, n_cols, threshold, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    keep = _keep(tl.load(seed_ptr), rows, tl.program_id(1) * BLOCK_K, n_cols, threshold, BLOCK_N, BLOCK_K)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * n_cols + cols[None, :], keep.to(tl.int8), mask=inside)


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, s_ptr, seed_ptr, n_rows, n_cols, rank, stride_x, stride_a, threshold, inv_keep,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, BLOCK_R)
    seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_N, BLOCK_R), tl.float32)
    for k0 in range(0, n_cols, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=inside, other=0.0)
        x = tl.where(_keep(seed, rows, k0, n_cols, threshold, BLOCK_N, BLOCK_K), x, tl.zeros_like(x))
        a_t = tl.load(
            a_ptr + ranks[None, :] * stride_a + cols[:, None],
            mask=(ranks[None, :] < rank) & (cols[:, None] < n_cols),
            other=0.0,
        )  # (BLOCK_K x BLOCK_R)
        acc = tl.dot(x, a_t, acc, input_precision=PRECISION)
    out = (acc * inv_keep).to(s_ptr.dtype.element_ty)
    inside = (rows[:, None] < n_rows) & (ranks[None, :] < rank)
    tl.store(s_ptr + rows[:, None] * rank + ranks[None, :], out, mask=inside)


@triton.jit
def _expand_kernel(
    t_ptr, a_ptr, acc_ptr, out_ptr, seed_ptr, n_rows, n_cols, rank, stride_t, stride_a, threshold, inv_keep,
    HAS_ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, BLOCK_R)
    t = tl.load(
        t_ptr + rows[:, None].to(tl.int64) * stride_t + ranks[None, :],
        mask=(rows[:, None] < n_rows) & (ranks[None, :] < rank),
        other=0.0,
    )
    a = tl.load(
        a_ptr + ranks[:, None] * stride_a + cols[None, :],
        mask=(ranks[:, None] < rank) & (cols[None, :] < n_cols),
        other=0.0,
    )
    low_rank = tl.dot(t, a, input_precision=PRECISION)  # (BLOCK_N x BLOCK_K), fp32
    keep = _keep(tl.load(seed_ptr), rows, tl.program_id(1) * BLOCK_K, n_cols, threshold, BLOCK_N, BLOCK_K)
    value = tl.where(keep, low_rank * inv_keep, 0.0)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offsets = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    if HAS_ACC:
        value += tl.load(acc_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, value.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _grad_a_kernel(
    t_ptr, x_ptr, out_ptr, seed_ptr, n_rows, n_cols, rank, stride_t, stride_x, rows_per_split, threshold, inv_keep,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(1)
    ranks = tl.arange(0, BLOCK_R)
    seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_R, BLOCK_K), tl.float32)
    first = split * rows_per_split
    for n0 in range(first, first + rows_per_split, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        t_t = tl.load(
            t_ptr + rows[None, :].to(tl.int64) * stride_t + ranks[:, None],
            mask=(rows[None, :] < n_rows) & (ranks[:, None] < rank),
            other=0.0,
        )  # (BLOCK_R x BLOCK_N)
        inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=inside, other=0.0)
        x = tl.where(
            _keep(seed, rows, tl.program_id(0) * BLOCK_K, n_cols, threshold, BLOCK_N, BLOCK_K), x, tl.zeros_like(x)
        )
        acc = tl.dot(t_t, x, acc, input_precision=PRECISION)
    out = out_ptr + split * rank * n_cols + ranks[:, None] * n_cols + cols[None, :]
    tl.store(out, acc * inv_keep, mask=(ranks[:, None] < rank) & (cols[None, :] < n_cols))


def _threshold(p: float) -> int:
    """The 16-bit uniforms at or above which an element is kept: P(drop) = threshold / 65536 = p to 2**-17."""
    return min(65536, round(p * 65536))


def _block_r(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


def _precision(t: Tensor) -> str:
    return "ieee" if t.dtype == torch.float32 else "tf32"  # fp32 stays fp32 (the reference's math)


def _row_major(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def keep_mask(x: Tensor, seed: Tensor, p: float) -> Tensor:
    n_rows, n_cols = x.shape
    out = torch.empty((n_rows, n_cols), dtype=torch.int8, device=x.device)
    grid = (triton.cdiv(n_rows, 32), triton.cdiv(n_cols, 128))
    _keep_mask_kernel[grid](out, seed, n_rows, n_cols, _threshold(p), BLOCK_N=32, BLOCK_K=128)
    return out.bool()


def dropout_shrink(x: Tensor, lora_A: Tensor, seed: Tensor, p: float) -> Tensor:
    x, lora_A = _row_major(x), _row_major(lora_A.to(x.dtype))
    (n_rows, n_cols), rank = x.shape, lora_A.shape[0]
    out = torch.empty((n_rows, rank), dtype=x.dtype, device=x.device)
    block_r = _block_r(rank)
    block_n = 32 if block_r <= 64 else 16
    wrap_triton(_shrink_kernel)[(triton.cdiv(n_rows, block_n),)](
        x, lora_A, out, seed, n_rows, n_cols, rank, x.stride(0), lora_A.stride(0), _threshold(p), 1.0 / (1.0 - p),
        BLOCK_N=block_n, BLOCK_K=128 if block_r <= 64 else 64, BLOCK_R=block_r, PRECISION=_precision(x),
        num_warps=4, num_stages=3,
    )  # fmt: skip
    return out


def dropout_expand(t: Tensor, lora_A: Tensor, acc: Tensor | None, seed: Tensor, p: float) -> Tensor:
    t, lora_A = _row_major(t), _row_major(lora_A.to(t.dtype))
    (n_rows, rank), n_cols = t.shape, lora_A.shape[1]
    acc = None if acc is None else acc.contiguous()
    out = torch.empty((n_rows, n_cols), dtype=t.dtype, device=t.device)
    block_r = _block_r(rank)
    block_n, block_k = (64, 128) if block_r <= 64 else (32, 64)
    grid = (triton.cdiv(n_rows, block_n), triton.cdiv(n_cols, block_k))
    wrap_triton(_expand_kernel)[grid](
        t, lora_A, acc if acc is not None else out, out, seed, n_rows, n_cols, rank, t.stride(0), lora_A.stride(0),
        _threshold(p), 1.0 / (1.0 - p), HAS_ACC=acc is not None, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r,
        PRECISION=_precision(t), num_warps=4,
    )  # fmt: skip
    return out


def dropout_grad_a(t: Tensor, x: Tensor, seed: Tensor, p: float) -> Tensor:
    t, x = _row_major(t.to(x.dtype)), _row_major(x)
    (n_rows, n_cols), rank = x.shape, t.shape[1]
    block_r = _block_r(rank)
    block_n, block_k = (64, 64) if block_r <= 64 else (32, 64)
    col_blocks = triton.cdiv(n_cols, block_k)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    splits = max(1, min(triton.cdiv(n_rows, block_n), triton.cdiv(4 * sms, col_blocks)))
    rows_per_split = triton.cdiv(triton.cdiv(n_rows, splits), block_n) * block_n
    splits = triton.cdiv(n_rows, rows_per_split)
    partial = torch.empty((splits, rank, n_cols), dtype=torch.float32, device=x.device)
    wrap_triton(_grad_a_kernel)[(col_blocks, splits)](
        t, x, partial, seed, n_rows, n_cols, rank, t.stride(0), x.stride(0), rows_per_split, _threshold(p),
        1.0 / (1.0 - p), BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, PRECISION=_precision(x), num_warps=4,
        num_stages=3,
    )  # fmt: skip
    return partial.sum(0)
