"""The op boundary: layers and variants call these names; the backend is chosen here, and only here.

Every op has a plain-PyTorch reference in reference.py (its "Semantics:" docstring is the spec). On CUDA, when
triton is importable and LORAKIT_KERNELS is not "0", the ops that have a kernel in lorakit/ops/triton use it;
everything else, and every CPU tensor, runs the reference.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor

from lorakit.ops import gathered, reference, routed, routed_dense
from lorakit.ops.lora_fa import frozen_a_linear_contribution
from lorakit.ops.low_rank_norm import low_rank_weight_norm
from lorakit.ops.reference import (
    LoraFactors,
    conv_contribution,
    dora_contribution,
    embedding_contribution,
    linear_contribution,
    low_rank_delta,
    rescaled_merge,
    rescaled_unmerge,
    vera_contribution,
    weight_norm,
)

_KERNELS: dict[str, Callable] | None = None  # op name -> kernel, filled on first CUDA call


def _kernels() -> dict[str, Callable]:
    global _KERNELS
    if _KERNELS is None:
        try:
            from lorakit.ops.triton import KERNELS
        except ImportError:  # no triton (CPU-only installs): the reference everywhere
            KERNELS = {}
        _KERNELS = dict(KERNELS)
    return _KERNELS


def backend(x: Tensor) -> str:
    """'triton' for CUDA tensors when kernels are available and allowed, else 'reference'."""
    if x.is_cuda and os.environ.get("LORAKIT_KERNELS", "1") != "0" and _kernels():
        return "triton"
    return "reference"


def _dispatch(name: str, portable: Callable | None = None) -> Callable:
    """The op `name`: its kernel where one is registered and allowed, else `portable` (same Semantics, plain
    torch; default the reference itself)."""
    ref = getattr(reference, name)
    fallback = portable or ref

    def op(out_or_x: Tensor, *args, **kwargs):
        impl = _kernels().get(name, fallback) if backend(out_or_x) == "triton" else fallback
        return impl(out_or_x, *args, **kwargs)

    op.__name__, op.__doc__ = name, ref.__doc__
    return op


lora_linear = _dispatch("lora_linear")
lora_linear_group = _dispatch("lora_linear_group")
add_lora = _dispatch("add_lora")

add_routed_lora = _dispatch("add_routed_lora", routed.add_routed_lora)  # batched by rank off-kernel
add_gathered_lora = _dispatch("add_gathered_lora", gathered.add_gathered_lora)  # the kernel adds into out itself
add_gathered_lora_group = _dispatch("add_gathered_lora_group", gathered.add_gathered_lora_group)  # x first
gathered_linear_group = _dispatch("gathered_linear_group", gathered.gathered_linear_group)  # x first
gather_table = gathered.gather_table


def add_spanned_lora(
    out: Tensor, x: Tensor, adapters: Sequence[LoraFactors], spans: Sequence[tuple[int, int]], training: bool
) -> Tensor:
    """add_routed_lora where adapter k's rows are the range spans[k] = (start, stop) of dim 0 and no two ranges
    overlap: out and x are split at the ranges' ends (one split each, whose backward is one concatenation, where a
    slice per range would zero-fill a gradient of the whole tensor apiece), each range goes through add_lora (the
    fused op with its own backward where kernels run), and the pieces are joined once; ranges of one length over
    every row, of adapters alike, run as one batch (_batched_spans). Training adapters in parallel routes each job's
    rows so; through add_routed_lora a gather, a scatter and their backward cost a copy apiece."""
    order = sorted((k for k, (start, stop) in enumerate(spans) if stop > start), key=lambda k: spans[k][0])
    if len(order) == 1 and tuple(spans[order[0]]) == (0, out.shape[0]):
        return add_lora(out, x, [adapters[order[0]]], training)
    if not order:
        return out
    ordered = [adapters[k] for k in order]
    dtype = _batch_dtype(out, x, ordered, [spans[k] for k in order], training)
    if dtype is not None:
        return _batched_spans(out, x, ordered, dtype)
    sizes, owner, at = [], [], 0  # the pieces of dim 0 in order, and the adapter of each (None: the base's rows)
    for k in order:
        start, stop = spans[k]
        if start > at:
            sizes.append(start - at)
            owner.append(None)
        sizes.append(stop - start)
        owner.append(adapters[k])
        at = stop
    if at < out.shape[0]:
        sizes.append(out.shape[0] - at)
        owner.append(None)
    pieces = zip(out.split(sizes), x.split(sizes), owner, strict=True)
    return torch.cat([o if a is None else add_lora(o, xs, [a], training) for o, xs, a in pieces])


def _batch_dtype(
    out: Tensor, x: Tensor, adapters: list[LoraFactors], spans: list[tuple[int, int]], training: bool
) -> torch.dtype | None:
    """The dtype the ranges compute in as one batch, or None where they do not stack: ranges of one length covering
    every row (sorted and apart, so back to back), adapters of one shape and dtype, no dropout drawn. The factors'
    dtype where out is in it (the reference's math: x cast to it; a routed layer sums fp32 factors' terms in fp32),
    else x's where add_lora computes in x's dtype too: under autocast, or on the kernels' backend."""
    length = spans[0][1] - spans[0][0]
    if length * len(spans) != out.shape[0] or any(b - a != length for a, b in spans):
        return None
    if training and any(a.dropout for a in adapters):
        return None
    a0 = adapters[0]
    dtypes = {t.dtype for a in adapters for t in (a.lora_A, a.lora_B)}
    if len(dtypes) != 1 or any(
        a.lora_A.shape != a0.lora_A.shape or a.lora_B.shape != a0.lora_B.shape for a in adapters
    ):
        return None
    if out.dtype in dtypes:
        return out.dtype
    if out.dtype == x.dtype and (torch.is_autocast_enabled(x.device.type) or backend(x) == "triton"):
        return x.dtype
    return None


