"""add_routed_lora with batched matmuls: the same Semantics as reference.add_routed_lora, fewer, larger ops.

The reference loops over adapters (an index_select, two matmuls and an index_add each), so a batch routed to
64 adapters costs 64 x 4 small ops per layer. Here adapters of one rank and dtype form a group, split into
levels where each row has at most one adapter (a tree path puts a row under several), and each level is

    X[k] = the rows of adapter k, zero-padded to the longest      (K, L * tokens, in)
    Y[k] = (s_k * X[k] @ A_k^T) @ B_k^T                           two bmm over the stacked factors
    out[rows of k] += Y[k] (the padding dropped)

The stacked factors (K, r, in) and (K, out, r) are kept between calls while no gradient is recorded and no
factor has changed (torch's version counter), up to STACKS_MAX_BYTES, so serving pays the stacking once.
Dropout in training, single-adapter levels, levels whose padding would more than double many rows and the busiest
adapters of a level whose padding they alone cause go through the reference's loop (adding in place).
"""

from __future__ import annotations

import math
import operator
import weakref
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lorakit.ops import reference
from lorakit.ops.reference import LoraFactors


class Kept(OrderedDict):
    """What _memo keeps, least recently used first, with the bytes of the tensors the kept values hold counted as
    entries come and go (a budget check reads one number, not every entry). Each entry's bytes are noted as it comes
    in, so dropping one reads no module global: entries may go from a weakref callback, at interpreter exit too."""

    nbytes = 0

    def __init__(self) -> None:
        super().__init__()
        self._sizes: dict[tuple, int] = {}

    def __setitem__(self, key: tuple, entry: tuple[list, object]) -> None:
        size = _bytes(entry[1])
        self.nbytes += size - self._sizes.get(key, 0)
        super().__setitem__(key, entry)
        self._sizes[key] = size

    def __delitem__(self, key: tuple) -> None:
        super().__delitem__(key)
        self.nbytes -= self._sizes.pop(key)

    def popitem(self, last: bool = True) -> tuple:
        key, entry = super().popitem(last)
        self.nbytes -= self._sizes.pop(key)
        return key, entry


def _bytes(value: object) -> int:
    if isinstance(value, Tensor):
        return value.nbytes
    return sum(t.nbytes for t in value if isinstance(t, Tensor)) if isinstance(value, tuple) else 0


_STACKS = Kept()
_PLANS = Kept()
_CACHE_MAX = 4096  # entries each (stacks: one per layer and adapter subset; plans: one per routing and rank group)
_PADDING_FREE = 256  # padded positions a level may add regardless of the ratio
_PADDING_PER_LOOP = 64  # padded positions that cost about as much as one adapter's four ops in the loop (CPU)
STACKS_MAX_BYTES = 512 * 2**20  # the stacked copies of factors kept between calls, least recently used dropped


def add_routed_lora(
    out: Tensor, x: Tensor, adapters: Sequence[LoraFactors], rows: Sequence[Tensor], training: bool
) -> Tensor:
    """Semantics: reference.add_routed_lora (the spec); adapters of equal rank and dtype run as one batched group."""
    if torch.compiler.is_compiling():  # the plans and stacks kept below are found by tensor identity: not traceable
        return reference.add_routed_lora(out, x, adapters, rows, training)
    return BatchedRouted(out, x, adapters, rows, training)(out, x)


