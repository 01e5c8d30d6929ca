"""add_routed_lora with batched matmuls: the same Semantics as reference.add_routed_lora, fewer, larger ops.

The reference loops over adapters (an index_select, two matmuls and an index_add each), so a batch routed to
64 adapters costs 64 x 4 small ops per layer. Here adapters of one rank and dtype form a group, split into
levels where each row has at most one adapter (a tree path puts a row under several), and each level is

    X[k] = the rows of adapter k, zero-padded to the longest      (K, L * tokens, in)
    Y[k] = s_k * X[k] @ A_k^T @ B_k^T                             two bmm over the stacked factors
    out[rows of k] += Y[k] (the padding dropped)

The stacked factors (K, r, in) and (K, out, r) are kept between calls while no gradient is recorded and no
factor has changed (torch's version counter), so serving pays the stacking once. Dropout in training,
single-adapter levels and levels whose padding would more than double the rows go through the reference loop.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor

from lorakit.ops import reference
from lorakit.ops.reference import LoraFactors

_STACKS: OrderedDict[tuple, tuple[list, Tensor, Tensor, Tensor]] = OrderedDict()
_STACKS_MAX = 512  # entries (one per layer and group); enough for every layer of a large model


def add_routed_lora(
    out: Tensor, x: Tensor, adapters: Sequence[LoraFactors], rows: Sequence[Tensor], training: bool
) -> Tensor:
    """Semantics: reference.add_routed_lora (the spec); adapters of equal rank and dtype run as one batched group."""
    pairs = [(a, idx) for a, idx in zip(adapters, rows, strict=True) if idx.numel()]
    looped = [(a, idx) for a, idx in pairs if a.dropout and training]
    groups: dict[tuple, list[tuple[LoraFactors, Tensor]]] = {}
    for a, idx in pairs:
        if not (a.dropout and training):
            groups.setdefault((a.lora_A.shape[0], a.lora_A.dtype), []).append((a, idx))
    acc = None
    for members in groups.values():
        for level in _disjoint_levels(members):
            if len(level) == 1 or not _balanced(level):
                looped.extend(level)
                continue
            acc = _batched(out, x, level, acc)
    summed = out if acc is None else out.to(acc.dtype) + acc  # rounded once, below or inside the reference
    if looped:
        summed = reference.add_routed_lora(summed, x, [a for a, _ in looped], [i for _, i in looped], training)
    return summed.to(out.dtype)


def _disjoint_levels(members: list[tuple[LoraFactors, Tensor]]) -> list[list[tuple[LoraFactors, Tensor]]]:
    """Splits a group so that no row appears twice in one level (a tree path puts a row under several adapters)."""
    levels: list[tuple[set[int], list]] = []
    for a, idx in members:
        ids = set(idx.tolist())
        for taken, level in levels:
            if not taken & ids:
                taken |= ids
                level.append((a, idx))
                break
        else:
            levels.append((ids, [(a, idx)]))
    return [level for _, level in levels]


def _batched(out: Tensor, x: Tensor, level: list[tuple[LoraFactors, Tensor]], acc: Tensor | None) -> Tensor:
    """One level: rows laid out per adapter in a zero-padded (K, L, ...) block, two bmm with the stacked factors."""
    A, B, scale = _stacked([a for a, _ in level])  # (K, r, in), (K, out, r), (K,)
    counts = [idx.numel() for _, idx in level]
    k, longest = len(level), max(counts)
    sel = torch.cat([idx for _, idx in level])  # the rows, adapter by adapter
    pos = torch.cat([torch.arange(c, device=sel.device) + i * longest for i, c in enumerate(counts)])
    xs = x.index_select(0, sel).to(A.dtype)
    padded = xs.new_zeros((k * longest, *xs.shape[1:])).index_copy_(0, pos, xs)
    h = torch.bmm(padded.reshape(k, -1, xs.shape[-1]), A.transpose(1, 2))  # (K, L * tokens, r)
    y = torch.bmm(h, B.transpose(1, 2)) * scale[:, None, None]  # (K, L * tokens, out)
    y = y.reshape(k * longest, *out.shape[1:]).index_select(0, pos)
    if acc is None:
        acc = out.new_zeros(out.shape, dtype=y.dtype)
    return acc.index_add(0, sel, y)


def _balanced(level: list[tuple[LoraFactors, Tensor]]) -> bool:
    """Padding every adapter's rows to the longest costs at most twice the real rows."""
    counts = [idx.numel() for _, idx in level]
    return len(level) * max(counts) <= 2 * sum(counts)


def _stacked(adapters: list[LoraFactors]) -> tuple[Tensor, Tensor, Tensor]:
    """torch.stack of the factors and scales; reused while no gradient is taken and no factor changed."""
    tensors = [t for a in adapters for t in (a.lora_A, a.lora_B)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _stack(adapters)  # part of the autograd graph: built fresh every call
    key = tuple((id(t), t._version) for t in tensors) + tuple(a.scale for a in adapters)
    hit = _STACKS.get(key)
    if hit is not None and all(ref() is t for ref, t in zip(hit[0], tensors, strict=True)):
        _STACKS.move_to_end(key)
        return hit[1:]
    stacked = _stack(adapters)
    for stale in [k for k, v in _STACKS.items() if any(ref() is None for ref in v[0])]:
        del _STACKS[stale]  # an adapter was deleted: its stacked copy goes too
    _STACKS[key] = ([weakref.ref(t) for t in tensors], *stacked)  # weak refs: a reused id() is not a hit
    if len(_STACKS) > _STACKS_MAX:
        _STACKS.popitem(last=False)
    return stacked


def _stack(adapters: list[LoraFactors]) -> tuple[Tensor, Tensor, Tensor]:
    A = torch.stack([a.lora_A for a in adapters])
    B = torch.stack([a.lora_B for a in adapters])
    scale = torch.tensor([a.scale for a in adapters], dtype=A.dtype, device=A.device)
    return A, B, scale