def _batched_spans(out: Tensor, x: Tensor, adapters: list[LoraFactors], dtype: torch.dtype) -> Tensor:
    """Every range at once: out[k] + s_k (x[k] A_k^T) B_k^T for the K equal ranges as two batched matmuls over the
    stacked factors (stacked per call, so each factor gets its own gradient), in `dtype`: a few ops a layer however
    many jobs, where a range apiece cost six matmuls and their launches, forward and backward, in every layer."""
    k = len(adapters)
    xs, base = x.reshape(k, -1, x.shape[-1]).to(dtype), out.reshape(k, -1, out.shape[-1])
    lora_a = torch.stack([a.lora_A for a in adapters]).to(dtype)  # (K, r, in)
    scales = {float(a.scale) for a in adapters}
    if len(scales) == 1:  # s B rounded once into `dtype`
        lora_b = (torch.stack([a.lora_B for a in adapters]) * scales.pop()).to(dtype)  # (K, out, r)
    else:
        lora_b = torch.stack([a.lora_B * a.scale for a in adapters]).to(dtype)
    s = torch.bmm(xs, lora_a.transpose(1, 2))
    return torch.baddbmm(base, s, lora_b.transpose(1, 2)).reshape(out.shape)


def prepare_routed_lora(
    out: Tensor,
    x: Tensor,
    adapters: Sequence[LoraFactors],
    rows: Sequence[Tensor],
    training: bool,
    like: Callable[[Tensor, Tensor], Tensor] | None = None,
    owned: bool = False,
    spans: Sequence[tuple[int, int]] | None = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """add_routed_lora with `adapters`, `rows` and `training` bound, for repeated calls on inputs shaped like
    (out, x) while the factors stay as they are (the caller checks). With no gradient to record, what the call needs
    is built here once: on CUDA for a decode step's few rows routed_dense's factors side by side and row mask (three
    ops a call), else the batched path's plan and stacks. `like`: an op prepared for the same adapters and other
    rows, whose factors side by side are reused. `owned`: the calls' `out` is the caller's own, which the kernels may
    add into instead of copying it. `spans`: the rows as ranges, where they are (Routing.spans_for), which a call
    that records gradients takes through add_spanned_lora."""
    if spans is not None and torch.is_grad_enabled():
        return partial(add_spanned_lora, adapters=adapters, spans=spans, training=training)
    if torch.is_grad_enabled() or torch.compiler.is_compiling():  # stacks in the graph, or traced: built per call
        return partial(add_routed_lora, adapters=adapters, rows=rows, training=training)
    if x.device.type in routed_dense.DEVICES and routed_dense.fits(out, x, adapters, rows, training):
        dense = like if isinstance(like, routed_dense.DenseRouted) else routed_dense.DenseRouted(out, x, adapters, rows)
        if dense.finite:
            return dense.with_rows(x, adapters, rows) if dense is like else dense
    if backend(x) == "reference":
        return routed.BatchedRouted(out, x, adapters, rows, training)
    prepared = _kernels()["prepare_routed_lora"](out, x, adapters, rows, training, in_place=owned)
    if prepared is not None:
        return prepared
    return partial(add_routed_lora, adapters=adapters, rows=rows, training=training)


__all__ = [
    "LoraFactors",
    "add_gathered_lora",
    "add_gathered_lora_group",
    "gathered_linear_group",
    "add_lora",
    "add_routed_lora",
    "add_spanned_lora",
    "backend",
    "conv_contribution",
    "dora_contribution",
    "embedding_contribution",
    "frozen_a_linear_contribution",
    "gather_table",
    "linear_contribution",
    "lora_linear",
    "low_rank_delta",
    "low_rank_weight_norm",
    "prepare_routed_lora",
    "rescaled_merge",
    "rescaled_unmerge",
    "vera_contribution",
    "weight_norm",
]
