"""add_gathered_lora on CUDA: two kernels that read each row's adapters through the layer's table of addresses.

    shrink   part[c, t, p, :] = A_g[:, chunk c] x[t, chunk c]      g = slots[t, p]; grid (T, P, chunks of in)
    expand   out[t, cols]    += sum_p s_g * B_g[cols, :] sum_c part[c, t, p, :]          grid (T, column blocks)

A decode step has a few rows, each on its own adapter, so every factor is read once per row that uses it and the
step is bound by reading them: the shrink splits `in` into chunks for enough programs to read at the card's speed,
and the expand sums the chunks' partial products while it reads B. Each output element is one program's: added in
fp32 and rounded once, no atomics, whatever the number of adapters on a row. Both kernels take only tensors that
keep their addresses (the table, the slots, the layer's input and output), so a CUDA graph records and replays them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

TILE = 4096  # elements of a factor tile a program holds (rank x columns)


@triton.jit
def _address(raw, CODE: tl.constexpr, ALIGNED: tl.constexpr):
    """An address from the table as a pointer to the factors' dtype (ops.gathered.DTYPES order). An integer tells
    the compiler nothing of its alignment, so without ALIGNED (every address 16-byte aligned, GatherTable.aligned)
    each element is its own load; the hint must be given here, on the pointer (on the caller's copy it is lost)."""
    if CODE == 0:
        ptr = raw.to(tl.pointer_type(tl.bfloat16))
    elif CODE == 1:
        ptr = raw.to(tl.pointer_type(tl.float16))
    else:
        ptr = raw.to(tl.pointer_type(tl.float32))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _shrink_kernel(
    x_ptr, slots_ptr, entries_ptr, part_ptr, n_tokens, n_in, chunk,
    PATHS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, CODE: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    t, p, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    g = tl.load(slots_ptr + t * PATHS + p)
    if g >= 0:
        rank = tl.load(entries_ptr + 4 * g + 2).to(tl.int32)
        if rank > 0:
            a_ptr = _address(tl.load(entries_ptr + 4 * g), CODE, ALIGNED)
            ranks = tl.arange(0, BLOCK_R)
            acc = tl.zeros((BLOCK_R,), tl.float32)
            start = c * chunk
            stop = tl.minimum(start + chunk, n_in)
            for k0 in range(start, stop, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                inside = cols < stop
                x = tl.load(x_ptr + t.to(tl.int64) * n_in + cols, mask=inside, other=0.0).to(tl.float32)
                a = tl.load(
                    a_ptr + ranks[:, None] * n_in + cols[None, :],
                    mask=(ranks[:, None] < rank) & inside[None, :],
                    other=0.0,
                ).to(tl.float32)
                acc += tl.sum(a * x[None, :], axis=1)
            tl.store(part_ptr + ((c * n_tokens + t) * PATHS + p) * BLOCK_R + ranks, acc)


@triton.jit
def _expand_kernel(
    part_ptr, slots_ptr, entries_ptr, out_ptr, n_tokens, n_out,
    CHUNKS: tl.constexpr, PATHS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, CODE: tl.constexpr,
    ALIGNED: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = cols < n_out
    ranks = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for p in tl.static_range(PATHS):
        g = tl.load(slots_ptr + t * PATHS + p)
        if g >= 0:
            rank = tl.load(entries_ptr + 4 * g + 2).to(tl.int32)
            if ALIGNED:  # B's rows (rank wide) start 16-byte aligned too
                rank = tl.multiple_of(rank, 16 // (4 if CODE == 2 else 2))
            if rank > 0:
                b_ptr = _address(tl.load(entries_ptr + 4 * g + 1), CODE, ALIGNED)
                scale = tl.load(entries_ptr + 4 * g + 3).to(tl.float64, bitcast=True).to(tl.float32)
                s = tl.zeros((BLOCK_R,), tl.float32)
                for c in tl.static_range(CHUNKS):
                    s += tl.load(part_ptr + ((c * n_tokens + t) * PATHS + p) * BLOCK_R + ranks)
                b = tl.load(
                    b_ptr + cols[:, None].to(tl.int64) * rank + ranks[None, :],
                    mask=inside[:, None] & (ranks[None, :] < rank),
                    other=0.0,
                ).to(tl.float32)
                acc += tl.sum(b * (s * scale)[None, :], axis=1)
    row = out_ptr + t.to(tl.int64) * n_out + cols
    total = tl.load(row, mask=inside, other=0.0).to(tl.float32) + acc
    tl.store(row, total.to(out_ptr.dtype.element_ty), mask=inside)


def add_gathered_lora(out: Tensor, x: Tensor, slots: Tensor, table) -> Tensor:
    """ops.gathered.add_gathered_lora on CUDA: adds into `out` itself (the caller's own, contiguous)."""
    add_gathered_lora_(out, x.contiguous(), slots, table.entries, table.block_r, table.code, table.aligned)
    return out


@triton_op("lorakit::add_gathered_lora_", mutates_args={"out"})
def add_gathered_lora_(
    out: Tensor, x: Tensor, slots: Tensor, entries: Tensor, block_r: int, code: int, aligned: bool = False
) -> None:
    """out (T x out, contiguous) += the terms of ops.gathered.add_gathered_lora, in place."""
    launch(out, x, slots, entries, block_r, code, aligned)


def launch(
    out: Tensor, x: Tensor, slots: Tensor, entries: Tensor, block_r: int, code: int, aligned: bool = False,
    chunk_cols: int | None = None, shrink_warps: int | None = None, expand_cols: int = 256, expand_warps: int = 4,
) -> None:  # fmt: skip
    """The two kernels; the tiles as benchmarks/gathered_gpu.py found best on an H100 (its --sweep tries others).
    aligned: every factor address and row 16-byte aligned (vector loads); chunk_cols: columns of `in` per shrink
    program (more programs for few rows), expand_cols: outputs per expand program, both before fitting the
    rank-wide tile into TILE elements."""
    n_tokens, n_in = x.shape
    n_out, paths = out.shape[1], slots.shape[1]
    if chunk_cols is None or shrink_warps is None:  # 16-byte loads: longer chunks, more warps to keep them in flight
        chunk_cols, shrink_warps = (512, 8) if aligned else (128, 1)
    block_k = max(16, min(128, TILE // block_r))
    chunk = triton.cdiv(min(n_in, chunk_cols), block_k) * block_k
    chunks = triton.cdiv(n_in, chunk)
    part = torch.empty((chunks, n_tokens, paths, block_r), dtype=torch.float32, device=x.device)
    wrap_triton(_shrink_kernel)[(n_tokens, paths, chunks)](
        x, slots, entries, part, n_tokens, n_in, chunk,
        PATHS=paths, BLOCK_R=block_r, BLOCK_K=block_k, CODE=code, ALIGNED=aligned, num_warps=shrink_warps,
    )  # fmt: skip
    block_n = max(16, min(expand_cols, TILE // block_r))
    wrap_triton(_expand_kernel)[(n_tokens, triton.cdiv(n_out, block_n))](
        part, slots, entries, out, n_tokens, n_out,
        CHUNKS=chunks, PATHS=paths, BLOCK_R=block_r, BLOCK_N=block_n, CODE=code, ALIGNED=aligned,
        num_warps=expand_warps,
    )  # fmt: skip