class BatchedRouted:
    """add_routed_lora with its adapters and rows bound: the plan (levels, block layouts, looped adapters) and each
    level's stacked factors are resolved once, so a later call on inputs shaped like (out, x) is the bmm pairs and
    the loop's ops alone. Kept by a routed layer between the decode steps of one routing when no gradient is
    recorded (with one, the stacks are part of the graph: built per call)."""

    def __init__(
        self, out: Tensor, x: Tensor, adapters: Sequence[LoraFactors], rows: Sequence[Tensor], training: bool
    ) -> None:
        tokens = math.prod(x.shape[1:-1]) if x.dim() > 1 else 1  # positions per row
        batched, looped = _plan(adapters, rows, training, x.shape[0], tokens)
        self.levels = []
        for members, layout in batched:
            level = [adapters[i] for i in members]
            self.levels.append((_stacked(level), layout, any(a.scale != 1 for a in level)))
        self.looped = [(adapters[i], rows[i], whole) for i, whole in looped]
        self.training = training

    def __call__(self, out: Tensor, x: Tensor) -> Tensor:
        summed = None  # out in the factors' dtype plus the terms so far; rounded once at the end
        for stacks, layout, scaled in self.levels:
            summed = _batched(out if summed is None else summed, x, stacks, layout, scaled, fresh=summed is None)
        if self.looped:
            summed = _looped(out if summed is None else summed, x, self.looped, self.training, fresh=summed is None)
        return out if summed is None else summed.to(out.dtype)


def _plan(
    adapters: Sequence[LoraFactors], rows: Sequence[Tensor], training: bool, n: int, tokens: int
) -> tuple[list[tuple[list[int], tuple]], list[tuple[int, bool]]]:
    """Which adapters (by position) run batched in which levels and block layouts, and which loop (with whether
    their rows are the whole batch in order). It depends only on the rows and each adapter's rank, dtype and
    dropout, so it is built once per routing and reused by every layer of every call that passes the same rows."""
    shapes = [(a.lora_A.shape[0], a.lora_A.dtype, a.dropout) for a in adapters]
    key = (training, n, tokens, *_stamps(rows), *shapes)
    return _memo(_PLANS, key, rows, lambda: _new_plan(adapters, rows, training, n, tokens))


def _new_plan(
    adapters: Sequence[LoraFactors], rows: Sequence[Tensor], training: bool, n: int, tokens: int
) -> tuple[list[tuple[list[int], tuple]], list[tuple[int, bool]]]:
    looped: list[int] = []  # dropout in training draws the reference's masks, adapter by adapter
    groups: dict[tuple, list[int]] = {}
    for i, (a, idx) in enumerate(zip(adapters, rows, strict=True)):
        if idx.numel() and a.dropout and training:
            looped.append(i)
        elif idx.numel():
            groups.setdefault((a.lora_A.shape[0], a.lora_A.dtype), []).append(i)
    batched = []
    for members in groups.values():
        for level in _disjoint_levels(members, rows):
            level, busiest = _without_busiest(level, rows, tokens)
            looped.extend(busiest)
            if len(level) == 1 or not _balanced([rows[i] for i in level], tokens):
                looped.extend(level)
            else:
                batched.append((level, _block_layout([rows[i] for i in level], n)))
    return batched, [(i, _is_whole_batch(rows[i], n)) for i in looped]


def _without_busiest(level: list[int], rows: Sequence[Tensor], tokens: int) -> tuple[list[int], list[int]]:
    """(the level, its busiest adapters): one adapter with many rows among quiet ones would pad every adapter to its
    count, so the busiest ones loop instead while that drops at least _PADDING_PER_LOOP padded positions each."""
    counts = sorted(((rows[i].numel(), i) for i in level), reverse=True)
    busiest = []
    while len(counts) > 1 and (len(counts) - 1) * (counts[0][0] - counts[1][0]) * tokens >= _PADDING_PER_LOOP:
        busiest.append(counts.pop(0)[1])
    return [i for i in level if i not in busiest], busiest


