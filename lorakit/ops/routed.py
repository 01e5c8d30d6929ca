"""add_routed_lora with batched matmuls: the same Semantics as reference.add_routed_lora, fewer, larger ops.

The reference loops over adapters (an index_select, two matmuls and an index_add each), so a batch routed to
64 adapters costs 64 x 4 small ops per layer. Here adapters of one rank and dtype form a group, split into
levels where each row has at most one adapter (a tree path puts a row under several), and each level is

    X[k] = the rows of adapter k, zero-padded to the longest      (K, L * tokens, in)
    Y[k] = (s_k * X[k] @ A_k^T) @ B_k^T                           two bmm over the stacked factors
    out[rows of k] += Y[k] (the padding dropped)

The stacked factors (K, r, in) and (K, out, r) are kept between calls while no gradient is recorded and no
factor has changed (torch's version counter), up to STACKS_MAX_BYTES, so serving pays the stacking once.
Dropout in training, single-adapter levels and levels whose padding would more than double many rows go through
the reference's loop (adding in place).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lorakit.ops import reference
from lorakit.ops.reference import LoraFactors

_STACKS: OrderedDict[tuple, tuple[list, object]] = OrderedDict()
_LAYOUTS: OrderedDict[tuple, tuple[list, object]] = OrderedDict()
_CACHE_MAX = 512  # entries each (one per layer and group); enough for every layer of a large model
_PADDING_FREE = 256  # padded positions a level may add regardless of the ratio
STACKS_MAX_BYTES = 512 * 2**20  # the stacked copies of factors kept between calls, least recently used dropped


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
    tokens = x[0].numel() // x.shape[-1] if x.dim() > 1 else 1  # positions per row
    summed = None  # out in the factors' dtype plus the terms so far; rounded once at the end
    for members in groups.values():
        for level in _disjoint_levels(members):
            if len(level) == 1 or not _balanced(level, tokens):
                looped.extend(level)
                continue
            summed = _batched(out if summed is None else summed, x, level, fresh=summed is None)
    if looped:
        summed = _looped(out if summed is None else summed, x, looped, training, fresh=summed is None)
    return out if summed is None else summed.to(out.dtype)


def _looped(acc: Tensor, x: Tensor, pairs: list[tuple[LoraFactors, Tensor]], training: bool, fresh: bool) -> Tensor:
    """The reference's loop, adding in place into a sum of our own instead of copying it once per adapter."""
    dtype = acc.dtype
    for a, _ in pairs:
        dtype = torch.promote_types(dtype, a.lora_A.dtype)
    acc = acc.to(dtype, copy=fresh)  # the caller's out is never changed in place
    for a, idx in pairs:
        h = x.index_select(0, idx).to(a.lora_A.dtype)
        h = F.dropout(h, a.dropout, training) if a.dropout else h
        acc.index_add_(0, idx, reference.linear_contribution(h, a.lora_A, a.lora_B, a.scale).to(dtype))
    return acc


def _disjoint_levels(members: list[tuple[LoraFactors, Tensor]]) -> list[list[tuple[LoraFactors, Tensor]]]:
    """Splits a group so that no row appears twice in one level (a tree path puts a row under several adapters)."""
    split = _memo(_LAYOUTS, ("levels",), [idx for _, idx in members], _level_numbers)
    levels: list[list] = [[] for _ in range(max(split) + 1)]
    for member, number in zip(members, split, strict=True):
        levels[number].append(member)
    return levels


def _level_numbers(rows: list[Tensor]) -> list[int]:
    """For each row set, the first level none of whose sets shares a row with it."""
    taken: list[set[int]] = []
    numbers = []
    for idx in rows:
        ids = set(idx.tolist())
        number = next((i for i, t in enumerate(taken) if not t & ids), len(taken))
        if number == len(taken):
            taken.append(set())
        taken[number] |= ids
        numbers.append(number)
    return numbers


