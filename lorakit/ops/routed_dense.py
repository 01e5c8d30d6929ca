"""add_routed_lora on CUDA for few token rows (decode steps): every row through every adapter at once, three ops.

    S    = x [A_1; ...; A_K]^T  ⊙  M        (T x R, R = sum of ranks; M[t, k's columns] = s_k if t's row is
                                                routed to k, else 0: a tree path keeps several blocks, which add up)
    out' = out + S [B_1 ... B_K]^T          (one addmm; the caller's out is not changed)

A decode step has a few token rows per layer, so the K-fold extra products are nothing next to the per-adapter
work of the gather-and-scatter paths: on a GPU the step is bound by the host, and this is three cuBLAS launches per
layer whatever the number of adapters (an H100's 64-adapter decode step: 127.8 ms with the triton segment kernels,
79.7 ms with this). On a CPU the batched path of ops/routed.py stays faster: there the extra products are real
work. The concatenated factors and M are kept between calls (by tensor identity and version, as ops/routed.py keeps
its stacks), so a serving layer builds them once per adapter set and per routing.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor

from lorakit.ops import routed
from lorakit.ops.reference import LoraFactors

DEVICES = ("cuda",)  # where prepared routed layers use it; on a CPU the extra products cost more than they save
DENSE_MAX = 2**16  # token rows x summed ranks up to which the dense form is used: a 64-row step over 64 rank-16
_FACTORS = routed.Kept()  # adapters side by side, per dtype
_MASKS = routed.Kept()  # per routing (its row tensors), ranks and scales


def fits(out: Tensor, x: Tensor, adapters: Sequence[LoraFactors], rows: Sequence[Tensor], training: bool) -> bool:
    """Whether add_routed_lora_dense applies: no gradient to record, no dropout to draw, matrices only, few rows."""
    if torch.compiler.is_compiling() or x.dim() < 2 or not x.shape[0] or not adapters or out.shape[0] != x.shape[0]:
        return False
    if training and any(a.dropout > 0 for a in adapters):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or out.requires_grad or any(
        a.lora_A.requires_grad or a.lora_B.requires_grad for a in adapters
    )):  # fmt: skip
        return False
    n_in, n_out = x.shape[-1], out.shape[-1]
    if any(a.lora_A.dim() != 2 or a.lora_A.shape[1] != n_in or a.lora_B.shape != (n_out, a.lora_A.shape[0])
           for a in adapters):  # fmt: skip
        return False
    tokens = x.numel() // n_in
    return tokens * sum(a.lora_A.shape[0] for a in adapters) <= DENSE_MAX


def add_routed_lora_dense(
    out: Tensor, x: Tensor, adapters: Sequence[LoraFactors], rows: Sequence[Tensor], training: bool
) -> Tensor:
    """Semantics: reference.add_routed_lora (for inputs where `fits`), summed in the factors' dtype."""
    op = DenseRouted(out, x, adapters, rows)
    return op(out, x) if op.finite else routed.add_routed_lora(out, x, adapters, rows, training)