def _looped(
    acc: Tensor, x: Tensor, pairs: list[tuple[LoraFactors, Tensor, bool]], training: bool, fresh: bool
) -> Tensor:
    """The reference's loop, adding in place into a sum of our own instead of copying it once per adapter; rows
    that are the whole batch in order (one adapter for every row) skip the gather and the scatter."""
    dtype = acc.dtype
    for a, _, _ in pairs:
        dtype = torch.promote_types(dtype, a.lora_A.dtype)
    for a, idx, whole in pairs:
        h = (x if whole else x.index_select(0, idx)).to(a.lora_A.dtype)
        h = F.dropout(h, a.dropout, training) if a.dropout else h
        term = _contribution(h, a).to(dtype)
        if fresh:  # the caller's out is never changed in place
            acc, fresh = (acc.to(dtype) + term if whole else acc.to(dtype).index_add(0, idx, term)), False
        else:
            acc = acc.add_(term) if whole else acc.index_add_(0, idx, term)
    return acc


def _contribution(h: Tensor, a: LoraFactors) -> Tensor:
    """reference.linear_contribution, without the multiply when the scale is 1 (a server's slots, alpha = r)."""
    y = F.linear(F.linear(h, a.lora_A), a.lora_B)
    return y if a.scale == 1 else y * a.scale


def _disjoint_levels(members: list[int], rows: Sequence[Tensor]) -> list[list[int]]:
    """Splits a group so that no row appears twice in one level (a tree path puts a row under several adapters)."""
    taken: list[set[int]] = []
    levels: list[list[int]] = []
    for i in members:
        ids = set(rows[i].tolist())
        number = next((k for k, t in enumerate(taken) if not t & ids), len(taken))
        if number == len(taken):
            taken.append(set())
            levels.append([])
        taken[number] |= ids
        levels[number].append(i)
    return levels


def _batched(
    acc: Tensor, x: Tensor, stacks: tuple[Tensor, Tensor, Tensor], layout: tuple, scaled: bool, fresh: bool
) -> Tensor:
    """acc plus one level's terms: the rows laid out per adapter in a (K, L, ...) block (zero-padded to the
    longest), two bmm with the stacked factors (scaled: some scale is not 1). fresh: acc is the caller's `out`, so
    it is not changed in place."""
    A_t, B_t, scale = stacks  # (K, in, r), (K, r, out), (K,)
    sel, pos, longest, how = layout
    k = A_t.shape[0]
    xs = x if how == "all rows in order" else x.index_select(0, sel)
    if how == "padded":
        xs = xs.new_zeros((k * longest, *xs.shape[1:])).index_copy_(0, pos, xs)
    h = torch.bmm(xs.to(A_t.dtype).reshape(k, -1, xs.shape[-1]), A_t)  # (K, L * tokens, r)
    if scaled:
        h = h * scale[:, None, None]
    y = torch.bmm(h, B_t).reshape(-1, *acc.shape[1:])  # (K * L, ..., out)
    y = y.index_select(0, pos) if how == "padded" else y
    if fresh and acc.dtype != y.dtype:  # bf16 out, fp32 factors: the sum is kept in fp32, a tensor of our own
        acc, fresh = acc.to(y.dtype), False
    if how == "all rows in order":
        return acc + y if fresh else acc.add_(y)
    return acc.index_add(0, sel, y) if fresh else acc.index_add_(0, sel, y)


def _block_layout(rows: list[Tensor], n: int) -> tuple[Tensor, Tensor | None, int, str]:
    """The level's rows adapter by adapter (sel), where each sits in the padded block (pos), and whether the
    block needs padding, or is even the whole batch of n rows in order (rows already sorted by adapter)."""
    counts = [idx.numel() for idx in rows]
    longest = max(counts)
    sel = torch.cat(rows)
    if min(counts) < longest:
        pos = torch.cat([torch.arange(c, device=sel.device) + i * longest for i, c in enumerate(counts)])
        return sel, pos, longest, "padded"
    return sel, None, longest, "all rows in order" if _is_whole_batch(sel, n) else "equal"


def _is_whole_batch(idx: Tensor, n: int) -> bool:
    return idx.numel() == n and bool(torch.equal(idx, torch.arange(n, device=idx.device)))


