"""Inference GEMM with the LoRA term inside the base product: y is written once, and nothing of y's size is read
again.

    t = x A^T                  (N x R)  in the K loop beside x W^T, or one GEMM before (s t, by cuBLAS)
    y = x W^T + s t B^T + b    (N x out)  s t B^T as one more dot into the same fp32 tile, b in the epilogue

The composite of cuBLAS calls (fused_linear._inference) writes s t B^T as large as y and reads it back in the base
GEMM's epilogue, and reads x again for t: about a fifth of a 2048-wide layer's time at 2048 tokens, and for a
decode step two more launches per layer, most of its extra time. t is rounded to x's dtype before the expand, as
the reference rounds A(x); every product accumulates in fp32. Only fp16/bf16 (fp32 keeps cuBLAS's composite).

Two kernels, one per regime, both chosen by the inference path:
  few rows (<= DECODE_ROWS, a compiled decode step): thin column blocks of W streamed through plain loads, t from
      the same tiles of x in the K loop (R <= MAX_RANK);
  many rows (>= PREFILL_ROWS, a prefill, on a GPU with a TMA unit): persistent programs, one per SM, walk the
      output tiles with every tile of x, W (and A) moved by the TMA unit, at cuBLAS's speed without the term
      (benchmarks/persistent_gemm_gpu.py); wide layers take s t from one cuBLAS GEMM first, narrow ones compute t
      in the K loop (R <= PREFILL_RANK).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_RANK = 128  # the expand step holds (rows x R) and (out x R) tiles at once
DECODE_ROWS = 16  # up to this many rows, one kernel (at 64, x's tile read by every column block costs 2x)
PREFILL_ROWS = 512  # from this many rows, the persistent kernel where it pays (prefill_pays)
PREFILL_RANK = 64  # t's fp32 tile (128 x R) beside the output tile's must stay in registers
NARROW = 1024  # layers up to this many outputs compute t in the K loop: few column blocks recompute it


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
    specialize: bool = False  # the persistent kernel's warps split into loading and computing ones


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile (row block, column block)."""
    return _tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)


