"""DoRA's norm ||W + s B A|| per output feature without forming W + s B A (out x in) every forward.

For row w_i of W (out x in) and dW = s B A (B out x r, A r x in):
    ||w_i + s (BA)_i||^2 = ||w_i||^2 + 2 s rowsum(B * (W A^T))_i + s^2 rowsum((B (A A^T)) * B)_i
                                = ||w_i||^2 + 2 s rowsum(B * (W A^T + (s/2) B (A A^T)))_i
W A^T is one (out x r) product that reads W once; A A^T is (r x r); ||w_i||^2 is cached per frozen weight.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

_CHUNK = 1 << 22  # elements of W upcast at a time where W is stored narrower than the compute dtype


def low_rank_weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, transposed: bool) -> Tensor:
    """Semantics: weight_norm(weight, dW, out_axis=1 if transposed else 0) with dW = s B @ A (its transpose where
    the weight is stored (in x out)): ||W + dW|| per output feature, in the factors' dtype, with no gradient.

    Computed in closed form in float32 (float64 where any input is float64), under no autocast; clamped at 0
    before the square root, which only cancellation (dW close to -W) can reach.
    """
    compute = torch.float64 if torch.float64 in (weight.dtype, lora_A.dtype, lora_B.dtype) else torch.float32
    result = torch.promote_types(lora_A.dtype, lora_B.dtype)
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        lora_A, lora_B = lora_A.detach().to(compute), lora_B.detach().to(compute)
        weight_a = _weight_times_a(weight.detach(), lora_A, transposed)  # (out x r) = W A^T
        # 2 s rowsum(B * W A^T) + s^2 rowsum(B (A A^T) * B) = 2 s rowsum(B * (W A^T + (s/2) B (A A^T)))
        inner = torch.addmm(weight_a, lora_B, lora_A @ lora_A.T, alpha=scale / 2)
        squared = torch.linalg.vecdot(lora_B, inner).mul_(2 * scale).add_(_row_squares(weight, transposed, compute))
        return squared.clamp_min_(0).sqrt_().to(result)


def _chunks(weight: Tensor) -> Iterator[slice]:
    """Slices of the stored weight's first axis, each at most _CHUNK elements."""
    step = max(1, _CHUNK // max(1, weight[0].numel()))
    for start in range(0, weight.shape[0], step):
        yield slice(start, start + step)


def _weight_times_a(weight: Tensor, lora_A: Tensor, transposed: bool) -> Tensor:
    """W A^T (out x r) in A's dtype; W stored (in x out) where transposed. A narrower W is upcast chunk by chunk
    (or, for bf16 on CUDA, multiplied in bf16 into float32 with A split in two bf16 halves): exact to A's dtype."""
    compute = lora_A.dtype
    if weight.dtype == compute:
        return (lora_A @ weight).T if transposed else weight @ lora_A.T
    if weight.dtype == torch.bfloat16 and compute == torch.float32 and weight.is_cuda:  # mm's out_dtype: CUDA only
        return _split_bf16_product(weight, lora_A, transposed)
    if transposed:  # sum over chunks of the input axis: (r x rows) @ (rows x out)
        return _sum(lora_A[:, rows] @ weight[rows].to(compute) for rows in _chunks(weight)).T
    return _cat([weight[rows].to(compute) @ lora_A.T for rows in _chunks(weight)])


def _split_bf16_product(weight: Tensor, lora_A: Tensor, transposed: bool) -> Tensor:
    """A = hi + lo, both bf16 (16 significant bits of A together; bf16 products are exact in float32, which
    accumulates and is the output): W is read once, in bf16, for a product within ~1e-5 of the float32 one."""
    high = lora_A.to(torch.bfloat16)
    halves = torch.cat([high, (lora_A - high.float()).to(torch.bfloat16)])  # (2r x in)
    r = lora_A.shape[0]
    if transposed:
        product = torch.mm(halves, weight, out_dtype=torch.float32)  # (2r x out)
        return (product[:r] + product[r:]).T
    product = torch.mm(weight, halves.T, out_dtype=torch.float32)  # (out x 2r)
    return product[:, :r] + product[:, r:]


@dataclass
class _Squares:
    """||w_i||^2 of one weight as it was when computed: its version counter and storage tell a changed weight."""

    ref: weakref.ref
    storage: weakref.ref  # a dead storage's address may be reused; a weak reference to it cannot be
    version: int
    squares: Tensor


_CACHE: dict[tuple, _Squares] = {}


def _row_squares(weight: Tensor, transposed: bool, compute: torch.dtype) -> Tensor:
    """||w_i||^2 per output feature in `compute`, cached per frozen weight. A merge, copy_, load_state_dict or
    to() changes the weight's version counter or its storage and so recomputes; a re-dequantized weight is a new
    tensor; a weight that trains (its optimizer
    may write it without a version bump, fused SGD does) and torch.compile tracing are never cached. Writes through
    .data bypass the version counter: clear_norm_cache() after such a write."""
    if weight.requires_grad or torch.compiler.is_compiling():
        return _sum_of_squares(weight, transposed, compute)
    key, storage = (id(weight), transposed, compute), weight.untyped_storage()
    entry = _CACHE.get(key)
    if entry is not None and entry.ref() is weight and entry.storage() is storage and entry.version == weight._version:
        return entry.squares
    squares = _sum_of_squares(weight, transposed, compute)
    _CACHE[key] = _Squares(weakref.ref(weight, _forget(key)), weakref.ref(storage), weight._version, squares)
    return squares


def _forget(key: tuple):
    def drop(ref: weakref.ref) -> None:
        entry = _CACHE.get(key)
        if entry is not None and entry.ref is ref:  # not a newer weight that took the same id
            del _CACHE[key]

    return drop


def clear_norm_cache() -> None:
    """Forgets every cached ||W||^2 (needed only after writing a frozen weight through .data)."""
    _CACHE.clear()


def _sum_of_squares(weight: Tensor, transposed: bool, compute: torch.dtype) -> Tensor:
    weight = weight.detach()
    if transposed:  # (in x out): sum over the first axis, chunk by chunk
        return _sum(weight[rows].to(compute).square().sum(0) for rows in _chunks(weight))
    return _cat([weight[rows].to(compute).square().sum(1) for rows in _chunks(weight)])


def _sum(parts: Iterator[Tensor]) -> Tensor:
    total = next(parts)
    for part in parts:
        total = total.add_(part)
    return total


def _cat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)  # one chunk: no copy