class DenseRouted:
    """add_routed_lora_dense with its adapters and rows bound: the factors side by side and the row mask are built
    once, so each later call on inputs shaped like (out, x) is the three ops alone. What a routed layer keeps between
    the decode steps of one routing (LoraLayer's routed plan)."""

    def __init__(self, out: Tensor, x: Tensor, adapters: Sequence[LoraFactors], rows: Sequence[Tensor]) -> None:
        dtypes = {t.dtype for a in adapters for t in (a.lora_A, a.lora_B)}
        dtype = dtypes.pop()
        for other in dtypes:  # mixed factor dtypes: the widest
            dtype = torch.promote_types(dtype, other)
        self.dtype, self.n_in, self.n_out = dtype, x.shape[-1], out.shape[-1]
        tokens_per_row = x[0].numel() // self.n_in
        a_all, b_all, self.finite = side_by_side(adapters, dtype)  # (R x in), (out x R)
        self.a_t, self.b_t = a_all.T, b_all.T
        self.mask = _mask(adapters, rows, x.shape[0], tokens_per_row, dtype, x.device)  # (T x R)

    def with_rows(self, x: Tensor, adapters: Sequence[LoraFactors], rows: Sequence[Tensor]) -> DenseRouted:
        """The same adapters' factors side by side (the caller knows them unchanged) for other rows of x."""
        other = copy.copy(self)
        tokens_per_row = x[0].numel() // self.n_in
        other.mask = _mask(adapters, rows, x.shape[0], tokens_per_row, self.dtype, x.device)
        return other

    def __call__(self, out: Tensor, x: Tensor) -> Tensor:
        # every layer of every decode step: no-op casts skipped in Python, each would be a dispatcher call
        dtype, x_rows, out_rows = self.dtype, x.reshape(-1, self.n_in), out.reshape(-1, self.n_out)
        s = torch.mm(x_rows if x.dtype == dtype else x_rows.to(dtype), self.a_t).mul_(self.mask)
        summed = torch.addmm(out_rows if out.dtype == dtype else out_rows.to(dtype), s, self.b_t)
        return (summed if summed.dtype == out.dtype else summed.to(out.dtype)).reshape(out.shape)


def side_by_side(adapters: Sequence[LoraFactors], dtype: torch.dtype) -> tuple[Tensor, Tensor, bool]:
    """A_all (R x in) and B_all (out x R) in `dtype`, and whether all of them is finite, kept while no factor changes
    (within routed.STACKS_MAX_BYTES, least recently used dropped): a decode step would otherwise copy every routed
    adapter's factors at every layer. Not finite: the dense form does not apply, as a NaN in one adapter's B times
    the zero mask of another adapter's rows would reach those rows."""
    tensors = [t for a in adapters for t in (a.lora_A, a.lora_B)]

    def build() -> tuple[Tensor, Tensor, bool]:
        if len(adapters) == 1:  # a prefill's one adapter: its own factors, no copy where the dtype is theirs already
            # (detached: the entry must not keep the factors themselves alive, or it would outlive a deleted adapter)
            a_all, b_all = adapters[0].lora_A.detach().to(dtype), adapters[0].lora_B.detach().to(dtype).contiguous()
        else:
            a_all = torch.cat([a.lora_A for a in adapters]).to(dtype)
            b_all = torch.cat([a.lora_B for a in adapters], dim=1).to(dtype).contiguous()
        while _FACTORS and _FACTORS.nbytes + a_all.nbytes + b_all.nbytes > routed.STACKS_MAX_BYTES:
            _FACTORS.popitem(last=False)
        return a_all, b_all, bool(torch.isfinite(a_all).all() & torch.isfinite(b_all).all())  # one sync a build

    return routed._memo(_FACTORS, (dtype, *routed._stamps(tensors)), tensors, build)


def _mask(adapters, rows: Sequence[Tensor], n: int, tokens_per_row: int, dtype, device) -> Tensor:
    """M (n * tokens_per_row x R): s_k on the columns of adapter k in the token rows of its batch rows, else 0."""
    shape = tuple((a.lora_A.shape[0], float(a.scale)) for a in adapters)
    key = (n, tokens_per_row, dtype, str(device), *shape, *routed._stamps(list(rows)))

    def build() -> Tensor:
        mask = torch.zeros(n, sum(r for r, _ in shape), dtype=dtype, device=device)
        first = 0
        for (rank, scale), idx in zip(shape, rows, strict=True):
            first += rank
            if not idx.numel():  # no rows (its index may even be an empty float tensor)
                continue
            idx = idx.to(device)  # a row listed twice under one adapter counts twice, as index_add does
            column = torch.zeros(n, dtype=dtype, device=device).index_add_(
                0, idx, torch.full(idx.shape, scale, dtype=dtype, device=device)
            )
            mask[:, first - rank : first] = column[:, None]
        return mask.repeat_interleave(tokens_per_row, dim=0) if tokens_per_row > 1 else mask

    return routed._memo(_MASKS, key, list(rows), build)
