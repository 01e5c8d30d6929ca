"""The adapted linear layer as one autograd node: the base product and every adapter's term, read once.

    forward   S  = [drop_a(x) A_a^T]_a            (N x R, R = sum of ranks; one GEMM for all adapters without dropout)
              y  = S Bs^T + b,  then y += x W^T    (cuBLAS adds into y in its epilogue: no extra pass over y)
              Bs = [s_a B_a]_a in x's dtype        (fp32 master factors stay fp32; only these small casts are made)
    saved     x (the base product needs it anyway), S, the dropout seeds; never drop(x), never a mask
    backward  T  = dY Bs;  dB_a = s_a dY^T S_a;  dA_a = T_a^T drop_a(x)
              dX = sum_a drop_a^T(T_a A_a)  (written once),  then dX += dY W  (epilogue again)
    inference (no gradient recorded, no dropout drawn): the same forward without the autograd node, s in a GEMM's
              epilogue for one adapter, the factors' casts / concatenations kept between calls until a factor
              changes: 3 launches per layer, the base GEMM's and two; fp16/bf16 take one of lora_gemm.py's kernels
              instead where it pays (_kernel_for): compiled, a decode step's few rows; a prefill's many rows on a
              GPU with a TMA unit, the term added inside the base GEMM's tiles

Everything runs in x's dtype (a bf16 base computes in bf16 even with fp32 factors: PEFT's default casts the
activations to fp32 instead); gradients come back in each factor's dtype. Dropout masks are redrawn from a seed
(dropout.py). Under autocast x must already be in autocast's dtype: autocast would then compute every product in
it too, casting the factors as this op does. Cases this does not cover (autocast of x to another dtype, a trainable
W or bias, dtypes other than fp16/bf16/fp32, mixed dtypes between x and W) go to the reference, which defines the
semantics.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

from lorakit.ops import reference
from lorakit.ops.reference import LoraFactors
from lorakit.ops.triton.dropout import draw_seeds, dropout_expand, dropout_grad_a, dropout_shrink

try:
    from lorakit.ops.triton import lora_gemm
except ImportError:  # no triton: the CPU runs the cuBLAS-shaped composite below
    lora_gemm = None

_FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def lora_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, adapters: Sequence[LoraFactors], training: bool
) -> Tensor:
    """reference.lora_linear's semantics, fused (see the module docstring)."""
    if not adapters or not _fusable(x, weight, bias, None, adapters):
        return reference.lora_linear(x, weight, bias, adapters, training)
    if _without_grad(x, None, adapters, training):
        return _inference(x, weight, bias, None, adapters)
    return _fused(x, weight, bias, None, adapters, training)