@triton.jit
def _tile_of(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Output tile number pid as (row block, column block): GROUP_M row blocks take each column block in turn, so
    the W tiles they share are still in L2."""
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
    _gemm_tile(
        pid_m, pid_n, x_ptr, w_ptr, a_ptr, t_ptr, b_ptr, bias_ptr, y_ptr, M, N, K, R, scale,
        stride_xm, stride_wn, stride_am, stride_tm, stride_bn, stride_ym,
        HAS_BIAS, HAS_LORA, SHRINK, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R,
    )  # fmt: skip


@triton.jit
def _gemm_tile(
    pid_m, pid_n, x_ptr, w_ptr, a_ptr, t_ptr, b_ptr, bias_ptr, y_ptr,
    M, N, K, R, scale,
    stride_xm, stride_wn, stride_am, stride_tm, stride_bn, stride_ym,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, SHRINK: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """One output tile of y = x W^T + s t B^T + b."""
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
def _lora_gemm_group_kernel(
    x_ptr, M, K, stride_xm,
    w0, a0, b0, c0, y0, n0, r0, s0, sw0, sa0, sb0, sy0,
    w1, a1, b1, c1, y1, n1, r1, s1, sw1, sa1, sb1, sy1,
    w2, a2, b2, c2, y2, n2, r2, s2, sw2, sa2, sb2, sy2,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Up to three projections of the same few rows x (q, k and v; gate and up) in one launch: the programs of
    all of them at once keep the card's memory busier than each projection's own launch (k and v alone have 32
    column blocks). Program p is column block p of part 0, then of part 1, then of part 2 (n2 = 0: two parts).
    One tile body for all parts, its operands selected per program: a body per part would triple the kernel's
    pipeline buffers and leave fewer programs on each SM. A part without bias points its bias at a zero row
    (lora_gemm_group)."""
    pid = tl.program_id(0)
    end0 = tl.cdiv(n0, BLOCK_N)
    end1 = end0 + tl.cdiv(n1, BLOCK_N)
    p1 = pid >= end0
    p2 = pid >= end1
    _gemm_tile(
        0, pid - tl.where(p2, end1, tl.where(p1, end0, 0)), x_ptr,
        tl.where(p2, w2, tl.where(p1, w1, w0)), tl.where(p2, a2, tl.where(p1, a1, a0)),
        tl.where(p2, a2, tl.where(p1, a1, a0)), tl.where(p2, b2, tl.where(p1, b1, b0)),
        tl.where(p2, c2, tl.where(p1, c1, c0)), tl.where(p2, y2, tl.where(p1, y1, y0)),
        M, tl.where(p2, n2, tl.where(p1, n1, n0)), K, tl.where(p2, r2, tl.where(p1, r1, r0)),
        tl.where(p2, s2, tl.where(p1, s1, s0)), stride_xm,
        tl.where(p2, sw2, tl.where(p1, sw1, sw0)), tl.where(p2, sa2, tl.where(p1, sa1, sa0)),
        tl.where(p2, sa2, tl.where(p1, sa1, sa0)), tl.where(p2, sb2, tl.where(p1, sb1, sb0)),
        tl.where(p2, sy2, tl.where(p1, sy1, sy0)),
        HAS_BIAS, True, True, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R,
    )  # fmt: skip


@triton.jit
def _persistent_kernel(
    x_desc, w_desc, a_desc, t_desc, b_ptr, bias_ptr, y_desc, M, N, K, R, scale, stride_bn,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, SHRINK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, PROGRAMS: tl.constexpr,
    SPECIALIZE: tl.constexpr,
):  # fmt: skip
    """The prefill kernel: PROGRAMS programs walk the output tiles in _tile's order; every tile of x, W and A is
    moved by the TMA unit (edges zero-filled, y's clipped). SHRINK: t = x A^T from the x tiles of the K loop, else
    s t read whole (made by cuBLAS). Without HAS_LORA: x W^T + b alone (the GEMM against cuBLAS, benchmarks)."""
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=SPECIALIZE, warp_specialize=SPECIALIZE):
        pid_m, pid_n = _tile_of(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        t_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k in range(tl.cdiv(K, BLOCK_K)):
            x = x_desc.load([off_m, k * BLOCK_K])
            acc = tl.dot(x, w_desc.load([off_n, k * BLOCK_K]).T, acc)
            if SHRINK:
                t_acc = tl.dot(x, a_desc.load([0, k * BLOCK_K]).T, t_acc)
        rn = off_n + tl.arange(0, BLOCK_N)
        if HAS_LORA:
            if SHRINK:  # noqa: SIM108 (constexpr branches)
                t = (t_acc * scale).to(y_desc.dtype)
            else:
                t = t_desc.load([off_m, 0])
            rr = tl.arange(0, BLOCK_R)
            b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :], mask=(rn[:, None] < N) & (rr[None, :] < R))
            acc = tl.dot(t, b.T, acc)  # s t B^T into the same tile: never written or read back
        if HAS_BIAS:
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
    tiles: Tiles | None = None, shrink: bool | None = None, wrapped: bool = False,
) -> Tensor:  # fmt: skip
    """x W^T + scale (x A^T) B^T + b for 2-D x (rows x in), W (out x in), A (R x in), B (out x R), as one kernel
    (few rows, or `shrink`) or a small GEMM and one kernel; A None: x W^T + b alone. `tiles` and `shrink` override
    the defaults (benchmarks); `wrapped` launches through torch.library.wrap_triton (the op's body)."""
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


