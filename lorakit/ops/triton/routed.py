"""add_routed_lora on CUDA for inference: every adapter's rows in two launches, whatever the number of adapters.

    S[t]      = x[t] A_k^T            for every token t of a batch row routed to adapter k   (shrink, per segment)
    out'[t]  += s_k * S[t] B_k^T                                                            (expand)

Segments are the token rows of each adapter (rows[k] are batch rows; each holds x[0].numel() / in tokens); a
block of BLOCK_M tokens belongs to one adapter, so each block is one small matmul with that adapter's factors.
Factors of every rank sit back to back (A_all: R_total x in, B_all: out x R_total; no padding to the largest
rank). Where a row is listed under several adapters (a tree path) the expand adds atomically, so it sums all its
terms; else each output element belongs to one block, read, added to and written once.
Training (any gradient wanted), dropout in training mode and torch.compile tracing use the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from lorakit.ops import reference, routed, routed_dense
from lorakit.ops.reference import LoraFactors

BLOCK_M = 64
_META: dict[tuple, tuple[Tensor, Tensor, Tensor, int]] = {}  # segment layout -> device tables (shapes only)
_KEPT = routed.Kept()  # row lists joined


@triton.jit
def _tokens(blocks_ptr, meta_ptr, rows_ptr, tokens_per_row, BLOCK_M: tl.constexpr):
    """This block's adapter k, its positions p in k's segment, whether they exist, and their token rows."""
    b = tl.program_id(0)
    k = tl.load(blocks_ptr + 2 * b)
    p = tl.load(blocks_ptr + 2 * b + 1) + tl.arange(0, BLOCK_M)
    first_row, n_tokens = tl.load(meta_ptr + 4 * k), tl.load(meta_ptr + 4 * k + 1)
    valid = p < n_tokens
    batch_row = tl.load(rows_ptr + first_row + p // tokens_per_row, mask=valid, other=0)
    return k, p, valid, batch_row * tokens_per_row + p % tokens_per_row, first_row * tokens_per_row


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, s_ptr, blocks_ptr, meta_ptr, rows_ptr, tokens_per_row, n_in,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    k, p, valid, token, segment = _tokens(blocks_ptr, meta_ptr, rows_ptr, tokens_per_row, BLOCK_M)
    first_rank, rank = tl.load(meta_ptr + 4 * k + 2), tl.load(meta_ptr + 4 * k + 3)
    ranks = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + token[:, None] * n_in + cols[None, :], mask=valid[:, None] & (cols[None, :] < n_in), other=0.0
        )
        a_t = tl.load(
            a_ptr + (first_rank + ranks[None, :]).to(tl.int64) * n_in + cols[:, None],
            mask=(ranks[None, :] < rank) & (cols[:, None] < n_in),
            other=0.0,
        )
        acc = tl.dot(x, a_t, acc, input_precision=PRECISION)
    tl.store(s_ptr + (segment + p[:, None]) * BLOCK_R + ranks[None, :], acc, mask=valid[:, None])


@triton.jit
def _expand_kernel(
    s_ptr, b_ptr, scales_ptr, out_ptr, blocks_ptr, meta_ptr, rows_ptr, tokens_per_row, n_out, r_total,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, ATOMIC: tl.constexpr,
):  # fmt: skip
    k, p, valid, token, segment = _tokens(blocks_ptr, meta_ptr, rows_ptr, tokens_per_row, BLOCK_M)
    first_rank, rank = tl.load(meta_ptr + 4 * k + 2), tl.load(meta_ptr + 4 * k + 3)
    ranks = tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    s = tl.load(s_ptr + (segment + p[:, None]) * BLOCK_R + ranks[None, :], mask=valid[:, None], other=0.0)
    b_t = tl.load(
        b_ptr + cols[None, :].to(tl.int64) * r_total + first_rank + ranks[:, None],
        mask=(ranks[:, None] < rank) & (cols[None, :] < n_out),
        other=0.0,
    )  # (BLOCK_R x BLOCK_N)
    term = tl.dot(s.to(b_t.dtype), b_t, input_precision=PRECISION) * tl.load(scales_ptr + k)
    out = out_ptr + token[:, None] * n_out + cols[None, :]
    inside = valid[:, None] & (cols[None, :] < n_out)
    if ATOMIC:  # some row is under several adapters, whose blocks may add to it at once
        tl.atomic_add(out, term.to(out_ptr.dtype.element_ty), mask=inside, sem="relaxed")
    else:  # each element is this block's alone: a plain read and write, rounded once
        total = tl.load(out, mask=inside, other=0.0).to(tl.float32) + term
        tl.store(out, total.to(out_ptr.dtype.element_ty), mask=inside)


def add_routed_lora(
    out: Tensor,
    x: Tensor,
    adapters: Sequence[LoraFactors],
    rows: Sequence[Tensor],
    training: bool,
    in_place: bool = False,
) -> Tensor:
    """reference.add_routed_lora's semantics; the kernels for inference (see the module docstring). A decode step's
    few rows go through routed_dense's three cuBLAS ops instead: two triton launches cost the host more. in_place:
    the kernels add into `out` itself, whose old values the caller no longer needs, instead of a copy of it (a
    prefill's outputs are tens of MB a layer)."""
    if routed_dense.fits(out, x, adapters, rows, training):
        return routed_dense.add_routed_lora_dense(out, x, adapters, rows, training)
    if not _routable(out, x, adapters, rows, training):
        return reference.add_routed_lora(out, x, adapters, rows, training)
    return KernelRouted(out, x, adapters, rows, in_place)(out, x)


def prepare_routed_lora(
    out: Tensor, x: Tensor, adapters: Sequence[LoraFactors], rows: Sequence[Tensor], training: bool, in_place: bool
) -> KernelRouted | None:
    """The kernels with these adapters and rows bound (see KernelRouted), or None where add_routed_lora would not
    run them."""
    if routed_dense.fits(out, x, adapters, rows, training) or not _routable(out, x, adapters, rows, training):
        return None
    return KernelRouted(out, x, adapters, rows, in_place)


class KernelRouted:
    """The two kernels of add_routed_lora with their adapters and rows bound: the layout tables, the factors side by
    side and the joined row lists are found once, so each later call on inputs shaped like (out, x) is the two
    launches (64 adapters' checks and lookups cost the host more than the kernels' work in every layer)."""

    def __init__(
        self, out: Tensor, x: Tensor, adapters: Sequence[LoraFactors], rows: Sequence[Tensor], in_place: bool
    ) -> None:
        self.n_in, self.n_out, self.in_place = x.shape[-1], out.shape[-1], in_place
        self.tokens_per_row = x[0].numel() // self.n_in
        self.blocks, self.meta, self.scales, self.n_blocks = _layout(adapters, rows, self.tokens_per_row, x.device)
        self.a_all, self.b_all, _ = routed_dense.side_by_side(adapters, x.dtype)
        self.rows_cat, self.atomic = routed._memo(_KEPT, ("joined", *routed._stamps(rows)), rows, lambda: _joined(rows))
        self.block_r = max(16, triton.next_power_of_2(max(a.lora_A.shape[0] for a in adapters)))
        self.routed_tokens = sum(r.numel() for r in rows) * self.tokens_per_row
        self.precision = "ieee" if x.dtype == torch.float32 else "tf32"

    def __call__(self, out: Tensor, x: Tensor) -> Tensor:
        tokens, n_in, n_out = x.shape[0] * self.tokens_per_row, self.n_in, self.n_out
        x2 = x.reshape(tokens, n_in).contiguous()
        result = out.reshape(tokens, n_out)
        if not (self.in_place and out.is_contiguous()):
            result = result.clone()
        s = torch.empty((self.routed_tokens, self.block_r), dtype=torch.float32, device=x.device)
        _shrink_kernel[(self.n_blocks,)](
            x2, self.a_all, s, self.blocks, self.meta, self.rows_cat, self.tokens_per_row, n_in,
            BLOCK_M=BLOCK_M, BLOCK_K=64, BLOCK_R=self.block_r, PRECISION=self.precision, num_warps=4,
        )  # fmt: skip
        _expand_kernel[(self.n_blocks, triton.cdiv(n_out, 128))](
            s, self.b_all, self.scales, result, self.blocks, self.meta, self.rows_cat, self.tokens_per_row, n_out,
            self.b_all.shape[1], BLOCK_M=BLOCK_M, BLOCK_N=128, BLOCK_R=self.block_r, PRECISION=self.precision,
            ATOMIC=self.atomic, num_warps=4,
        )  # fmt: skip
        return result.reshape(out.shape)


def _joined(rows: Sequence[Tensor]) -> tuple[Tensor, bool]:
    """The row lists back to back, and whether a row is listed twice (a tree path), so that the expand must add
    atomically: found once per routing (a device sync), which every layer then shares."""
    joined = torch.cat(list(rows))
    return joined, joined.unique().numel() != joined.numel()


def _routable(out: Tensor, x: Tensor, adapters, rows, training: bool) -> bool:
    if torch.compiler.is_compiling() or x.dim() < 2 or not adapters or all(r.numel() == 0 for r in rows):
        return False
    factors = [t for a in adapters for t in (a.lora_A, a.lora_B)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, out, *factors)):
        return False
    if training and any(a.dropout > 0 for a in adapters):
        return False
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    return (
        x.dtype in dtypes and out.dtype in dtypes and out.shape[0] == x.shape[0]
        and all(a.lora_A.dim() == 2 and a.lora_A.shape[1] == x.shape[-1] for a in adapters)
        and all(a.lora_B.dim() == 2 and a.lora_B.shape[0] == out.shape[-1] for a in adapters)
    )  # fmt: skip