def lora_linear_group(
    x: Tensor, parts: Sequence[tuple[Tensor, Tensor | None, LoraFactors]], training: bool,
    stacked_a: Tensor | None = None,
) -> list[Tensor]:  # fmt: skip
    """reference.lora_linear_group's semantics: a compiled decode step's few rows through lora_gemm_group (one
    launch for all the parts); a prefill's many rows, where the parts' A are stacked_a's rows, through
    lora_gemm_prefill_group (x A^T for all the parts in one GEMM); else each part as lora_linear."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    weights, biases = [w for w, _, _ in parts], [b for _, b, _ in parts]
    factors = [f for _, _, f in parts]
    outs = None
    if _group_fusable(x2, parts, training):
        outs = lora_gemm.lora_gemm_group_op(
            x2, weights, biases, [f.lora_A for f in factors], [f.lora_B for f in factors], [f.scale for f in factors]
        )
    elif stacked_a is not None and _prefill_group_takes(x2, parts, stacked_a, training):
        run = (
            lora_gemm.lora_gemm_prefill_group_op if torch.compiler.is_compiling() else lora_gemm.lora_gemm_prefill_group
        )
        outs = run(x2, weights, biases, stacked_a, [f.lora_B for f in factors], factors[0].scale)
    if outs is None:
        return [lora_linear(x, weight, bias, [f], training) for weight, bias, f in parts]
    return outs if x.dim() == 2 else [y.reshape(*x.shape[:-1], y.shape[-1]) for y in outs]


def _prefill_group_takes(x2: Tensor, parts, stacked_a: Tensor, training: bool) -> bool:
    """Where each part alone would take the persistent kernel (_kernel_for's many rows), no gradient or dropout,
    one scale for all (it rides in the one GEMM), and stacked_a in x's dtype."""
    if lora_gemm is None or not x2.is_cuda or torch.is_grad_enabled() or _autocast_changes(x2):
        return False
    rows, compiling = x2.shape[0], torch.compiler.is_compiling()
    scales = {f.scale for _, _, f in parts}
    stacked = (sum(f.lora_A.shape[0] for _, _, f in parts), x2.shape[1])
    if len(scales) != 1 or stacked_a.dtype != x2.dtype or stacked_a.stride(-1) != 1 or stacked_a.shape != stacked:
        return False
    return all(
        not (training and f.dropout)
        and not weight.requires_grad
        and (compiling or rows * weight.numel() >= _EAGER_WORK)
        and lora_gemm.prefill_ready(x2, weight, bias, f.lora_A, f.lora_B)
        and lora_gemm.prefill_pays(rows, weight.shape[0], f.lora_A.shape[0], x2.device)
        for weight, bias, f in parts
    )


def _group_fusable(x2: Tensor, parts, training: bool) -> bool:
    """What lora_gemm_group takes: compiled, no gradient or dropout, few rows on CUDA, each part what lora_gemm
    takes, biases (where there are) of one dtype."""
    if lora_gemm is None or not torch.compiler.is_compiling() or not 2 <= len(parts) <= 3:
        return False
    if not x2.is_cuda or x2.shape[0] > lora_gemm.DECODE_ROWS or torch.is_grad_enabled() or _autocast_changes(x2):
        return False
    biases = {b.dtype for _, b, _ in parts if b is not None}
    return len(biases) <= 1 and all(
        not (training and f.dropout)
        and not weight.requires_grad
        and (bias is None or (bias.stride(0) == 1 and not bias.requires_grad))
        and lora_gemm.fusable(x2, weight, f.lora_A, f.lora_B)
        for weight, bias, f in parts
    )


def add_lora(out: Tensor, x: Tensor, adapters: Sequence[LoraFactors], training: bool) -> Tensor:
    """reference.add_lora's semantics: out + the adapters' terms, with the same saved tensors as lora_linear."""
    if not adapters or not _fusable(x, None, None, out, adapters):
        return reference.add_lora(out, x, adapters, training)
    if _without_grad(x, out, adapters, training):
        return _inference(x, None, None, out, adapters)
    return _fused(x, None, None, out, adapters, training)


def _fusable(x: Tensor, weight: Tensor | None, bias: Tensor | None, out: Tensor | None, adapters) -> bool:
    """The cases the module docstring names (asked by every adapted layer on every call: kept to plain tests)."""
    dtype = x.dtype
    if dtype not in _FAST_DTYPES or x.dim() < 2 or _autocast_changes(x):
        return False
    if weight is not None and (weight.requires_grad or weight.dtype != dtype or weight.dim() != 2):
        return False
    if (bias is not None and (bias.requires_grad or bias.dtype != dtype)) or (out is not None and out.dtype != dtype):
        return False
    n_in = x.shape[-1]
    return all(a.lora_A.dim() == 2 and a.lora_B.dim() == 2 and a.lora_A.shape[1] == n_in for a in adapters)


def _autocast_changes(x: Tensor) -> bool:
    """Autocast is on for x's device and would compute in another dtype than x's (the quick global test first:
    reading x's device costs more). A bf16 model under bf16 autocast, `lorakit train`'s default on a GPU, stays."""
    if not torch._C._is_any_autocast_enabled():
        return False
    device = x.device.type
    return torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != x.dtype


def _without_grad(x: Tensor, out: Tensor | None, adapters: Sequence[LoraFactors], training: bool) -> bool:
    """No gradient is recorded and no dropout mask drawn (inference): the forward needs no autograd node."""
    if training and any(a.dropout > 0 for a in adapters):
        return False
    if not torch.is_grad_enabled():
        return True
    if x.requires_grad or (out is not None and out.requires_grad):
        return False
    return not any(a.lora_A.requires_grad or a.lora_B.requires_grad for a in adapters)


def _inference(x: Tensor, weight: Tensor | None, bias: Tensor | None, out: Tensor | None, adapters) -> Tensor:
    """_FusedLora's forward without its node: S = x A^T, then y = s S B^T + b + x W^T (or out + s S B^T), two GEMMs
    beside the base's and nothing else: s rides in a GEMM's epilogue, the factors' casts are kept between calls."""
    lora_a, lora_b, scale = _prepared(x.dtype, adapters)  # (R x in), (out x R)
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    kernel = _kernel_for(x2, weight, bias, lora_a, lora_b)
    if kernel is not None:
        y = kernel(x2, weight, bias, lora_a, lora_b, scale)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])
    s = torch.mm(x2, lora_a.T)  # (N x R)
    if out is not None:
        y = torch.addmm(out if out.dim() == 2 else out.reshape(-1, out.shape[-1]), s, lora_b.T, alpha=scale)
    else:
        y = _eager_or_op(_low_rank_then_base, low_rank_then_base)(s, lora_b, x2, weight, bias, scale)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


