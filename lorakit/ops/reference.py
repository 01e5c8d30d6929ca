"""The LoRA arithmetic in plain PyTorch: the specification every faster kernel is tested against.

Notation (the paper's): W (out x in) is frozen, A (r x in), B (out x r), s = alpha / r.
    y = W x + s * B (A x)        the adapter's contribution is s * B(A(x))
    dW = s * B @ A               the delta weight, added to W when merging

lora_linear / add_lora / add_routed_lora are the op boundary of an adapted linear layer: GPU kernels
(lorakit/ops/triton) implement the same signatures and are tested against these.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def linear_contribution(x: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """Semantics: s * x @ A.T @ B.T; x (..., in) -> (..., out), through the r-wide bottleneck."""
    return F.linear(F.linear(x, lora_A), lora_B) * scale


def embedding_contribution(
    ids: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, padding_idx: int | None = None
) -> Tensor:
    """Semantics: s * B @ A[:, ids]; A (r x num_embeddings) is looked up like an embedding table."""
    hidden = F.embedding(ids, lora_A.T, padding_idx=padding_idx)  # (..., r)
    return F.linear(hidden, lora_B) * scale


def conv_contribution(
    x: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, conv: Callable[..., Tensor], groups: int = 1, **conv_args
) -> Tensor:
    """Semantics: s * conv(conv(x, A, base's stride/padding/dilation), B as a 1x1 conv in the base's groups)."""
    return conv(conv(x, lora_A, **conv_args), lora_B, groups=groups) * scale


def low_rank_delta(lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """Semantics: s * B @ A, any trailing kernel dims of A kept: (out x r) @ (r x in x k...) -> (out x in x k...)."""
    delta = lora_B.flatten(1) @ lora_A.flatten(1)
    return (delta * scale).reshape(lora_B.shape[0], *lora_A.shape[1:])


def weight_norm(weight: Tensor, delta: Tensor, out_axis: int = 0) -> Tensor:
    """Semantics: ||W + dW|| per output feature (every axis but out_axis reduced), in dW's dtype, with no gradient
    (DoRA treats the norm as a constant, paper 4.3)."""
    with torch.no_grad():
        combined = weight.detach().to(delta.dtype) + delta.detach()
        return torch.linalg.vector_norm(combined, dim=tuple(d for d in range(combined.dim()) if d != out_axis))


def dora_contribution(base: Tensor, lora: Tensor, ratio: Tensor) -> Tensor:
    """Semantics: (m/n - 1) * W x + lora: what DoRA adds to the base output, given W x (`base`, no bias), ratio =
    m / ||W + dW|| broadcast along the output axis and the LoRA term already rescaled, lora = (m/n) * s B(A(x))
    (DoRA folds m/n into B's rows, an (out x r) product, instead of a pass over the output).

    One fused pass (addcmul), in the promoted dtype of the three; backward keeps only `base` of the large tensors.
    """
    return torch.addcmul(lora, base, ratio - 1)


def vera_contribution(x: Tensor, lora_A: Tensor, lora_B: Tensor, lambda_d: Tensor, lambda_b: Tensor) -> Tensor:
    """Semantics: b * (B (d * (A x))); A (r x in) and B (out x r) are the frozen shared pair's slices, d (r,) and
    b (out,) the trained vectors. x (..., in) -> (..., out)."""
    hidden = lambda_d * F.linear(x, lora_A)  # (..., r)
    return lambda_b * F.linear(hidden, lora_B)


def rescaled_merge(weight: Tensor, scales: Sequence[Tensor | float], deltas: Sequence[Tensor]) -> Tensor:
    """Semantics: W + sum_i ((m_i - 1) * W + m_i * dW_i), in fp32 (fp64 stays fp64).

    m_i rescales the rows of W (DoRA's magnitude / norm, broadcast in W's layout); plain LoRA has m_i = 1,
    which leaves W + sum dW_i bit for bit.
    """
    acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    acc = weight.detach().to(acc_dtype)
    row_scale, shift = _row_scale_and_shift(scales, deltas, acc_dtype)
    return acc * row_scale + shift


def rescaled_unmerge(weight: Tensor, scales: Sequence[Tensor | float], deltas: Sequence[Tensor]) -> Tensor:
    """Semantics: the inverse of rescaled_merge for the same m_i and dW_i: (W' - sum m_i dW_i) / (1 + sum (m_i - 1))."""
    acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    row_scale, shift = _row_scale_and_shift(scales, deltas, acc_dtype)
    return (weight.detach().to(acc_dtype) - shift) / row_scale


def _row_scale_and_shift(scales, deltas, dtype) -> tuple[Tensor | float, Tensor | float]:
    row_scale, shift = 1.0, 0.0
    for scale, delta in zip(scales, deltas, strict=True):
        scale = scale.detach().to(dtype) if isinstance(scale, Tensor) else scale
        row_scale = row_scale + (scale - 1.0)
        shift = shift + scale * delta.detach().to(dtype)
    return row_scale, shift


@dataclass(frozen=True)
class LoraFactors:
    """One plain adapter on one linear layer, as the ops take it: A (r x in), B (out x r), s, dropout p."""

    lora_A: Tensor
    lora_B: Tensor
    scale: float
    dropout: float = 0.0


def lora_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, adapters: Sequence[LoraFactors], training: bool
) -> Tensor:
    """Semantics: y = x W^T + bias + sum_a s_a * B_a(A_a(dropout_a(x))), W (out x in).

    Each LoRA term is computed in its factors' dtype (x cast to it) and the terms are added to the base output in
    that dtype, which is then rounded once to x's dtype: a bf16 base with fp32 factors rounds once, as PEFT does.
    """
    out = F.linear(x, weight, bias)
    if not adapters:
        return out
    return add_lora(out, x, adapters, training)


def lora_linear_group(
    x: Tensor, parts: Sequence[tuple[Tensor, Tensor | None, LoraFactors]], training: bool,
    stacked_a: Tensor | None = None,
) -> list[Tensor]:  # fmt: skip
    """Semantics: [lora_linear(x, W_i, bias_i, [adapter_i], training) for each part]: projections that read the
    same input (q, k and v; gate and up), which a kernel may compute in one launch. stacked_a, where the caller
    holds the parts' A side by side: the same values as one (sum of ranks x in) tensor, which lets a kernel make
    every part's x A^T in one product; it changes no result."""
    return [lora_linear(x, weight, bias, [factors], training) for weight, bias, factors in parts]


def add_lora(out: Tensor, x: Tensor, adapters: Sequence[LoraFactors], training: bool) -> Tensor:
    """Semantics: out + sum_a s_a * B_a(A_a(dropout_a(x))), summed in the factors' dtype, rounded once to out's."""
    acc = None
    for a in adapters:
        h = F.dropout(x.to(a.lora_A.dtype), a.dropout, training) if a.dropout else x.to(a.lora_A.dtype)
        term = linear_contribution(h, a.lora_A, a.lora_B, a.scale)
        acc = term if acc is None else acc + term
    return (out.to(acc.dtype) + acc).to(out.dtype)


def add_routed_lora(
    out: Tensor, x: Tensor, adapters: Sequence[LoraFactors], rows: Sequence[Tensor], training: bool
) -> Tensor:
    """Semantics: out where, for every adapter k and every row index i in rows[k] (int64, along dim 0),
    out[i] += s_k * B_k(A_k(dropout_k(x[i]))), summed in the factors' dtype and rounded once to out's dtype.

    Ranks may differ between adapters (no padding); a row may be listed under several adapters (a tree path: their
    terms add up); rows listed under none keep the base output. Autograd gives each adapter only its rows' gradient.
    """
    acc = None
    for a, idx in zip(adapters, rows, strict=True):
        if idx.numel() == 0:
            continue
        h = x.index_select(0, idx).to(a.lora_A.dtype)
        h = F.dropout(h, a.dropout, training) if a.dropout else h
        term = linear_contribution(h, a.lora_A, a.lora_B, a.scale)
        if acc is None:
            acc = out.new_zeros(out.shape, dtype=term.dtype)
        acc = acc.index_add(0, idx, term)
    if acc is None:
        return out
    return (out.to(acc.dtype) + acc).to(out.dtype)


def add_gathered_lora(out: Tensor, x: Tensor, slots: Tensor, adapters: Sequence[LoraFactors | None]) -> Tensor:
    """Semantics: out (T x out) where, for every token row t and every g = slots[t, p] >= 0 (slots: T x P int,
    -1 for none), out[t] += s_g * B_g(A_g(x[t])) with adapters[g]'s factors (None: no term), summed in fp32 (or
    wider) and rounded once to out's dtype. The routed decode step's form: every row names its adapters (a tree
    path names several) by their number in the model."""
    acc = out.to(torch.promote_types(out.dtype, torch.float32))
    for g, a in enumerate(adapters):
        if a is None:
            continue
        dtype = torch.promote_types(a.lora_A.dtype, acc.dtype)
        term = linear_contribution(x.to(dtype), a.lora_A.to(dtype), a.lora_B.to(dtype), a.scale)
        count = (slots == g).sum(-1, keepdim=True)
        acc = acc + torch.where(count > 0, term * count.to(dtype), 0)  # other rows: nothing, not 0 * a NaN
    return acc.to(out.dtype)


def add_gathered_lora_group(
    x: Tensor, outs: Sequence[Tensor], slots: Tensor, parts: Sequence[Sequence[LoraFactors | None]]
) -> list[Tensor]:
    """Semantics: [add_gathered_lora(out_q, x, slots, parts[q])] for siblings over the same x (q, k and v): each
    output with its own adapters, by the same numbers in slots."""
    return [add_gathered_lora(out, x, slots, adapters) for out, adapters in zip(outs, parts, strict=True)]


def gathered_linear_group(
    x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None], slots: Tensor,
    parts: Sequence[Sequence[LoraFactors | None]],
) -> tuple[list[Tensor], list[Tensor]]:  # fmt: skip
    """Semantics: ([F.linear(x, W_q, b_q)], [the routed terms of part q in fp32 or wider]) for siblings over the
    same x, the terms as add_gathered_lora sums them before it rounds: (out_q + term_q) rounded to out_q's dtype is
    add_gathered_lora_group's output. Apart, so a GPU makes the terms while it makes the base products."""
    outs = [F.linear(x, w, b) for w, b in zip(weights, biases, strict=True)]
    wide = torch.promote_types(x.dtype, torch.float32)
    zeros = [x.new_zeros(x.shape[0], w.shape[0], dtype=wide) for w in weights]
    return outs, add_gathered_lora_group(x, zeros, slots, parts)