def _memo(cache: Kept, key: tuple, tensors: Sequence[Tensor], build):
    """build(), reused while `key` (which names `tensors` by id and version) comes back with the same tensor objects
    (every layer of one routed call, and every call of a routing, passes the same row tensors); weak references,
    so a reused id() is never a hit."""
    hit = cache.get(key)
    if hit is not None and all(map(operator.is_, [ref() for ref in hit[0]], tensors)):
        cache.move_to_end(key)
        return hit[1]
    with torch.inference_mode(False), torch.no_grad():  # kept for later calls, which may record gradients
        value = build()
    forget = _forgetter(cache, key)
    cache[key] = ([weakref.ref(t, forget) for t in tensors], value)
    if len(cache) > _CACHE_MAX:
        _prune(cache)
    return value


def _forgetter(cache: Kept, key: tuple):
    """Drops `key`'s entry as soon as one of its tensors dies: what was built from a deleted adapter's factors or a
    forgotten routing's rows is never a hit again, so it is freed then, not once the cache fills up."""

    def forget(ref: weakref.ref) -> None:
        hit = cache.get(key)
        if hit is not None and ref in hit[0]:  # not a newer entry that took the same key
            del cache[key]

    return forget


def _prune(cache: Kept) -> None:
    """Drops the least recently used entries down to three quarters of _CACHE_MAX (entries whose tensors died are
    gone already): once per quarter of the cache filled, not at every miss."""
    while len(cache) > _CACHE_MAX * 3 // 4:
        cache.popitem(last=False)


def _balanced(rows: list[Tensor], tokens: int) -> bool:
    """Padding every adapter's rows to the longest costs at most twice the real rows, or few positions in all
    (decoding steps: a padded position costs far less than a loop's extra ops)."""
    counts = [idx.numel() for idx in rows]
    padded, real = len(rows) * max(counts), sum(counts)
    return padded <= 2 * real or (padded - real) * tokens <= _PADDING_FREE


def _stamps(tensors: list[Tensor]) -> list[tuple[int, int, int]]:
    """What tells each tensor's contents apart between calls: the object, its in-place change counter and its
    storage (model.to() swaps a parameter's storage under the same object and counter)."""
    try:
        return [(id(t), t._version, t.data_ptr()) for t in tensors]
    except RuntimeError:  # an inference tensor has no counter (and nothing changes it in place outside inference)
        return [(id(t), -1 if t.is_inference() else t._version, t.data_ptr()) for t in tensors]


def _stacked(adapters: list[LoraFactors]) -> tuple[Tensor, Tensor, Tensor]:
    """The factors stacked and transposed for bmm, (K, in, r) and (K, r, out), and the scales; reused while no
    gradient is taken and no factor changed."""
    tensors = [t for a in adapters for t in (a.lora_A, a.lora_B)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _stack(adapters)  # part of the autograd graph: built fresh every call
    key = (*[a.scale for a in adapters], *_stamps(tensors))
    return _memo(_STACKS, key, tensors, lambda: _stack_within_budget(adapters))


def _stack_within_budget(adapters: list[LoraFactors]) -> tuple[Tensor, Tensor, Tensor]:
    """_stack, after dropping the least recently used stacks that would exceed STACKS_MAX_BYTES (batches that keep
    mixing other subsets of adapters then re-stack, as without a cache, instead of growing memory)."""
    stacked = _stack(adapters)
    need = sum(t.nbytes for t in stacked)
    while _STACKS and need + _STACKS.nbytes > STACKS_MAX_BYTES:
        _STACKS.popitem(last=False)
    return stacked


def _stack(adapters: list[LoraFactors]) -> tuple[Tensor, Tensor, Tensor]:
    A_t = torch.stack([a.lora_A.T for a in adapters])  # contiguous: bmm reads it faster than a transposed view
    B_t = torch.stack([a.lora_B.T for a in adapters])
    scale = torch.tensor([a.scale for a in adapters], dtype=A_t.dtype, device=A_t.device)
    return A_t, B_t, scale