def _kernel_for(x2: Tensor, weight: Tensor | None, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor):
    """One of lora_gemm's kernels (the LoRA term inside the base product) where it pays, else None (the composite).
    A compiled decode step's few rows: the two more kernels of the composite would be most of the step's extra
    time; eagerly the composite stays (a triton launch from Python costs the host more than two cuBLAS calls, and
    an eager decode step is bound by the host). A prefill's many rows on a GPU with a TMA unit: compiled, or eagerly
    where the GEMM outlasts the launch (the composite writes and reads back a term as large as y)."""
    if lora_gemm is None or weight is None or not x2.is_cuda:
        return None
    rows, compiling = x2.shape[0], torch.compiler.is_compiling()
    if rows <= lora_gemm.DECODE_ROWS:
        few = compiling and (bias is None or bias.stride(0) == 1) and lora_gemm.fusable(x2, weight, lora_a, lora_b)
        return lora_gemm.lora_gemm_op if few else None
    if not (compiling or rows * weight.numel() >= _EAGER_WORK) or not lora_gemm.prefill_ready(
        x2, weight, bias, lora_a, lora_b
    ):
        return None
    if not lora_gemm.prefill_pays(rows, weight.shape[0], lora_a.shape[0], x2.device):
        return None
    return lora_gemm.lora_gemm_prefill_op if compiling else lora_gemm.lora_gemm_prefill


_EAGER_WORK = 1 << 34  # rows x in x out from which an eager prefill takes the kernel: ~100 us of GEMM on an H100


# id(first factor) -> (stamp, weak refs to the factors, A, B); an entry goes when its first factor goes
_PREPARED: dict[int, tuple] = {}


def _prepared(dtype: torch.dtype, adapters: Sequence[LoraFactors]) -> tuple[Tensor, Tensor, float]:
    """(A, B, s) with y += s * (x A^T) B^T in `dtype`: one adapter's own factors and scale (the scale goes into a
    GEMM, so a factor already in `dtype` is used as is, never copied), or several adapters' [A_a] and [s_a B_a]
    concatenated with s = 1. Casts and concatenations are kept between calls while every factor is the same tensor
    with the same version counter (in-place changes: optimizer steps, copy_, hot swaps), storage and dtype
    (model.to) and scale: a serving step would otherwise make them again for every layer."""
    if len(adapters) == 1:
        a = adapters[0]
        if a.lora_A.dtype == dtype and a.lora_B.dtype == dtype:
            return a.lora_A, a.lora_B, a.scale
    if torch.compiler.is_compiling():  # nothing kept in a graph; the compiler fuses the casts
        return _made(adapters, dtype)
    factors = [t for a in adapters for t in (a.lora_A, a.lora_B)]
    try:
        stamp = (dtype, *[a.scale for a in adapters], *[(t._version, t.data_ptr(), t.dtype) for t in factors])
    except RuntimeError:  # an inference tensor has no version counter: made afresh, never served stale
        return _made(adapters, dtype)
    key = id(factors[0])
    kept = _PREPARED.get(key)
    if kept is None or kept[0] != stamp or not all(map(operator.is_, [ref() for ref in kept[1]], factors)):
        with torch.inference_mode(False), torch.no_grad():  # usable by later calls outside inference mode
            refs = [weakref.ref(factors[0], _forget(key)), *[weakref.ref(t) for t in factors[1:]]]
            kept = (stamp, refs, *_made(adapters, dtype))
        _PREPARED[key] = kept
    return kept[2], kept[3], kept[4]


