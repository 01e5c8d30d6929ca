"""add_gathered_lora on CUDA: two kernels that read each row's adapters through the layer's table of addresses.

    shrink   part[c, q, t, p, :] = A_g[:, chunk c] x[t, chunk c]   g = slots[t, p] in table q; grid (T, P, chunks)
    expand   out_q[t, cols]   += sum_p s_g * B_g[cols, :] sum_c part[c, q, t, p, :]       grid (T, column blocks)

q is a part: siblings that take the same x (q, k and v; gate and up) run as one shrink and one expand over their
tables and outputs (add_gathered_lora_group), fewer launches and more programs each than a pair per projection.

A decode step has a few rows, each on its own adapter, so every factor is read once per row that uses it and the
step is bound by reading them: the shrink splits `in` into chunks for enough programs to read at the card's speed,
and the expand sums the chunks' partial products while it reads B. Each output element is one program's: added in
fp32 and rounded once, no atomics, whatever the number of adapters on a row. Both kernels take only tensors that
keep their addresses (the table, the slots, the layer's input and output), so a CUDA graph records and replays them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from lorakit.ops import gathered as portable

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
def _part_of(block, n0, n1, BLOCK_N: tl.constexpr):
    """Column block `block` of parts laid end to end (n0, n1, then the rest): (part, its own column block)."""
    end0 = tl.cdiv(n0, BLOCK_N)
    end1 = end0 + tl.cdiv(n1, BLOCK_N)
    q = tl.where(block >= end1, 2, tl.where(block >= end0, 1, 0))
    return q, block - tl.where(q == 2, end1, tl.where(q == 1, end0, 0))


@triton.jit
def _pick(q, v0, v1, v2):
    return tl.where(q == 2, v2, tl.where(q == 1, v1, v0))


@triton.jit
def _shrink_kernel(
    x_ptr, slots_ptr, e0, e1, e2, part_ptr, n_tokens, n_in, chunk, chunks,
    PARTS: tl.constexpr, PATHS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, CODE: tl.constexpr,
    ALIGNED: tl.constexpr,
):  # fmt: skip
    """Grid (T, P, chunks x parts): program (t, p, q chunks + c) reads chunk c of part q's A (siblings' tables
    e0, e1, e2 over the same x: one launch for q, k and v)."""
    t, p, qc = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q, c = qc // chunks, qc % chunks
    entries_ptr = _pick(q, e0, e1, e2)
    g = tl.load(slots_ptr + t * PATHS + p)
    if g >= 0:
        rank = tl.load(entries_ptr + 4 * g + 2).to(tl.int32)
        if rank > 0:
            a_ptr = _address(tl.load(entries_ptr + 4 * g), CODE, ALIGNED)
            ranks = tl.arange(0, BLOCK_R)
            acc = tl.zeros((BLOCK_R,), tl.float32)
            start = c * chunk
            for k0 in range(0, chunk, BLOCK_K):
                cols = start + k0 + tl.arange(0, BLOCK_K)
                inside = cols < n_in
                x = tl.load(x_ptr + t.to(tl.int64) * n_in + cols, mask=inside, other=0.0).to(tl.float32)
                a = tl.load(
                    a_ptr + ranks[:, None] * n_in + cols[None, :],
                    mask=(ranks[:, None] < rank) & inside[None, :],
                    other=0.0,
                ).to(tl.float32)
                acc += tl.sum(a * x[None, :], axis=1)
            tl.store(part_ptr + (((c * PARTS + q) * n_tokens + t) * PATHS + p) * BLOCK_R + ranks, acc)


@triton.jit
def _expand_kernel(
    part_ptr, slots_ptr, e0, e1, e2, y0, y1, y2, n0, n1, n2, n_tokens,
    CHUNKS: tl.constexpr, PARTS: tl.constexpr, PATHS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    CODE: tl.constexpr, ALIGNED: tl.constexpr, ADD: tl.constexpr = True,
):  # fmt: skip
    """Grid (T, column blocks of all parts end to end): out_q[t, cols] += the row's terms of part q (ADD False:
    out_q[t, cols] = the terms, out_q not read: the terms apart, made while the base product is)."""
    t = tl.program_id(0)
    q, block = _part_of(tl.program_id(1), n0, n1, BLOCK_N)
    entries_ptr, out_ptr, n_out = _pick(q, e0, e1, e2), _pick(q, y0, y1, y2), _pick(q, n0, n1, n2)
    cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
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
                    s += tl.load(part_ptr + (((c * PARTS + q) * n_tokens + t) * PATHS + p) * BLOCK_R + ranks)
                b = tl.load(
                    b_ptr + cols[:, None].to(tl.int64) * rank + ranks[None, :],
                    mask=inside[:, None] & (ranks[None, :] < rank),
                    other=0.0,
                ).to(tl.float32)
                acc += tl.sum(b * (s * scale)[None, :], axis=1)
    row = out_ptr + t.to(tl.int64) * n_out + cols
    if ADD:
        acc += tl.load(row, mask=inside, other=0.0).to(tl.float32)
    tl.store(row, acc.to(out_ptr.dtype.element_ty), mask=inside)


def add_gathered_lora(out: Tensor, x: Tensor, slots: Tensor, table) -> Tensor:
    """ops.gathered.add_gathered_lora on CUDA: adds into `out` itself (the caller's own, contiguous)."""
    entries = portable.entries_of(table)
    add_gathered_lora_(out, x.contiguous(), slots, entries, table.block_r, table.code, table.aligned)
    return out


@triton_op("lorakit::add_gathered_lora_", mutates_args={"out"})
def add_gathered_lora_(
    out: Tensor, x: Tensor, slots: Tensor, entries: Tensor, block_r: int, code: int, aligned: bool = False
) -> None:
    """out (T x out, contiguous) += the terms of ops.gathered.add_gathered_lora, in place."""
    launch(out, x, slots, entries, block_r, code, aligned)


def add_gathered_lora_group(x: Tensor, outs: list[Tensor], slots: Tensor, tables: list) -> list[Tensor]:
    """ops.gathered.add_gathered_lora_group on CUDA: adds into each of `outs` itself (tables of one dtype, as the
    layer's groups are made). The widest rank tile serves every part (each row's rank masks the rest), and 16-byte
    loads only where every table has them."""
    block_r, aligned = max(t.block_r for t in tables), all(t.aligned for t in tables)
    entries = _three([portable.entries_of(t) for t in tables])
    add_gathered_lora_group_(
        *_written(outs), x.contiguous(), slots, *entries, len(outs), block_r, tables[0].code, aligned
    )  # fmt: skip
    return outs


@triton_op("lorakit::add_gathered_lora_group_", mutates_args={"out0", "out1", "out2"})
def add_gathered_lora_group_(
    out0: Tensor, out1: Tensor, out2: Tensor, x: Tensor, slots: Tensor, e0: Tensor, e1: Tensor, e2: Tensor,
    parts: int, block_r: int, code: int, aligned: bool,
) -> None:  # fmt: skip
    """out_q += the terms of table e_q for q < parts (2 or 3), in place; a missing part's output is a stand-in."""
    launch_group([out0, out1, out2][:parts], x, slots, [e0, e1, e2][:parts], block_r, code, aligned)


def gathered_linear_group(
    x: Tensor, weights: list[Tensor], biases: list[Tensor | None], slots: Tensor, tables: list
) -> tuple[list[Tensor], list[Tensor]]:
    """ops.gathered_linear_group on CUDA (tables of one dtype, as the layer's groups are made)."""
    block_r, aligned = max(t.block_r for t in tables), all(t.aligned for t in tables)
    entries = [portable.entries_of(t) for t in tables]
    made = gathered_linear_group_(x.contiguous(), weights, biases, slots, entries, block_r, tables[0].code, aligned)
    return made[: len(weights)], made[len(weights) :]


@torch.library.custom_op("lorakit::gathered_linear_group", mutates_args=())
def gathered_linear_group_(
    x: Tensor, weights: list[Tensor], biases: list[Tensor | None], slots: Tensor, entries: list[Tensor],
    block_r: int, code: int, aligned: bool,
) -> list[Tensor]:  # fmt: skip
    """The base products, then the fp32 terms. Recorded into a CUDA graph, the terms are made on a stream of their
    own beside the base products' GEMVs, so the graph's two branches run at once: the shrink and expand of a
    decode step are short launches that each wait on the last, and alone leave most of the card's memory idle
    (benchmarks/gathered_group_gpu.py: a decode-64 layer's projections 95 against 117 us). Eagerly one stream:
    the host calls that order two streams would cost more than the overlap gives."""
    main = torch.cuda.current_stream(x.device)
    part = partials_for(x, slots, len(entries), block_r, aligned)  # made on the stream that frees them
    terms = [x.new_empty(x.shape[0], w.shape[0], dtype=torch.float32) for w in weights]
    beside = portable.BESIDE and torch.cuda.is_current_stream_capturing()
    side = _side_stream(x.device) if beside else main
    if beside:
        side.wait_stream(main)
    with torch.cuda.stream(side):
        _, chunks = _shrink(x, slots, entries, block_r, code, aligned, part=part)
        _expand(terms, part, chunks, slots, entries, block_r, code, aligned, add=False)
    outs = [F.linear(x, w, b) for w, b in zip(weights, biases, strict=True)]
    if beside:
        main.wait_stream(side)
    return outs + terms


@gathered_linear_group_.register_fake
def _(x, weights, biases, slots, entries, block_r, code, aligned):
    rows = x.shape[0]
    return [x.new_empty(rows, w.shape[0]) for w in weights] + [
        x.new_empty(rows, w.shape[0], dtype=torch.float32) for w in weights
    ]


_SIDE: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _SIDE:
        _SIDE[device] = torch.cuda.Stream(device)
    return _SIDE[device]


def launch(
    out: Tensor, x: Tensor, slots: Tensor, entries: Tensor, block_r: int, code: int, aligned: bool = False,
    chunk_cols: int | None = None, shrink_warps: int | None = None, expand_cols: int = 256, expand_warps: int = 4,
) -> None:  # fmt: skip
    """The two kernels; the tiles as benchmarks/gathered_gpu.py found best on an H100 (its --sweep tries others).
    aligned: every factor address and row 16-byte aligned (vector loads); chunk_cols: columns of `in` per shrink
    program (more programs for few rows), expand_cols: outputs per expand program, both before fitting the
    rank-wide tile into TILE elements."""
    tiles = (chunk_cols, shrink_warps, expand_cols, expand_warps)
    launch_group([out], x, slots, [entries], block_r, code, aligned, *tiles)


def launch_group(
    outs: list[Tensor], x: Tensor, slots: Tensor, entries: list[Tensor], block_r: int, code: int,
    aligned: bool = False, chunk_cols: int | None = None, shrink_warps: int | None = None, expand_cols: int = 256,
    expand_warps: int = 4,
) -> None:  # fmt: skip
    """launch for one to three projections of the same x (siblings), each its own table and output: one shrink
    and one expand for all of them."""
    part, chunks = _shrink(x, slots, entries, block_r, code, aligned, chunk_cols, shrink_warps)
    _expand(outs, part, chunks, slots, entries, block_r, code, aligned, expand_cols, expand_warps)


def _expand(
    outs: list[Tensor], part: Tensor, chunks: int, slots: Tensor, entries: list[Tensor], block_r: int, code: int,
    aligned: bool, expand_cols: int = 256, expand_warps: int = 4, add: bool = True,
) -> None:  # fmt: skip
    """out_q += (add False: out_q =) the terms of every part from the shrink's partial products."""
    block_n = max(16, min(expand_cols, TILE // block_r))
    sizes = [o.shape[1] for o in outs]
    blocks = sum(triton.cdiv(n, block_n) for n in sizes)
    wrap_triton(_expand_kernel)[(part.shape[2], blocks)](
        part, slots, *_three(entries), *_written(outs), *_three(sizes, 0), part.shape[2],
        CHUNKS=chunks, PARTS=len(outs), PATHS=slots.shape[1], BLOCK_R=block_r, BLOCK_N=block_n, CODE=code,
        ALIGNED=aligned, ADD=add, num_warps=expand_warps,
    )  # fmt: skip


def _three(values: list, rest=None) -> list:
    """Three arguments from one to three parts: the missing ones repeat the last (read by no program), or `rest`."""
    return [*values, *[values[-1] if rest is None else rest] * (3 - len(values))]


def _written(outs: list[Tensor]) -> list[Tensor]:
    """Three outputs: a missing part's a tensor of its own (compiled, a tensor passed twice where one is written is
    cloned apart for each, and one of the writes is lost)."""
    return [*outs, *[outs[0].new_empty(1, 1) for _ in range(3 - len(outs))]]


def _shrink(
    x: Tensor, slots: Tensor, entries: list[Tensor], block_r: int, code: int, aligned: bool,
    chunk_cols: int | None = None, shrink_warps: int | None = None, part: Tensor | None = None,
) -> tuple[Tensor, int]:  # fmt: skip
    """part[c, q, t, p, :] = A_g[:, chunk c] x[t, chunk c] for every part q (table entries[q]); and the chunks.
    `part` (partials_for's) where the caller allocates it on another stream than the launch's."""
    n_tokens, n_in = x.shape
    chunk_cols, shrink_warps, block_k, chunk, chunks = _chunking(n_in, block_r, aligned, chunk_cols, shrink_warps)
    if part is None:
        part = partials_for(x, slots, len(entries), block_r, aligned, chunk_cols)
    paths = slots.shape[1]
    wrap_triton(_shrink_kernel)[(n_tokens, paths, chunks * len(entries))](
        x, slots, *_three(entries), part, n_tokens, n_in, chunk, chunks,
        PARTS=len(entries), PATHS=paths, BLOCK_R=block_r, BLOCK_K=block_k, CODE=code, ALIGNED=aligned,
        num_warps=shrink_warps,
    )  # fmt: skip
    return part, chunks


def partials_for(
    x: Tensor, slots: Tensor, parts: int, block_r: int, aligned: bool, chunk_cols: int | None = None
) -> Tensor:
    """The shrink's output buffer (chunks, parts, T, P, block_r) in fp32, uninitialised."""
    chunks = _chunking(x.shape[1], block_r, aligned, chunk_cols, None)[4]
    return torch.empty((chunks, parts, x.shape[0], slots.shape[1], block_r), dtype=torch.float32, device=x.device)


def _chunking(n_in: int, block_r: int, aligned: bool, chunk_cols: int | None, shrink_warps: int | None) -> tuple:
    """(chunk_cols, shrink_warps, block_k, chunk, chunks): 16-byte loads take longer chunks and more warps to keep
    them in flight."""
    chunk_cols = chunk_cols or (512 if aligned else 128)
    shrink_warps = shrink_warps or (8 if aligned else 1)
    block_k = max(16, min(128, TILE // block_r))
    chunk = triton.cdiv(min(n_in, chunk_cols), block_k) * block_k
    return chunk_cols, shrink_warps, block_k, chunk, triton.cdiv(n_in, chunk)