def lora_gemm_group(
    x: Tensor, weights: list[Tensor], biases: list[Tensor | None], lora_as: list[Tensor], lora_bs: list[Tensor],
    scales: list[float], tiles: Tiles | None = None, wrapped: bool = False,
) -> list[Tensor]:  # fmt: skip
    """[x W_i^T + s_i (x A_i^T) B_i^T + b_i] for two or three projections of the same few rows x, one launch."""
    rows, n_in = x.shape
    parts = len(weights)
    if not 2 <= parts <= 3 or rows > DECODE_ROWS:
        raise ValueError(f"lora_gemm_group takes 2 or 3 projections of at most {DECODE_ROWS} rows")
    outs = [x.new_empty(rows, w.shape[0]) for w in weights]
    rank = max(a.shape[0] for a in lora_as)
    tiles = tiles or group_tiles(rows, sum(w.shape[0] for w in weights), rank)
    biased = any(b is not None for b in biases)
    stand_in = x  # the bias of parts without one: read by no program (no tensor passed twice where one is written:
    if biased:  # compiled, each argument written is cloned apart, and a second one would hide the write)
        stand_in = x.new_zeros(max(w.shape[0] for w in weights), dtype=next(b for b in biases if b is not None).dtype)
    args = []
    for i in range(3):
        j = min(i, parts - 1)  # a third part of none: part 1's operands, no columns, an output of its own
        w, a, b = weights[j], lora_as[j], lora_bs[j]
        y = outs[j] if i < parts else x.new_empty(1, 1)
        bias = biases[j] if biases[j] is not None and i < parts else stand_in
        args += [w, a, b, bias, y, w.shape[0] if i < parts else 0, a.shape[0], float(scales[j])]
        args += [w.stride(0), a.stride(0), b.stride(0), y.stride(0)]
    grid = (sum(triton.cdiv(w.shape[0], tiles.block_n) for w in weights),)
    _wrap(_lora_gemm_group_kernel, wrapped)[grid](
        x, rows, n_in, x.stride(0), *args, HAS_BIAS=biased, EVEN_K=n_in % tiles.block_k == 0,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        BLOCK_R=max(16, triton.next_power_of_2(rank)), num_stages=tiles.stages, num_warps=tiles.warps,
    )  # fmt: skip
    return outs


def group_tiles(rows: int, n_out: int, rank: int) -> Tiles:
    """lora_gemm_group's tiles for parts of n_out outputs together, from benchmarks/lora_gemm_group_gpu.py's sweep
    (H200): q, k, v (3072 outputs) 32 x 256, gate and up (16384) 64 x 128, four stages, two warps."""
    block_m, block_r = max(16, triton.next_power_of_2(rows)), max(16, triton.next_power_of_2(rank))
    block_n, block_k = (64, 128) if n_out >= 8192 else (32, 256)
    while (block_m + block_n + block_r) * block_k * 2 > 96 << 10 and block_k > 64:  # two stages must fit
        block_k //= 2
    return Tiles(block_m, block_n, block_k, _stages(block_m + block_n + block_r, block_k, 4), 2, 1)


def _lora_gemm_group_op(
    x: Tensor, weights: list[Tensor], biases: list[Tensor | None], lora_as: list[Tensor], lora_bs: list[Tensor],
    scales: list[float],
) -> list[Tensor]:  # fmt: skip
    return lora_gemm_group(x, weights, biases, lora_as, lora_bs, scales, wrapped=True)


lora_gemm_group_op = torch.library.triton_op("lorakit::lora_gemm_group", _lora_gemm_group_op, mutates_args=())


# -- many rows: the persistent kernel ---------------------------------------------------------------------------
def prefill_ready(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor) -> bool:
    """What the persistent kernel takes, as far as a traced (fake) tensor tells: fusable's inputs on a GPU with a TMA
    unit, R <= PREFILL_RANK, and rows of x, W, A and y whose strides are multiples of 16 bytes (the TMA unit's rule;
    the addresses themselves are checked as the kernel is launched)."""
    return (
        fusable(x, weight, lora_a, lora_b)
        and lora_a.shape[0] <= PREFILL_RANK
        and weight.shape[0] % 8 == 0
        and (bias is None or (bias.dtype == x.dtype and bias.stride(0) == 1))
        and all(_rows_aligned(t) for t in (x, weight, lora_a))
        and _has_tma(x.device)
    )