def _made(adapters: Sequence[LoraFactors], dtype: torch.dtype) -> tuple[Tensor, Tensor, float]:
    """_prepared's tensors, made now: new tensors only (a kept one must not hold its factor alive)."""
    if len(adapters) == 1:
        a = adapters[0]
        return a.lora_A.to(dtype, copy=True), a.lora_B.to(dtype, copy=True), a.scale
    a_cat = torch.cat([a.lora_A.to(dtype) for a in adapters], 0)
    return a_cat, torch.cat([_scaled(a.lora_B, a.scale, dtype) for a in adapters], 1), 1.0


def _forget(key: int):
    """The callback that drops entry `key` when its first factor is freed (unless a newer entry took the key)."""

    def forget(ref: weakref.ref) -> None:
        kept = _PREPARED.get(key)
        if kept is not None and kept[1][0] is ref:
            del _PREPARED[key]

    return forget


def _scaled(b: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """s B in `dtype`, multiplied in the wider of B's dtype and `dtype`, so it is rounded once (no multiply when
    s = 1)."""
    if scale == 1:
        return b.to(dtype)
    return (b.to(torch.promote_types(b.dtype, dtype)) * scale).to(dtype)


def _fused(x, weight, bias, out, adapters: Sequence[LoraFactors], training: bool) -> Tensor:
    lead, n_in = x.shape[:-1], x.shape[-1]
    ps = tuple(float(a.dropout) if training and a.dropout > 0 else 0.0 for a in adapters)
    n_dropped = sum(p > 0 for p in ps)
    seeds = draw_seeds(n_dropped, x.device) if n_dropped else None
    base = None if out is None else out.reshape(-1, out.shape[-1])
    factors = [t for a in adapters for t in (a.lora_A, a.lora_B)]
    scales = tuple(float(a.scale) for a in adapters)
    y = _FusedLora.apply(x.reshape(-1, n_in), weight, bias, base, seeds, scales, ps, *factors)
    return y if x.dim() == 2 else y.reshape(*lead, y.shape[-1])


def _cat(tensors: list[Tensor], dim: int) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


class _FusedLora(torch.autograd.Function):
    """(x, W, b, base, seeds, scales, ps, A_0, B_0, A_1, B_1, ...) -> y; x, base, y are 2-D (N x features)."""

    @staticmethod
    def forward(ctx, x, weight, bias, base, seeds, scales, ps, *factors):
        plain = [i for i, p in enumerate(ps) if p == 0]
        dropped = [i for i, p in enumerate(ps) if p > 0]
        order = plain + dropped  # S's and Bs's columns: the adapters without dropout first, as one block
        a_plain = _cat([factors[2 * i].to(x.dtype) for i in plain], 0) if plain else None
        a_dropped = [factors[2 * i].to(x.dtype) for i in dropped]
        b_scaled = _cat([_scaled(factors[2 * i + 1], scales[i], x.dtype) for i in order], 1)  # (out x R)
        parts = [x @ a_plain.T] if plain else []
        for j, (i, a) in enumerate(zip(dropped, a_dropped, strict=True)):
            parts.append(dropout_shrink(x, a, seeds[j : j + 1], ps[i]))
        s = _cat(parts, 1)  # (N x R)
        if base is not None:
            y = torch.addmm(base, s, b_scaled.T)
        else:
            y = _eager_or_op(_low_rank_then_base, low_rank_then_base)(s, b_scaled, x, weight, bias)
        ctx.save_for_backward(x, weight, s, seeds, b_scaled, a_plain, *a_dropped)
        ctx.layout = (scales, ps, plain, dropped)
        # which inputs want a gradient; under torch.compile (where ctx.needs_input_grad and requires_grad read False
        # while tracing) all of them, and the compiler drops what nobody uses
        tracing = torch.compiler.is_compiling()
        wanted = (x.requires_grad, base is not None and base.requires_grad, *(f.requires_grad for f in factors))
        ctx.wanted = (True,) * len(wanted) if tracing else wanted
        ctx.factor_dtypes = [f.dtype for f in factors]
        ctx.ranks = [factors[2 * i].shape[0] for i in range(len(scales))]
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, s, seeds, b_scaled, a_plain, *a_dropped = ctx.saved_tensors
        scales, ps, plain, dropped = ctx.layout
        t = dy @ b_scaled  # (N x R): the gradient reaching S
        dx = None
        if ctx.wanted[0]:
            seed_list = [] if seeds is None else list(seeds.split(1))
            dx = _eager_or_op(_grad_input, grad_input)(
                dy, weight, t, a_plain, a_dropped, seed_list, [ps[i] for i in dropped]
            )
        factor_grads = _factor_grads(ctx, dy, x, s, t, a_plain, a_dropped, seeds)
        dbase = dy if ctx.wanted[1] else None
        return (dx, None, None, dbase, None, None, None, *factor_grads)


def _low_rank_then_base(
    s: Tensor, b_scaled: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, scale: float = 1.0
) -> Tensor:
    """scale * S Bs^T + b + x W^T: the large product accumulates into the small one's output (cuBLAS's beta
    epilogue), which also applies the scale when there is no bias (else the small GEMM's alpha does)."""
    if bias is None:
        return torch.mm(s, b_scaled.T).addmm_(x, weight.T, beta=scale)
    return torch.addmm(bias, s, b_scaled.T, alpha=scale).addmm_(x, weight.T)


def _grad_input(
    dy: Tensor, weight: Tensor | None, t: Tensor, a_plain: Tensor | None, a_dropped: list[Tensor],
    seeds: list[Tensor], ps: list[float],
) -> Tensor:  # fmt: skip
    """dX = T_plain A_plain + sum_a drop_a^T(T_a A_a) + dY W: the low-rank terms written once, dY W added by cuBLAS."""
    r_plain = 0 if a_plain is None else a_plain.shape[0]
    dx = t[:, :r_plain] @ a_plain if a_plain is not None else None
    col = r_plain
    for a, seed, p in zip(a_dropped, seeds, ps, strict=True):
        dx = dropout_expand(t[:, col : col + a.shape[0]], a, dx, seed, p)
        col += a.shape[0]
    return dx if weight is None else dx.addmm_(dy, weight)


# Under torch.compile these two run as opaque ops: inductor would turn the in-place epilogue into a copy + GEMM.
low_rank_then_base = torch.library.custom_op("lorakit::low_rank_then_base", _low_rank_then_base, mutates_args=())
grad_input = torch.library.custom_op("lorakit::grad_input", _grad_input, mutates_args=())


@low_rank_then_base.register_fake
def _(s, b_scaled, x, weight, bias, scale=1.0):
    return x.new_empty(x.shape[0], weight.shape[0])


@grad_input.register_fake
def _(dy, weight, t, a_plain, a_dropped, seeds, ps):
    n_in = (a_plain if a_plain is not None else a_dropped[0]).shape[1]
    return dy.new_empty(dy.shape[0], n_in)


def _eager_or_op(fn, op):
    """The op while torch.compile traces; the plain function eagerly (no dispatcher cost per call)."""
    return op if torch.compiler.is_compiling() else fn


def _factor_grads(ctx, dy, x, s, t, a_plain, a_dropped, seeds) -> list[Tensor | None]:
    """dA_a, dB_a for every adapter, in the order the factors came in, each in its factor's dtype."""
    scales, ps, plain, dropped = ctx.layout
    wanted = ctx.wanted[2:]
    n = len(scales)
    grads: list[Tensor | None] = [None] * (2 * n)
    if not any(wanted):
        return grads
    db_scaled = dy.T @ s  # (out x R)
    da_plain = t[:, : a_plain.shape[0]].T @ x if a_plain is not None else None  # (R_plain x in)
    col = 0
    for pos, i in enumerate(plain + dropped):
        rank = ctx.ranks[i]
        if wanted[2 * i]:
            if pos < len(plain):
                da = da_plain[col : col + rank]
            else:
                j = pos - len(plain)
                da = dropout_grad_a(t[:, col : col + rank], x, seeds[j : j + 1], ps[i])
            grads[2 * i] = da.to(ctx.factor_dtypes[2 * i])
        if wanted[2 * i + 1]:
            grads[2 * i + 1] = (db_scaled[:, col : col + rank] * scales[i]).to(ctx.factor_dtypes[2 * i + 1])
        col += rank
    return grads
