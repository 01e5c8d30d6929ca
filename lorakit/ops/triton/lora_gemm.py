"""Inference GEMM with the LoRA term inside the base product: y is written once, and nothing of x's or y's size
is read again.

    t = x A^T                  (N x R)  in the K loop beside x W^T (few rows: decode), or one GEMM before (prefill)
    y = x W^T + s t B^T + b    (N x out)  s t B^T as one more K step over (t, B), b in the epilogue

The composite of cuBLAS calls (fused_linear._inference) reads x again for t and y twice more for the expand, about
a fifth of a 2048-wide layer's time at 2048 tokens, and launches two more kernels per layer, most of a decode
step's extra time. t is rounded to x's dtype before the expand, as the reference rounds A(x); every product
accumulates in fp32. Only fp16/bf16 (fp32 keeps cuBLAS's composite) and R <= MAX_RANK.

The inference path takes it for a compiled decode step's rows (<= DECODE_ROWS). The many-rows forms (t by a GEMM
first; tiles through plain loads or the TMA unit) are kept for benchmarks/lora_gemm_gpu.py and its tests: at 2048
rows they lose to the composite so far (benchmarks/README.md, "One kernel for a compiled decode step").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_RANK = 128  # the expand step holds (rows x R) and (out x R) tiles at once
DECODE_ROWS = 16  # up to this many rows, one kernel (at 64, x's tile read by every column block costs 2x)


@dataclass(frozen=True)
class Tiles:
    """One launch configuration: tile sizes, the group of row blocks that share W's tiles in L2, and the GPU's
    pipeline depth and warps."""

    block_m: int
    block_n: int
    block_k: int
    stages: int
    warps: int
    group_m: int = 8


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile (row block, column block): GROUP_M row blocks take each column block in turn,
    so the W tiles they share are still in L2."""
    pid = tl.program_id(0)
    width = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // width) * GROUP_M
    size_m = min(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _lora_gemm_kernel(
    x_ptr, w_ptr, a_ptr, t_ptr, b_ptr, bias_ptr, y_ptr,
    M, N, K, R, scale,
    stride_xm, stride_wn, stride_am, stride_tm, stride_bn, stride_ym,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, SHRINK: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    # rows and columns past the edge read the first ones again (no load masks in the loop) and are not stored.
    # No alignment hints on them: with a row stride not a multiple of 16 elements, a hinted row index would claim
    # aligned rows and vectorise misaligned loads; the loads along K vectorise from the stride's own alignment.
    rm_in = rm % M
    rn_in = rn % N
    x_ptrs = x_ptr + rm_in[:, None] * stride_xm + rk[None, :]
    w_ptrs = w_ptr + rn_in[:, None] * stride_wn + rk[None, :]
    a_ptrs = a_ptr + rr[:, None] * stride_am + rk[None, :]
    r_in = rr[:, None] < R

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_in = rk[None, :] < K - k0
            x = tl.load(x_ptrs, mask=k_in, other=0.0)
            w = tl.load(w_ptrs, mask=k_in, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
        if SHRINK:  # t = x A^T from the x tile already loaded
            if EVEN_K:  # noqa: SIM108 (constexpr branches: one load each)
                a = tl.load(a_ptrs, mask=r_in, other=0.0)
            else:
                a = tl.load(a_ptrs, mask=r_in & k_in, other=0.0)
            t_acc = tl.dot(x, tl.trans(a), t_acc)
            a_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if HAS_LORA:
        if SHRINK:
            t = t_acc.to(x_ptr.dtype.element_ty)
        else:
            t = tl.load(t_ptr + rm_in[:, None] * stride_tm + rr[None, :], mask=rr[None, :] < R, other=0.0)
        b = tl.load(b_ptr + rn_in[:, None] * stride_bn + rr[None, :], mask=rr[None, :] < R, other=0.0)
        acc += tl.dot(t, tl.trans(b)) * scale
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn_in)[None, :].to(tl.float32)
    out = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=out)


@triton.jit
def _lora_gemm_tma_kernel(
    x_desc, w_desc, t_desc, b_desc, bias_ptr, y_desc, M, N, K, scale,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """The prefill kernel with every tile moved by the TMA unit (edges zero-filled and clipped by it)."""
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        acc = tl.dot(x_desc.load([off_m, k0]), w_desc.load([off_n, k0]).T, acc)
    if HAS_LORA:
        acc += tl.dot(t_desc.load([off_m, 0]), b_desc.load([off_n, 0]).T) * scale
    if HAS_BIAS:
        rn = off_n + tl.arange(0, BLOCK_N)
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0)[None, :].to(tl.float32)
    y_desc.store([off_m, off_n], acc.to(y_desc.dtype))


def fusable(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor) -> bool:
    """The inputs the kernel takes: CUDA, one half dtype throughout, rows of x, W, A, B contiguous, R <= MAX_RANK."""
    dtype = x.dtype
    return (
        x.is_cuda
        and dtype in (torch.float16, torch.bfloat16)
        and weight.dtype == dtype == lora_a.dtype == lora_b.dtype
        and lora_a.shape[0] <= MAX_RANK
        and x.shape[0] > 0
        and all(t.stride(-1) == 1 for t in (x, weight, lora_a, lora_b))
    )


def tiles_for(rows: int, n_out: int, n_in: int, rank: int = 16) -> Tiles:
    """The launch configuration for (rows x n_in) @ (n_in x n_out) on a Hopper-class GPU, from
    benchmarks/lora_gemm_gpu.py's sweep. Few rows: many thin column blocks (one per SM or more), so W streams
    from memory at full speed; long K steps keep enough of it in flight."""
    if rows <= DECODE_ROWS:
        block_m = max(16, triton.next_power_of_2(rows))
        block_n, block_k = (32, 128) if n_out >= 4096 else (16, 512 if n_in >= 8192 else 256)
        block_r = max(16, triton.next_power_of_2(rank))  # A's tile streams beside W's
        while (block_m + block_n + block_r) * block_k * 2 > 96 << 10 and block_k > 64:  # two stages must fit
            block_k //= 2
        return Tiles(block_m, block_n, block_k, _stages(block_m + block_n + block_r, block_k, 5), 2, 1)
    return Tiles(128, 128, 64, 4, 8)


def _stages(rows_of_tiles: int, block_k: int, most: int) -> int:
    """The deepest pipeline up to `most` whose buffers (stages - 1 of them, 2-byte elements) fit in 200 KB."""
    return max(2, min(most, 1 + (200 << 10) // (rows_of_tiles * block_k * 2)))


def lora_gemm(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor | None, lora_b: Tensor | None, scale: float,
    tiles: Tiles | None = None, shrink: bool | None = None, tma: bool = False, wrapped: bool = False,
) -> Tensor:  # fmt: skip
    """x W^T + scale (x A^T) B^T + b for 2-D x (rows x in), W (out x in), A (R x in), B (out x R), as one kernel
    (few rows, or `shrink`) or a small GEMM and one kernel; A None: x W^T + b alone. `tiles`, `shrink` and `tma`
    override the defaults (benchmarks); `wrapped` launches through torch.library.wrap_triton (the op's body)."""
    rows, n_in = x.shape
    n_out = weight.shape[0]
    has_lora = lora_a is not None
    rank = lora_a.shape[0] if has_lora else 1
    tiles = tiles or tiles_for(rows, n_out, n_in, rank)
    shrink = rows <= DECODE_ROWS if shrink is None else shrink
    if not has_lora:
        lora_a = lora_b = t = x
    else:
        t = lora_a if shrink else torch.mm(x, lora_a.T)  # (rows x R); unused when the kernel computes it
    y = x.new_empty(rows, n_out)
    grid = (triton.cdiv(rows, tiles.block_m) * triton.cdiv(n_out, tiles.block_n),)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        block_r = max(16, triton.next_power_of_2(rank))
        m, n, k = tiles.block_m, tiles.block_n, tiles.block_k
        _wrap(_lora_gemm_tma_kernel, wrapped)[grid](
            TensorDescriptor.from_tensor(x, [m, k]), TensorDescriptor.from_tensor(weight, [n, k]),
            TensorDescriptor.from_tensor(t, [m, block_r]), TensorDescriptor.from_tensor(lora_b, [n, block_r]),
            bias if bias is not None else y, TensorDescriptor.from_tensor(y, [m, n]),
            rows, n_out, n_in, float(scale), HAS_BIAS=bias is not None, HAS_LORA=has_lora,
            BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=tiles.group_m, num_stages=tiles.stages, num_warps=tiles.warps,
        )  # fmt: skip
        return y
    _wrap(_lora_gemm_kernel, wrapped)[grid](
        x, weight, lora_a, t, lora_b, bias if bias is not None else y, y,
        rows, n_out, n_in, rank, float(scale),
        x.stride(0), weight.stride(0), lora_a.stride(0), t.stride(0), lora_b.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, HAS_LORA=has_lora, SHRINK=shrink and has_lora, EVEN_K=n_in % tiles.block_k == 0,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        BLOCK_R=max(16, triton.next_power_of_2(rank)), GROUP_M=tiles.group_m,
        num_stages=tiles.stages, num_warps=tiles.warps,
    )  # fmt: skip
    return y


def _wrap(kernel, wrapped: bool):
    return torch.library.wrap_triton(kernel) if wrapped else kernel


def _lora_gemm_op(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scale: float
) -> Tensor:
    return lora_gemm(x, weight, bias, lora_a, lora_b, scale, wrapped=True)


# what compiled code calls: a triton_op, so the compiled step (and its CUDA graph) launches the kernel itself
lora_gemm_op = torch.library.triton_op("lorakit::lora_gemm", _lora_gemm_op, mutates_args=())