def _rows_aligned(t: Tensor) -> bool:
    return t.stride(0) * t.element_size() % 16 == 0


def _addressable(t: Tensor) -> bool:
    """A 2-D operand the TMA unit can move: unit inner stride, row stride and address multiples of 16 bytes."""
    return t.stride(-1) == 1 and t.stride(0) * t.element_size() % 16 == 0 and t.data_ptr() % 16 == 0


_TMA: dict[torch.device, bool] = {}


@torch.compiler.assume_constant_result  # asked while tracing: a constant of the graph, not a break in it
def _has_tma(device: torch.device) -> bool:
    if device not in _TMA:
        _TMA[device] = torch.cuda.get_device_capability(device)[0] >= 9
    return _TMA[device]


_SMS: dict[torch.device, int] = {}


@torch.compiler.assume_constant_result
def _programs(device: torch.device) -> int:
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


def prefill_pays(rows: int, n_out: int, rank: int, device: torch.device) -> bool:
    """Enough output tiles for the persistent kernel: at least half the SMs' worth (below that its programs leave
    the card half idle, where cuBLAS splits K or takes smaller tiles: benchmarks/persistent_gemm_gpu.py --rows)."""
    tiles = prefill_tiles(n_out, rank)[0]
    count = triton.cdiv(rows, tiles.block_m) * triton.cdiv(n_out, tiles.block_n)
    return rows >= PREFILL_ROWS and 2 * count >= _programs(device)