def _layout(adapters, rows, tokens_per_row: int, device) -> tuple[Tensor, Tensor, Tensor, int]:
    """Device tables for the kernels, cached by shapes alone (no device sync, no copy per layer):
    blocks (n_blocks x 2: adapter, first position), meta (G x 4: first row in rows_cat, tokens, first rank, rank),
    scales (G)."""
    counts = tuple(r.numel() for r in rows)
    ranks = tuple(a.lora_A.shape[0] for a in adapters)
    scales = tuple(float(a.scale) for a in adapters)
    key = (counts, ranks, scales, tokens_per_row, str(device))
    if key not in _META:
        if len(_META) > 512:  # many batch shapes seen (serving): start over rather than grow without bound
            _META.clear()
        blocks, meta, first_row, first_rank = [], [], 0, 0
        for k, (count, rank) in enumerate(zip(counts, ranks, strict=True)):
            n_tokens = count * tokens_per_row
            blocks += [(k, start) for start in range(0, n_tokens, BLOCK_M)]
            meta.append((first_row, n_tokens, first_rank, rank))
            first_row, first_rank = first_row + count, first_rank + rank
        _META[key] = (
            torch.tensor(blocks, dtype=torch.int32, device=device),
            torch.tensor(meta, dtype=torch.int32, device=device),
            torch.tensor(scales, dtype=torch.float32, device=device),
            len(blocks),
        )
    return _META[key]
