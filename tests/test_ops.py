"""The reference ops against float64 math written out by hand, and against merged weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit import LoraConfig, get_lora_model, ops


def _factors(r: int, n_in: int, n_out: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(r, n_in, generator=gen, dtype=dtype), torch.randn(n_out, r, generator=gen, dtype=dtype)


def test_linear_contribution_matches_float64_math():
    A, B = _factors(4, 16, 8)
    x = torch.randn(3, 5, 16)
    expected = 0.5 * torch.einsum("or,ri,bti->bto", B.double(), A.double(), x.double())
    torch.testing.assert_close(ops.linear_contribution(x, A, B, 0.5).double(), expected, atol=1e-5, rtol=1e-5)


def test_embedding_contribution_is_a_lookup_of_the_delta():
    A, B = _factors(4, 10, 6)  # A (r x num_embeddings), B (dim x r)
    ids = torch.tensor([[0, 3, 9], [2, 2, 1]])
    delta_table = (B.double() @ A.double()).T * 2.0  # (num x dim)
    torch.testing.assert_close(
        ops.embedding_contribution(ids, A, B, 2.0).double(), delta_table[ids], atol=1e-5, rtol=1e-5
    )


def test_low_rank_delta_keeps_kernel_dims():
    A = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    B = torch.randn(5, 3, 1, 1, dtype=torch.float64)
    expected = torch.einsum("or,rikl->oikl", B[:, :, 0, 0], A) * 0.25
    torch.testing.assert_close(ops.low_rank_delta(A, B, 0.25), expected)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(3, 5, 3, stride=2, padding=2, dilation=2),
        nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=1, padding_mode="circular"),
        nn.Conv3d(2, 4, 3, padding="same"),
        nn.Conv2d(3, 5, 1),
    ],
    ids=["1d-dilated", "2d-circular", "3d-same", "2d-1x1"],
)
def test_conv_contribution_equals_the_merged_conv(conv):
    torch.manual_seed(0)
    model = get_lora_model(nn.Sequential(conv), LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    x = torch.randn(2, conv.in_channels, *([7] * (conv.weight.dim() - 2)), dtype=torch.float64)
    model.double()
    unmerged = model(x)
    model.merge_adapter()
    torch.testing.assert_close(model(x), unmerged, atol=1e-10, rtol=0)


def test_transposed_conv1d_delta_layout_matches_linear_math():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(6, 4)  # weight (in=4, out=6)
    model = get_lora_model(nn.Sequential(layer), LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    adapter = model.model[0].adapters["default"]
    x = torch.randn(3, 4)
    expected = x @ layer.weight + layer.bias + adapter.scale * x @ adapter.lora_A.T @ adapter.lora_B.T
    torch.testing.assert_close(model(x), expected)
    assert F.linear(x, model.model[0].adapters["default"].delta_weight().T).shape == (3, 6)


def _routed_case(requires_grad: bool = False):
    gen = torch.Generator().manual_seed(0)
    ranks = [4, 4, 4, 2, 4, 2]  # two groups by rank; adapters 0 and 1 share row 0 (a tree path)
    adapters = [
        ops.LoraFactors(
            torch.randn(r, 12, generator=gen).requires_grad_(requires_grad),
            torch.randn(10, r, generator=gen).requires_grad_(requires_grad),
            0.5 + i,
        )
        for i, r in enumerate(ranks)
    ]
    rows = [torch.tensor(i) for i in ([0, 3], [0, 5], [1], [2, 4], [], [6])]  # row 7 keeps the base output
    return adapters, rows, torch.randn(8, 3, 12, generator=gen), torch.randn(8, 3, 10, generator=gen)


def test_batched_routed_lora_equals_the_reference_loop_values_and_gradients():
    from lorakit.ops import reference, routed

    adapters, rows, x, out = _routed_case(requires_grad=True)
    fast, slow = (
        routed.add_routed_lora(out, x, adapters, rows, False),
        reference.add_routed_lora(out, x, adapters, rows, False),
    )
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert torch.equal(fast[7], out[7])
    used = [t for i, a in enumerate(adapters) if i != 4 for t in (a.lora_A, a.lora_B)]  # adapter 4 has no rows
    grads = [torch.autograd.grad(y.square().sum(), used) for y in (fast, slow)]
    for g_fast, g_slow in zip(*grads, strict=True):
        torch.testing.assert_close(g_fast, g_slow, atol=1e-4, rtol=1e-4)


def test_batched_routed_lora_rounds_once_and_sees_factors_changed_in_place():
    from lorakit.ops import reference, routed

    adapters, rows, x, out = _routed_case()
    half = out.to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(
            routed.add_routed_lora(half, x, adapters, rows, False),
            reference.add_routed_lora(half, x, adapters, rows, False),
        )
        first = routed.add_routed_lora(out, x, adapters, rows, False)
        adapters[0].lora_B.mul_(2)  # the stacked copy kept between calls must not go stale
        second = routed.add_routed_lora(out, x, adapters, rows, False)
        torch.testing.assert_close(
            second, reference.add_routed_lora(out, x, adapters, rows, False), atol=1e-5, rtol=1e-5
        )
    assert not torch.allclose(first, second)


def test_batched_routed_lora_under_inference_mode():
    from lorakit.ops import reference, routed

    adapters, _, x, out = _routed_case()
    with torch.inference_mode():  # row tensors made here carry no version counter
        rows = [torch.tensor(i) for i in ([0, 3], [1, 5], [2], [4, 7], [], [6])]
        for _ in range(2):  # the second call reuses the plan and the stacked factors
            fast = routed.add_routed_lora(out, x, adapters, rows, False)
            torch.testing.assert_close(fast, reference.add_routed_lora(out, x, adapters, rows, False))


@pytest.mark.parametrize(
    "rows",
    [
        [[0, 1], [2, 3], [4, 5], [6, 7]],
        [[0, 4], [1, 5], [2, 6], [3, 7]],
        [[0, 1], [2, 3], [4, 5]],
        [[0, 2, 3, 4, 5], [1], [6], [7]],
    ],
    ids=["sorted-whole-batch", "interleaved", "sorted-part", "uneven-padded"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_routed_lora_block_layouts(rows, dtype):
    from lorakit.ops import reference, routed

    adapters, _, x, out = _routed_case(requires_grad=True)
    adapters = [adapters[i] for i in (0, 1, 2, 4)]  # four of rank 4: one level, no padding
    rows = [torch.tensor(r) for r in rows] + [torch.tensor([], dtype=torch.long)] * (4 - len(rows))
    out = out.to(dtype)
    fast, slow = (op(out, x, adapters, rows, False) for op in (routed.add_routed_lora, reference.add_routed_lora))
    assert fast.dtype == dtype
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    grads = [torch.autograd.grad(y.float().square().sum(), adapters[0].lora_B) for y in (fast, slow)]
    torch.testing.assert_close(grads[0], grads[1], atol=1e-3, rtol=1e-4)


def test_the_busiest_adapter_of_a_level_loops_instead_of_padding_the_others():
    from lorakit.ops import reference, routed

    adapters, _, _, _ = _routed_case(requires_grad=True)
    adapters = [adapters[i] for i in (0, 1, 2, 4)]  # four of rank 4
    gen = torch.Generator().manual_seed(2)
    x, out = torch.randn(40, 3, 12, generator=gen), torch.randn(40, 3, 10, generator=gen)
    rows = [torch.randperm(40, generator=gen)[:37]]
    rows += [torch.tensor([i]) for i in sorted(set(range(40)) - set(rows[0].tolist()))]
    rows[0] = rows[0].sort().values
    batched, looped = routed._plan(adapters, rows, False, 40, 3)
    assert [members for members, _ in batched] == [[1, 2, 3]] and looped == [(0, False)]
    fast, slow = (op(out, x, adapters, rows, False) for op in (routed.add_routed_lora, reference.add_routed_lora))
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    grads = [torch.autograd.grad(y.square().sum(), [adapters[0].lora_A, adapters[3].lora_B]) for y in (fast, slow)]
    for g_fast, g_slow in zip(*grads, strict=True):
        torch.testing.assert_close(g_fast, g_slow, atol=1e-4, rtol=1e-4)


def test_stacked_factors_kept_between_calls_stay_within_their_byte_budget(monkeypatch):
    from lorakit.ops import reference, routed

    adapters, rows, x, out = _routed_case()
    monkeypatch.setattr(routed, "STACKS_MAX_BYTES", 2 * (4 * 12 + 10 * 4) * 4 + 8 + 64)  # one stack of two adapters
    monkeypatch.setattr(routed, "_STACKS", type(routed._STACKS)())
    with torch.no_grad():
        for subset in ([0, 2], [1, 2], [0, 2]):  # levels of other adapters each call: re-stacked, not accumulated
            picked = [adapters[i] for i in subset]
            fast = routed.add_routed_lora(out, x, picked, [rows[2], rows[0]], False)
            torch.testing.assert_close(fast, reference.add_routed_lora(out, x, picked, [rows[2], rows[0]], False))
            held = sum(t.nbytes for _, value in routed._STACKS.values() for t in value)
            assert len(routed._STACKS) == 1 and held <= routed.STACKS_MAX_BYTES


def test_kept_values_count_their_bytes_and_drop_dead_entries_at_once(monkeypatch):
    from lorakit.ops import routed

    monkeypatch.setattr(routed, "_CACHE_MAX", 9)
    kept = routed.Kept()
    alive = [torch.zeros(i + 1) for i in range(8)]
    for i, t in enumerate(alive):
        routed._memo(kept, ("alive", i), [t], lambda t=t: (t * 2, t[:1] * 3))
    dead = torch.zeros(100)
    routed._memo(kept, ("dead",), [dead], lambda: (torch.ones(100),))
    del dead  # its entry can never be a hit again: dropped now, with its bytes
    assert ("dead",) not in kept and len(kept) == 8
    kept[("alive", 0)] = kept[("alive", 0)]  # replacing an entry counts its bytes once
    routed._memo(kept, ("last",), [alive[0]], lambda: (torch.zeros(1),))  # 9 entries: within _CACHE_MAX
    routed._memo(kept, ("past",), [alive[1]], lambda: (torch.zeros(1),))  # past it: pruned to 6 entries
    assert len(kept) == 6 and ("past",) in kept
    assert list(kept)[:1] == [("alive", 4)]  # the least recently used went
    assert kept.nbytes == sum(t.nbytes for _, value in kept.values() for t in value)
    kept.popitem(last=False)
    del kept[("last",)]
    assert kept.nbytes == sum(t.nbytes for _, value in kept.values() for t in value)


def test_batched_routed_lora_with_dropout_draws_the_references_masks():
    from lorakit.ops import reference, routed

    adapters, rows, x, out = _routed_case()
    adapters = [
        ops.LoraFactors(a.lora_A, a.lora_B, a.scale, dropout=0.3 if i % 2 else 0.0) for i, a in enumerate(adapters)
    ]
    results = []
    for op in (routed.add_routed_lora, reference.add_routed_lora):
        torch.manual_seed(7)
        results.append(op(out, x, adapters, rows, True))
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-5)
    torch.manual_seed(7)
    assert not torch.allclose(results[0], routed.add_routed_lora(out, x, adapters, rows, False))


def test_stacks_kept_from_an_inference_call_carry_no_gradient_history():
    from lorakit.ops import routed

    adapters, rows, x, out = _routed_case(requires_grad=True)
    with torch.inference_mode():
        routed.add_routed_lora(out, x, adapters, rows, False)  # kept: built outside inference mode, for later calls
    kept = [t for _, value in routed._STACKS.values() for t in value]
    assert kept and not any(t.requires_grad or t.is_inference() for t in kept)  # no graph held, usable in backward


def _logits(model: nn.Module, ids: torch.Tensor, kernel_dispatch: bool) -> torch.Tensor:
    """The model's logits without gradients, its layers dispatched as on CUDA (to lorakit/ops/triton's fused linear
    op, whose pure-torch parts run on the CPU) or to the reference."""
    from lorakit.ops.triton import fused_linear

    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        if kernel_dispatch:
            patch.setattr(ops, "_KERNELS", {"lora_linear": fused_linear.lora_linear, "add_lora": fused_linear.add_lora})
            patch.setattr(ops, "backend", lambda x: "triton")
        return model(input_ids=ids).logits.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layers_on_the_kernel_dispatch_in_inference_follow_set_adapter_and_hotswaps(dtype):
    """A layer's no-gradient path on the CUDA dispatch (factors cast once and kept) against the reference: one
    adapter, two, after hot swaps into the active adapter, and disabled."""
    from tests.cases import tiny_llama

    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = get_lora_model(tiny_llama().to(dtype), config).eval()  # fp32 factors, also on a bf16 base
    for name, rank in (("other", 2), ("third", 4)):
        model.add_adapter(name, LoraConfig(r=rank, lora_alpha=3, target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2  # bf16: the fused op computes the terms in bf16

    def same_as_reference() -> torch.Tensor:
        ours, reference = _logits(model, ids, True), _logits(model, ids, False)
        assert ((ours - reference).norm() / reference.norm()).item() < tolerance
        return ours

    first = same_as_reference()
    model.set_adapter(["default", "other"])
    both = same_as_reference()
    model.set_adapter("default")
    model.hotswap_adapter("other", "default")  # the first swap into a slot gives it new tensors
    swapped = same_as_reference()
    model.hotswap_adapter("third", "default")  # later ones copy into them: only their version counters tell
    again = same_as_reference()
    with model.disable_adapter():
        base = same_as_reference()
    for a, b in ((first, both), (first, swapped), (swapped, again), (first, base), (again, base)):
        assert ((a - b).norm() / b.norm()).item() > 10 * tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_routed_lora_equals_float64_math_with_tree_paths_and_repeated_rows(dtype):
    """Few token rows: every row through every adapter, masked per row (rows on two adapters get both terms; a row
    listed twice under one adapter gets its term twice, as index_add adds it)."""
    from lorakit.ops import reference, routed_dense

    adapters, rows, x, out = _routed_case()
    adapters = [ops.LoraFactors(a.lora_A.to(dtype), a.lora_B.to(dtype), a.scale) for a in adapters]
    rows = [*rows[:5], torch.tensor([6, 6])]
    x, out = x.to(dtype), out.to(dtype)
    assert routed_dense.fits(out, x, adapters, rows, False)
    as64 = [ops.LoraFactors(a.lora_A.double(), a.lora_B.double(), a.scale) for a in adapters]
    gold = reference.add_routed_lora(out.double(), x.double(), as64, rows, False)
    before = out.clone()
    with torch.inference_mode():
        y = routed_dense.add_routed_lora_dense(out, x, adapters, rows, False)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.double(), gold, atol=tolerance * gold.abs().max().item(), rtol=tolerance)
    assert y.dtype == dtype and torch.equal(y[7], out[7]) and torch.equal(out, before)


def test_dense_routed_lora_sees_factor_scale_and_row_changes():
    from lorakit.ops import reference, routed_dense

    adapters, rows, x, out = _routed_case()
    with torch.no_grad():
        first = routed_dense.add_routed_lora_dense(out, x, adapters, rows, False)
        adapters[0].lora_B.mul_(-2.0)  # in place: a hot swap or an optimizer step
        rescaled = [ops.LoraFactors(a.lora_A, a.lora_B, a.scale * 3) for a in adapters]
        other_rows = list(reversed(rows))
        for factors, r in ((adapters, rows), (rescaled, rows), (adapters, other_rows)):
            y = routed_dense.add_routed_lora_dense(out, x, factors, r, False)
            expected = reference.add_routed_lora(out, x, factors, r, False)  # summed in another order: rtol 1e-4
            torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(first, y)


def test_dense_routed_lora_is_left_to_other_paths_where_it_does_not_fit():
    from lorakit.ops import routed_dense

    adapters, rows, x, out = _routed_case(requires_grad=True)
    assert not routed_dense.fits(out, x, adapters, rows, False)  # gradients to record
    adapters, rows, x, out = _routed_case()
    dropped = [ops.LoraFactors(a.lora_A, a.lora_B, a.scale, 0.1) for a in adapters]
    assert not routed_dense.fits(out, x, dropped, rows, True)  # dropout to draw
    assert routed_dense.fits(out, x, dropped, rows, False)  # eval: dropout is off
    big = torch.randn(4096, 12)
    assert not routed_dense.fits(torch.randn(4096, 10), big, adapters, [torch.arange(4096)] * 6, False)


SPANS = {  # (spans, ranks, rows): out of order with an empty one and rows under no adapter; every row in equal ranges
    "gaps": ([(1, 3), (5, 8), (3, 4), (8, 8)], [4, 2, 8, 4], 9),
    "batched": ([(6, 9), (0, 3), (3, 6)], [4, 4, 4], 9),
}


@pytest.mark.parametrize("case", SPANS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_spanned_lora_equals_the_routed_reference_values_and_gradients(dtype, case, monkeypatch):
    """Rows as ranges (parallel training's layout): same sums and the same gradients as the row-list reference,
    for x, the base output and every factor; rows before, between and after the ranges keep the base output."""
    from lorakit.ops import reference

    batched = []
    monkeypatch.setattr(ops, "_batched_spans", lambda *a, f=ops._batched_spans: batched.append(1) or f(*a))
    gen = torch.Generator().manual_seed(3)
    spans, ranks, n_rows = SPANS[case]
    adapters = [
        ops.LoraFactors(torch.randn(r, 12, generator=gen, dtype=dtype).requires_grad_(),
                        torch.randn(10, r, generator=gen, dtype=dtype).requires_grad_(), 0.5 + i)
        for i, r in enumerate(ranks)
    ]  # fmt: skip
    x = torch.randn(n_rows, 3, 12, generator=gen, dtype=dtype).requires_grad_()
    out = torch.randn(n_rows, 3, 10, generator=gen, dtype=dtype).requires_grad_()
    rows = [torch.arange(a, b) for a, b in spans]
    fast = ops.add_spanned_lora(out, x, adapters, spans, False)
    slow = reference.add_routed_lora(out, x, adapters, rows, False)
    assert len(batched) == (case == "batched")
    # bf16: terms of size ~20 round to 0.125, in another order on each side (the batched path scales B first)
    tol = {"atol": 1e-10, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 0.25, "rtol": 2e-2}
    torch.testing.assert_close(fast, slow, **tol)
    for i in set(range(n_rows)) - {int(i) for r in rows for i in r}:
        assert torch.equal(fast[i], out[i])
    wrt = [x, out, *(t for a, r in zip(adapters, rows, strict=True) if r.numel() for t in (a.lora_A, a.lora_B))]
    weight = torch.randn(fast.shape, generator=gen, dtype=dtype)
    for g_fast, g_slow in zip(*(torch.autograd.grad((y * weight).sum(), wrt) for y in (fast, slow)), strict=True):
        torch.testing.assert_close(g_fast, g_slow, **tol)


def test_spanned_lora_of_one_range_over_every_row_is_add_lora():
    adapters = [ops.LoraFactors(*_factors(4, 12, 10), 2.0)]
    x, out = torch.randn(5, 12), torch.randn(5, 10)
    torch.testing.assert_close(
        ops.add_spanned_lora(out, x, adapters, [(0, 5)], False), ops.add_lora(out, x, adapters, False)
    )


@pytest.mark.parametrize("kernels", [False, True], ids=["reference", "kernels"])
def test_spanned_lora_with_fp32_factors_on_a_bf16_base_batches_where_add_lora_computes_in_the_base_dtype(
    kernels, monkeypatch
):
    """Parallel training's default (fp32 master factors, bf16 base): on the kernels' backend add_lora computes in
    x's dtype, so the equal ranges batch in bf16 too; the reference computes in fp32, range by range. Either way the
    sums follow float64 math and the factors get fp32 gradients."""
    batched = []
    monkeypatch.setattr(ops, "_batched_spans", lambda *a, f=ops._batched_spans: batched.append(1) or f(*a))
    if kernels:
        monkeypatch.setattr(ops, "backend", lambda x: "triton")
        monkeypatch.setattr(ops, "add_lora", ops.reference.add_lora)  # no CUDA here: the spec stands in for it
    gen = torch.Generator().manual_seed(5)
    adapters = [
        ops.LoraFactors(torch.randn(4, 12, generator=gen).requires_grad_(),
                        torch.randn(10, 4, generator=gen).requires_grad_(), 0.5 + i)
        for i in range(3)
    ]  # fmt: skip
    spans = [(0, 2), (2, 4), (4, 6)]
    x, out = torch.randn(6, 3, 12, generator=gen), torch.randn(6, 3, 10, generator=gen)
    y = ops.add_spanned_lora(out.bfloat16(), x.bfloat16(), adapters, spans, False)
    assert y.dtype == torch.bfloat16 and len(batched) == kernels
    exact = ops.reference.add_routed_lora(
        out.double(), x.double(), [ops.LoraFactors(a.lora_A.double(), a.lora_B.double(), a.scale) for a in adapters],
        [torch.arange(a, b) for a, b in spans], False,
    )  # fmt: skip
    torch.testing.assert_close(y.double(), exact, atol=0.25, rtol=2e-2)
    y.float().sum().backward()
    assert all(a.lora_A.grad.dtype == torch.float32 and a.lora_B.grad.abs().sum() > 0 for a in adapters)


def _gathered_case(dtype: torch.dtype):
    """Four adapters of ranks 1-8 over 6 -> 5, the third absent; 7 token rows naming up to two adapters each."""
    gen = torch.Generator().manual_seed(2)
    factors = []
    for g, r in enumerate((1, 3, 4, 8)):
        a, b = torch.randn(r, 6, generator=gen, dtype=dtype), torch.randn(5, r, generator=gen, dtype=dtype)
        factors.append(None if g == 2 else ops.LoraFactors(a, b, 0.5 * g + 1, 0.0))
    slots = torch.tensor([[0, -1], [1, 3], [-1, -1], [3, 0], [2, -1], [1, -1], [3, 3]], dtype=torch.int32)
    return factors, slots, torch.randn(7, 6, generator=gen, dtype=dtype), torch.randn(7, 5, generator=gen, dtype=dtype)


def test_gathered_lora_is_the_routed_reference_with_rows_named_by_number():
    """add_gathered_lora's slots name each row's adapters; add_routed_lora lists each adapter's rows: the same sums,
    a row named twice under one adapter counting twice, an absent adapter nothing."""
    factors, slots, x, out = _gathered_case(torch.float32)
    rows = [torch.nonzero(slots == g)[:, 0] for g in range(len(factors))]  # a row once per naming
    present = [g for g, f in enumerate(factors) if f is not None]
    expected = ops.reference.add_routed_lora(out, x, [factors[g] for g in present], [rows[g] for g in present], False)
    got = ops.add_gathered_lora(out, x, slots, ops.gather_table(factors))
    torch.testing.assert_close(got, expected)
    assert torch.equal(got[[2, 4]], out[[2, 4]]) and not torch.allclose(got[6], out[6])


def test_gathered_lora_rounds_once_and_leaves_rows_of_a_broken_adapter_alone():
    factors, slots, x, out = _gathered_case(torch.float32)
    factors[0].lora_B[0, 0] = float("nan")  # adapter 0's rows break, no other's
    got = ops.add_gathered_lora(out.bfloat16(), x.bfloat16(), slots, ops.gather_table(factors))
    wide = [None if f is None else ops.LoraFactors(f.lora_A.double(), f.lora_B.double(), f.scale, 0.0) for f in factors]
    want = ops.reference.add_gathered_lora(out.bfloat16().double(), x.bfloat16().double(), slots, wide)
    assert got.dtype == torch.bfloat16 and got[[0, 3]].isnan().any() and not got[[1, 2, 4, 5, 6]].isnan().any()
    torch.testing.assert_close(got[[1, 2, 4, 5, 6]].double(), want[[1, 2, 4, 5, 6]], atol=0, rtol=2**-8)


def test_gathered_linear_group_gives_the_base_products_and_the_terms_that_sum_to_the_group():
    """Each sibling's F.linear and its routed terms apart in fp32: their sum rounded to bf16 is the in-place group's
    output (to its rounding: a row with two adapters may sum them in another order), a row with one adapter or none
    exactly; the terms of a row with none are zero."""
    factors, slots, x, _ = _gathered_case(torch.float32)
    gen = torch.Generator().manual_seed(4)
    weights = [torch.randn(5, 6, generator=gen).bfloat16(), torch.randn(5, 6, generator=gen).bfloat16()]
    biases = [torch.randn(5, generator=gen).bfloat16(), None]
    tables = [ops.gather_table(factors), ops.gather_table([factors[3], factors[1], None, factors[0]])]
    xb = x.bfloat16()
    outs, terms = ops.gathered_linear_group(xb, weights, biases, slots, tables)
    bases = [torch.nn.functional.linear(xb, w, b) for w, b in zip(weights, biases, strict=True)]
    grouped = ops.add_gathered_lora_group(xb, [b.clone() for b in bases], slots, tables)
    one = [0, 2, 4, 5]  # rows naming one adapter or none
    for out, base, term, want in zip(outs, bases, terms, grouped, strict=True):
        assert torch.equal(out, base) and term.dtype == torch.float32 and not term[2].any()
        summed = (out + term).to(out.dtype)
        assert torch.equal(summed[one], want[one])
        torch.testing.assert_close(summed.double(), want.double(), atol=0, rtol=2**-7)


@pytest.mark.parametrize(
    "change",
    ["mixed-dtypes", "rank-above-the-kernels", "transposed-factor", "other-shape", "none-held"],
)
def test_a_gather_table_is_refused_where_the_kernels_do_not_apply(change):
    factors, *_ = _gathered_case(torch.float32)
    f = factors[1]
    if change == "mixed-dtypes":
        factors[1] = ops.LoraFactors(f.lora_A.double(), f.lora_B.double(), f.scale, 0.0)
    elif change == "rank-above-the-kernels":
        r = ops.gathered.MAX_RANK + 1
        factors[1] = ops.LoraFactors(torch.zeros(r, 6), torch.zeros(5, r), 1.0, 0.0)
    elif change == "transposed-factor":
        factors[1] = ops.LoraFactors(f.lora_A, f.lora_B.T.contiguous().T, f.scale, 0.0)
    elif change == "other-shape":
        factors[1] = ops.LoraFactors(torch.zeros(3, 7), torch.zeros(5, 3), 1.0, 0.0)
    else:
        factors = [None] * 3
    assert ops.gather_table(factors) is None
    assert ops.gather_table(_gathered_case(torch.float32)[0]) is not None


def test_a_gather_table_keeps_what_its_addresses_point_into():
    """The kernels read through the addresses, so a factor's `.data` assigned (which frees its storage otherwise)
    must not leave the table pointing at freed memory: the table holds the storages."""
    factors, *_ = _gathered_case(torch.float32)
    table = ops.gather_table(factors)
    old = factors[1].lora_B.data_ptr()
    factors[1].lora_B.data = torch.zeros(5, 3)
    assert old in [t.data_ptr() for t in table.storages]
    assert table.entries[1, 1].item() == old


def test_restacked_tables_share_one_tensor_refilled_in_place_while_alike():
    """A model's tables are rows of one tensor (a compiled step then takes one input for all its layers); a rebuild
    alike writes into it (graphs keep reading the same address), one unlike gets a new one, and a tensor no table
    holds is let go."""
    import gc

    factors, *_ = _gathered_case(torch.float32)
    other = [factors[3], factors[1], None, factors[0]]

    def build(parts):
        return [None if p is None else ops.gather_table(p) for p in parts]

    def rows(parts):
        return [None if p is None else ops.gather_table(p).entries for p in parts]

    first = ops.gathered.restack([None, None, None], build([factors, None, other]))
    home, stack = first[0].home, ops.gathered.STACKS[first[0].home]
    assert first[1] is None and first[2].home == home and stack.shape == (2, 4, 4)
    assert torch.equal(first[0].entries, rows([factors])[0]) and torch.equal(first[2].entries, rows([other])[0])
    assert first[2].entries.data_ptr() == stack[1].data_ptr()

    swapped = ops.gathered.restack(first, build([other, None, factors]))  # alike: written in place
    assert swapped[0] is first[0] and swapped[0].home == home and ops.gathered.STACKS[home] is stack
    assert torch.equal(stack[0], rows([other])[0]) and torch.equal(stack[1], rows([factors])[0])
    assert swapped[0].factors == other

    wider = [ops.LoraFactors(torch.randn(32, 6), torch.randn(5, 32), 1.0, 0.0)] * 4  # another rank tile
    unlike = ops.gathered.restack(swapped, build([factors, None, wider]))
    assert unlike[0].home == unlike[2].home != home and unlike[2].block_r == 32
    del first, swapped, stack
    gc.collect()
    assert home not in ops.gathered.STACKS


def test_a_gather_table_says_aligned_only_where_every_address_and_row_is():
    """The kernels load 16 bytes at a time only from an aligned table: one misaligned factor, or rows whose width
    is not a multiple of 16 bytes, and the whole table takes element loads (ops.gathered._aligned)."""
    gen = torch.Generator().manual_seed(3)

    def factors(rank: int = 8, n_in: int = 16, offset: int = 0) -> list:
        a = torch.randn(rank * n_in + offset, generator=gen)[offset:].view(rank, n_in)
        return [ops.LoraFactors(a, torch.randn(12, rank, generator=gen), 1.0, 0.0)] * 2

    assert ops.gather_table(factors()).aligned
    assert not ops.gather_table(factors(offset=1)).aligned  # A starts 4 bytes past an aligned address
    assert not ops.gather_table(factors(rank=3)).aligned  # B's rows are 12 bytes
    assert not ops.gather_table(factors(n_in=6)).aligned  # A's rows are 24 bytes
    table = ops.gather_table(factors())
    assert ops.gathered.refill(table, ops.gather_table(factors(offset=1))) is not table  # the kernels' form changes
    same = ops.gather_table(factors())
    assert ops.gathered.refill(table, same) is table