def _batched(acc: Tensor, x: Tensor, level: list[tuple[LoraFactors, Tensor]], fresh: bool) -> Tensor:
    """acc plus one level's terms: the rows laid out per adapter in a (K, L, ...) block (zero-padded to the
    longest), two bmm with the stacked factors. fresh: acc is the caller's `out`, so it is not changed in place."""
    A_t, B_t, scale = _stacked([a for a, _ in level])  # (K, in, r), (K, r, out), (K,)
    sel, pos, longest, layout = _memo(_LAYOUTS, ("block",), [idx for _, idx in level], _block_layout)
    k = len(level)
    if layout == "all rows in order" and sel.numel() != acc.shape[0]:
        layout = "equal"  # in order, but not every row of the batch
    xs = x if layout == "all rows in order" else x.index_select(0, sel)
    if layout == "padded":
        xs = xs.new_zeros((k * longest, *xs.shape[1:])).index_copy_(0, pos, xs)
    h = torch.bmm(xs.to(A_t.dtype).reshape(k, -1, xs.shape[-1]), A_t)  # (K, L * tokens, r)
    y = torch.bmm(h * scale[:, None, None], B_t)  # (K, L * tokens, out)
    y = y.reshape(-1, *acc.shape[1:])
    y = y.index_select(0, pos) if layout == "padded" else y
    if fresh and acc.dtype != y.dtype:  # bf16 out, fp32 factors: the sum is kept in fp32, a tensor of our own
        acc, fresh = acc.to(y.dtype), False
    if layout == "all rows in order":
        return acc + y if fresh else acc.add_(y)
    return acc.index_add(0, sel, y) if fresh else acc.index_add_(0, sel, y)


def _block_layout(rows: list[Tensor]) -> tuple[Tensor, Tensor, int, str]:
    """The level's rows adapter by adapter (sel), where each sits in the padded block (pos), and whether the
    block needs padding, or is even the whole batch in order (rows already sorted by adapter)."""
    counts = [idx.numel() for idx in rows]
    longest = max(counts)
    sel = torch.cat(rows)
    pos = torch.cat([torch.arange(c, device=sel.device) + i * longest for i, c in enumerate(counts)])
    if min(counts) < longest:
        return sel, pos, longest, "padded"
    in_order = bool(torch.equal(sel, torch.arange(sel.numel(), device=sel.device)))
    return sel, pos, longest, "all rows in order" if in_order else "equal"


def _memo(cache: OrderedDict, tag: tuple, tensors: list[Tensor], build):
    """build(tensors), reused while the same tensor objects come back unchanged (every layer of one routed call
    passes the same row tensors); weak references, so a reused id() is never a hit."""
    key = (*tag, *((id(t), _version(t)) for t in tensors))
    hit = cache.get(key)
    if hit is not None and all(ref() is t for ref, t in zip(hit[0], tensors, strict=True)):
        cache.move_to_end(key)
        return hit[1]
    value = build(tensors)
    for stale in [k for k, v in cache.items() if any(ref() is None for ref in v[0])]:
        del cache[stale]  # its tensors are gone: so is what was built from them
    cache[key] = ([weakref.ref(t) for t in tensors], value)
    if len(cache) > _CACHE_MAX:
        cache.popitem(last=False)
    return value


def _balanced(level: list[tuple[LoraFactors, Tensor]], tokens: int) -> bool:
    """Padding every adapter's rows to the longest costs at most twice the real rows, or few positions in all
    (decoding steps: a padded position costs far less than a loop's extra ops)."""
    counts = [idx.numel() for _, idx in level]
    padded, real = len(level) * max(counts), sum(counts)
    return padded <= 2 * real or (padded - real) * tokens <= _PADDING_FREE


def _version(t: Tensor) -> int:
    """torch's in-place change counter; inference tensors have none (and rows are never changed in place)."""
    return -1 if t.is_inference() else t._version


def _stacked(adapters: list[LoraFactors]) -> tuple[Tensor, Tensor, Tensor]:
    """The factors stacked and transposed for bmm, (K, in, r) and (K, r, out), and the scales; reused while no
    gradient is taken and no factor changed."""
    tensors = [t for a in adapters for t in (a.lora_A, a.lora_B)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _stack(adapters)  # part of the autograd graph: built fresh every call
    return _memo(_STACKS, tuple(a.scale for a in adapters), tensors, lambda _: _stack_within_budget(adapters))


def _stack_within_budget(adapters: list[LoraFactors]) -> tuple[Tensor, Tensor, Tensor]:
    """_stack, after dropping the least recently used stacks that would exceed STACKS_MAX_BYTES (batches that keep
    mixing other subsets of adapters then re-stack, as without a cache, instead of growing memory)."""
    stacked = _stack(adapters)
    need = sum(t.nbytes for t in stacked)
    while _STACKS and need + sum(t.nbytes for _, value in _STACKS.values() for t in value) > STACKS_MAX_BYTES:
        _STACKS.popitem(last=False)
    return stacked


def _stack(adapters: list[LoraFactors]) -> tuple[Tensor, Tensor, Tensor]:
    A_t = torch.stack([a.lora_A.T for a in adapters])  # contiguous: bmm reads it faster than a transposed view
    B_t = torch.stack([a.lora_B.T for a in adapters])
    scale = torch.tensor([a.scale for a in adapters], dtype=A_t.dtype, device=A_t.device)
    return A_t, B_t, scale