def prefill_tiles(n_out: int, rank: int) -> tuple[Tiles, bool]:
    """(tiles, t in the K loop) for the persistent kernel on a Hopper-class GPU, from the sweep of
    benchmarks/persistent_gemm_gpu.py. Narrow layers: small tiles (enough of them for the SMs) and t from the x
    tiles of the K loop, which only a few column blocks repeat; wide layers: 128 x 256 tiles, warp specialized,
    s t by one cuBLAS GEMM first (t in the loop of such tiles cost a fifth more). Stages: as deep as shared memory
    holds, with the t and B tiles."""
    block_r = max(16, triton.next_power_of_2(rank))
    if n_out <= NARROW:
        bm, bn, bk, most, warps, specialize, shrink = 64, 128, 64, 4, 4, False, True
    else:
        bm, bn, bk, most, warps, specialize, shrink = 128, 256, 64, 3, 8, True, False
    pipeline, fixed = (bm + bn) * bk * 2, (bm * bn + (bm + bn) * block_r) * 2  # bytes: a stage; y's and t/B's tiles
    stages = max(2, min(most, ((220 << 10) - fixed) // pipeline))
    return Tiles(bm, bn, bk, stages, warps, 8, specialize), shrink


def lora_gemm_prefill(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor | None, lora_b: Tensor | None, scale: float,
    tiles: Tiles | None = None, shrink: bool | None = None, t: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """x W^T + scale (x A^T) B^T + b by the persistent kernel (A None: x W^T + b; `t` given: x W^T + t B^T + b, t
    being s x A^T made already, a group's columns of one GEMM); operands the TMA unit cannot address (or output rows
    it cannot store) go through cuBLAS instead. `tiles` and `shrink` override prefill_tiles (benchmarks)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    has_lora = lora_a is not None or t is not None
    if weight.shape[0] % 8 or not all(_addressable(u) for u in (x, weight, lora_a) if u is not None):
        y = torch.mm(x, weight.T) if bias is None else torch.addmm(bias, x, weight.T)
        if t is not None:
            return y.addmm_(t, lora_b.T)
        return y.addmm_(torch.mm(x, lora_a.T), lora_b.T, alpha=scale) if has_lora else y
    rows, n_in = x.shape
    n_out = weight.shape[0]
    rank = t.shape[1] if t is not None else lora_a.shape[0] if has_lora else 1
    default_tiles, default_shrink = prefill_tiles(n_out, rank)
    tiles = tiles or default_tiles
    shrink = has_lora and t is None and (default_shrink if shrink is None else shrink)
    m, n, k, block_r = tiles.block_m, tiles.block_n, tiles.block_k, max(16, triton.next_power_of_2(rank))
    y = x.new_empty(rows, n_out)
    x_desc = TensorDescriptor.from_tensor(x, [m, k])
    a_desc = t_desc = x_desc  # stand-ins where the kernel reads none
    if shrink:
        a_desc = TensorDescriptor.from_tensor(lora_a, [block_r, k])
    elif has_lora:
        if t is None:
            t = torch.addmm(x.new_empty(rows, rank), x, lora_a.T, beta=0, alpha=scale)  # s t, rounded once
        if not _addressable(t):  # rows of t 16-byte aligned for the TMA unit (a rank not a multiple of 8)
            t = torch.nn.functional.pad(t, (0, -rank % 8)) if rank % 8 else t.contiguous()
        t_desc = TensorDescriptor.from_tensor(t, [m, block_r])
    grid = (min(_programs(x.device), triton.cdiv(rows, m) * triton.cdiv(n_out, n)),)
    _persistent_kernel[grid](
        x_desc, TensorDescriptor.from_tensor(weight, [n, k]), a_desc, t_desc, lora_b if has_lora else y,
        bias if bias is not None else y, TensorDescriptor.from_tensor(y, [m, n]), rows, n_out, n_in, rank,
        float(scale), lora_b.stride(0) if has_lora else 0, HAS_BIAS=bias is not None, HAS_LORA=has_lora,
        SHRINK=shrink, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, BLOCK_R=block_r, GROUP_M=tiles.group_m, PROGRAMS=grid[0],
        SPECIALIZE=tiles.specialize, num_stages=tiles.stages, num_warps=tiles.warps,
    )  # fmt: skip
    return y


# what compiled code calls: an opaque op (the TMA descriptors are made on the host as it runs, which inductor does
# not trace); a CUDA graph records the launch with the addresses of its replays
@torch.library.custom_op("lorakit::lora_gemm_prefill", mutates_args=())
def lora_gemm_prefill_op(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scale: float
) -> Tensor:
    return lora_gemm_prefill(x, weight, bias, lora_a, lora_b, scale)


@lora_gemm_prefill_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def lora_gemm_prefill_group(
    x: Tensor, weights: list[Tensor], biases: list[Tensor | None], stacked_a: Tensor, lora_bs: list[Tensor],
    scale: float,
) -> list[Tensor]:  # fmt: skip
    """[x W_i^T + s (x A_i^T) B_i^T + b_i] for projections of the same x whose A_i are stacked_a's rows in order:
    s x A^T for all of them from one cuBLAS GEMM, which reads x once where a shrink a projection read it again,
    then each projection's persistent kernel with its columns of it."""
    t = torch.addmm(x.new_empty(x.shape[0], stacked_a.shape[0]), x, stacked_a.T, beta=0, alpha=scale)
    outs, col = [], 0
    for weight, bias, lora_b in zip(weights, biases, lora_bs, strict=True):
        rank = lora_b.shape[1]
        outs.append(lora_gemm_prefill(x, weight, bias, None, lora_b, 1.0, t=t[:, col : col + rank]))
        col += rank
    return outs


@torch.library.custom_op("lorakit::lora_gemm_prefill_group", mutates_args=())
def lora_gemm_prefill_group_op(
    x: Tensor, weights: list[Tensor], biases: list[Tensor | None], stacked_a: Tensor, lora_bs: list[Tensor],
    scale: float,
) -> list[Tensor]:  # fmt: skip
    return lora_gemm_prefill_group(x, weights, biases, stacked_a, lora_bs, scale)


@lora_gemm_prefill_group_op.register_fake
def _(x, weights, biases, stacked_a, lora_bs, scale):
    return [x.new_empty(x.shape[0], w.shape[0]) for w in weights]
