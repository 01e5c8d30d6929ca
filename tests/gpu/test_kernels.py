"""The fused LoRA ops (lorakit/ops/triton) against float64 math with the same dropout masks.

Every case runs on the CPU too (the custom ops' CPU impls), so CI checks the fused autograd logic in fp32; the CUDA
cases (triton kernels, cuBLAS, bf16/fp32, torch.compile) skip cleanly without CUDA or triton.
"""

from __future__ import annotations

import gc
import importlib.util
import weakref

import pytest
import torch
import torch.nn.functional as F

from lorakit import ops
from lorakit.ops.reference import LoraFactors
from lorakit.ops.triton.dropout import draw_seeds, keep_mask
from lorakit.ops.triton.fused_linear import add_lora, lora_linear

HAS_KERNELS = torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
needs_kernels = pytest.mark.skipif(not HAS_KERNELS, reason="the triton kernels need CUDA and triton")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_kernels)]
# ||out - float64|| / ||float64|| allowed per compute dtype (bf16 operands round at ~4e-3)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _adapters(specs, n_in, n_out, dtype, device, gen):
    """LoraFactors with random (non-zero) A and B; specs = [(rank, dropout), ...]."""
    adapters = []
    for k, (rank, p) in enumerate(specs):
        a = torch.randn(rank, n_in, generator=gen, dtype=dtype) / n_in**0.5
        b = torch.randn(n_out, rank, generator=gen, dtype=dtype) / rank**0.5
        scale = 2.0 / rank if k % 2 == 0 else 1.5 / rank**0.5  # plain and rsLoRA scales
        adapters.append(LoraFactors(a.to(device).requires_grad_(), b.to(device).requires_grad_(), scale, p))
    return adapters


def _gold(x, weight, bias, base, adapters, masks):
    """float64 y = x W^T + b (or base) + sum_a s_a B_a A_a (keep_a * x / (1 - p_a)), and its graph."""
    x64 = x.detach().double().requires_grad_()
    y = F.linear(x64, weight.double(), None if bias is None else bias.double()) if base is None else base.double()
    params = []
    for a, mask in zip(adapters, masks, strict=True):
        a64, b64 = (t.detach().double().requires_grad_() for t in (a.lora_A, a.lora_B))
        h = x64 if mask is None else x64 * mask.reshape(x64.shape) / (1 - a.dropout)
        y = y + a.scale * F.linear(F.linear(h, a64), b64)
        params += [a64, b64]
    return y, [x64, *params]


def _masks(adapters, x, seed):
    """The masks the op drew after torch.manual_seed(seed): one seed per adapter with dropout, in order."""
    torch.manual_seed(seed)
    seeds = iter(draw_seeds(sum(a.dropout > 0 for a in adapters), x.device).split(1))
    x2 = x.detach().reshape(-1, x.shape[-1])
    return [keep_mask(x2, next(seeds), a.dropout) if a.dropout > 0 else None for a in adapters]


def _rel(out, ref) -> float:
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _check(fn, x, weight, bias, base, adapters, dtype, seed=0):
    """fn's output and gradients (x, every A and B) against float64 math with the op's own dropout masks."""
    torch.manual_seed(seed)
    y = fn()
    masks = _masks(adapters, x, seed)
    gold, gold_inputs = _gold(x, weight, bias, base, adapters, masks)
    grad_out = torch.randn_like(gold)
    inputs = [x] + [t for a in adapters for t in (a.lora_A, a.lora_B)]
    grads = torch.autograd.grad(y, inputs, grad_out.to(y.dtype))
    gold_grads = torch.autograd.grad(gold, gold_inputs, grad_out)
    assert y.dtype == x.dtype and y.shape == gold.shape
    assert _rel(y, gold) < TOLERANCE[dtype], "output"
    for name, g, ref, t in zip(["x"] + ["A", "B"] * len(adapters), grads, gold_grads, inputs, strict=True):
        assert g.dtype == t.dtype, f"gradient of {name} in {g.dtype}, its tensor is {t.dtype}"
        assert torch.isfinite(g).all() and _rel(g, ref) < TOLERANCE[dtype], f"gradient of {name}: {_rel(g, ref)}"


def _case(device, dtype, factor_dtype, shape, n_out, specs, with_bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n_in = shape[-1]
    x = torch.randn(*shape, generator=gen, dtype=dtype).to(device).requires_grad_()
    weight = (torch.randn(n_out, n_in, generator=gen, dtype=dtype) / n_in**0.5).to(device)
    bias = torch.randn(n_out, generator=gen, dtype=dtype).to(device) if with_bias else None
    return x, weight, bias, _adapters(specs, n_in, n_out, factor_dtype, device, gen)


MIXED = [(8, 0.0), (3, 0.1), (16, 0.25), (1, 0.0)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("specs", [[(4, 0.0)], [(4, 0.3)], MIXED], ids=["plain", "dropout", "mixed"])
def test_fused_linear_matches_float64_math(device, specs):
    dtype = torch.float32
    x, w, b, adapters = _case(device, dtype, dtype, (2, 5, 37), 29, specs)
    _check(lambda: lora_linear(x, w, b, adapters, True), x, w, b, None, adapters, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_add_lora_passes_the_gradient_to_the_base_output(device):
    dtype = torch.float32
    x, w, _, adapters = _case(device, dtype, dtype, (9, 21), 13, MIXED, with_bias=False)
    base = F.linear(x.detach(), w).requires_grad_()
    _check(lambda: add_lora(base, x, adapters, True), x, w, None, base.detach(), adapters, dtype)
    torch.manual_seed(0)
    (grad_base,) = torch.autograd.grad(add_lora(base, x, adapters, True).sum(), [base])
    assert torch.equal(grad_base, torch.ones_like(base))


def test_eval_mode_draws_no_mask_and_equals_the_reference():
    x, w, b, adapters = _case("cpu", torch.float32, torch.float32, (6, 11), 7, MIXED)
    expected = ops.reference.lora_linear(x, w, b, adapters, False)
    torch.testing.assert_close(lora_linear(x, w, b, adapters, False), expected)


def test_unsupported_cases_fall_back_to_the_reference():
    x, w, b, adapters = _case("cpu", torch.float32, torch.float32, (6, 11), 7, [(2, 0.0)])
    w.requires_grad_()  # a trainable base weight needs dW, which the fused op does not compute
    y = lora_linear(x, w, b, adapters, True)
    assert "Fused" not in type(y.grad_fn).__name__
    torch.testing.assert_close(y, ops.reference.lora_linear(x, w, b, adapters, True))


@needs_kernels
@pytest.mark.parametrize("rank", [1, 7, 16, 64, 256])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernels_across_ranks_dtypes_and_odd_shapes(rank, p, dtype):
    # fp32 master factors on a bf16 base (the default user) compute in bf16; gradients come back in fp32
    x, w, b, adapters = _case("cuda", dtype, torch.float32, (3, 97, 203), 141, [(rank, p)], seed=rank)
    _check(lambda: lora_linear(x, w, b, adapters, True), x, w, b, None, adapters, dtype)


@needs_kernels
def test_kernels_on_many_rows_split_the_reduction():
    x, w, b, adapters = _case("cuda", torch.bfloat16, torch.float32, (4133, 1000), 300, MIXED)
    _check(lambda: lora_linear(x, w, b, adapters, True), x, w, b, None, adapters, torch.bfloat16)


@needs_kernels
def test_cuda_dispatch_picks_the_fused_op():
    x, w, b, adapters = _case("cuda", torch.bfloat16, torch.float32, (4, 64), 32, [(4, 0.1)])
    assert ops.backend(x) == "triton"
    y = ops.lora_linear(x, w, b, adapters, True)
    assert "Fused" in type(y.grad_fn).__name__


@needs_kernels
def test_keep_mask_is_a_function_of_the_seed():
    x = torch.randn(300, 501, device="cuda")
    seeds = torch.tensor([3, 4], device="cuda")
    first, again, other = keep_mask(x, seeds[:1], 0.3), keep_mask(x, seeds[:1], 0.3), keep_mask(x, seeds[1:], 0.3)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert abs(first.float().mean().item() - 0.7) < 0.01


@needs_kernels
@pytest.mark.parametrize("specs", [[(16, 0.0)], MIXED], ids=["plain", "mixed-dropout"])
def test_compiled_matches_eager(specs, monkeypatch):
    # inductor draws its own random numbers unless told to fall back to torch's, which the masks come from
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    torch._dynamo.reset()
    x, w, b, adapters = _case("cuda", torch.bfloat16, torch.float32, (2, 33, 96), 80, specs)
    compiled = torch.compile(lambda x: ops.lora_linear(x, w, b, adapters, True), fullgraph=True)
    _check(lambda: compiled(x), x, w, b, None, adapters, torch.bfloat16)


def _routed_case(dtype, factor_dtype):
    gen = torch.Generator().manual_seed(0)
    batch, tokens, n_in, n_out = 9, 37, 203, 141
    x = torch.randn(batch, tokens, n_in, generator=gen).to("cuda", dtype)
    out = torch.randn(batch, tokens, n_out, generator=gen).to("cuda", dtype)
    adapters = _adapters([(1, 0.0), (5, 0.0), (16, 0.0), (64, 0.0)], n_in, n_out, factor_dtype, "cuda", gen)
    # rows 0 and 8 are on two adapters (a tree path), adapter 2 has no rows, rows 5..7 keep the base output
    rows = [torch.tensor(r, dtype=torch.long, device="cuda") for r in ([0, 3, 8], [1], [], [0, 2, 4, 8])]
    return x, out, adapters, rows


# few token rows (decode steps) go through routed_dense's three ops; DENSE_MAX = 0 keeps them on the kernels
ROUTED_PATHS = pytest.mark.parametrize("dense_max", [0, 2**16], ids=["kernel", "dense"])


@needs_kernels
@ROUTED_PATHS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_routed_kernel_matches_float64_math(dtype, dense_max, monkeypatch):
    from lorakit.ops import routed_dense
    from lorakit.ops.triton.routed import add_routed_lora

    monkeypatch.setattr(routed_dense, "DENSE_MAX", dense_max)

    x, out, adapters, rows = _routed_case(dtype, torch.float32)
    as64 = [LoraFactors(a.lora_A.double(), a.lora_B.double(), a.scale, 0.0) for a in adapters]
    with torch.no_grad():
        y = add_routed_lora(out, x, adapters, rows, False)
        gold = ops.reference.add_routed_lora(out.double(), x.double(), as64, rows, False)
    assert y.dtype == out.dtype and y.shape == out.shape
    assert _rel(y, gold) < TOLERANCE[dtype]
    assert torch.equal(y[5:8], out[5:8])


@needs_kernels
@ROUTED_PATHS
def test_routed_kernel_sees_factors_changed_in_place(dense_max, monkeypatch):
    """The kernel keeps the factors side by side between calls: a factor changed in place (hotswap, an optimizer
    step) or another row list must be seen at the next call."""
    from lorakit.ops import routed_dense
    from lorakit.ops.triton.routed import add_routed_lora

    monkeypatch.setattr(routed_dense, "DENSE_MAX", dense_max)

    x, out, adapters, rows = _routed_case(torch.float32, torch.float32)
    with torch.no_grad():
        first = add_routed_lora(out, x, adapters, rows, False)
        adapters[0].lora_B.mul_(-2.0)
        adapters[3].lora_A.add_(0.5)
        again = add_routed_lora(out, x, adapters, rows, False)
        other_rows = [rows[3], rows[2], rows[1], rows[0]]
        swapped = add_routed_lora(out, x, adapters, other_rows, False)
    assert _rel(first, again.double()) > 1e-3
    for y, r in ((again, rows), (swapped, other_rows)):
        assert _rel(y, ops.reference.add_routed_lora(out, x, adapters, r, False).double()) < TOLERANCE[torch.float32]


@needs_kernels
def test_routed_op_with_gradients_uses_the_reference():
    x, out, adapters, rows = _routed_case(torch.bfloat16, torch.float32)
    y = ops.add_routed_lora(out, x, adapters, rows, True)
    assert y.requires_grad
    torch.testing.assert_close(y, ops.reference.add_routed_lora(out, x, adapters, rows, True))


# -- inference: no autograd node, the factors' casts and concatenations kept between calls ---------------------------

INFERENCE_SPECS = [(16, 0.1), (3, 0.0), (7, 0.2)]  # rsLoRA and plain scales; eval mode draws no dropout


def _inference_gold(x, weight, bias, adapters):
    return _gold(x, weight, bias, None, adapters, [None] * len(adapters))[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("factor_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n_adapters", [1, 3])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_inference_path_matches_float64_math_and_the_fused_forward(device, dtype, factor_dtype, n_adapters, with_bias):
    specs = INFERENCE_SPECS[:n_adapters]
    x, w, b, adapters = _case(device, dtype, factor_dtype, (3, 37, 203), 141, specs, with_bias)
    with torch.no_grad():
        y = lora_linear(x, w, b, adapters, False)
        again = lora_linear(x, w, b, adapters, False)  # from what the first call kept
    frozen = [LoraFactors(a.lora_A.detach(), a.lora_B.detach(), a.scale, a.dropout) for a in adapters]
    nothing_wants_grad = lora_linear(x.detach(), w, b, frozen, False)  # grad mode on, yet no node is needed
    with_grad = lora_linear(x, w, b, adapters, False)
    assert with_grad.requires_grad and not y.requires_grad and not nothing_wants_grad.requires_grad
    assert y.dtype == dtype and y.shape == with_grad.shape
    assert _rel(y, _inference_gold(x, w, b, adapters)) < TOLERANCE[dtype]
    assert torch.equal(y, again) and torch.equal(y, nothing_wants_grad)
    assert _rel(y, with_grad.detach().double()) < TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_adapters", [1, 3])
def test_add_lora_inference_adds_to_a_new_tensor(device, n_adapters):
    x, w, _, adapters = _case(device, torch.float32, torch.float32, (9, 21), 13, INFERENCE_SPECS[:n_adapters])
    base = F.linear(x.detach(), w)
    before = base.clone()
    with torch.no_grad():
        y = add_lora(base, x, adapters, False)
    assert y.grad_fn is None and torch.equal(base, before)  # the caller's base output is not changed in place
    assert _rel(y, _inference_gold(x, w, None, adapters)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("factor_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n_adapters", [1, 3])
def test_inference_path_follows_factors_changed_in_place(device, factor_dtype, n_adapters):
    """What the inference path keeps between calls is never served stale: factors changed in place (a hot swap's
    copy_, an optimizer step), a factor's storage swapped (model.to), a new factor tensor, another scale and
    another input dtype are all seen at the next call."""
    dtype = torch.bfloat16
    x, w, b, adapters = _case(device, dtype, factor_dtype, (5, 64), 48, INFERENCE_SPECS[:n_adapters])
    gen = torch.Generator().manual_seed(1)
    outputs = []

    def follows(x, w, b):
        with torch.no_grad():
            y = lora_linear(x, w, b, adapters, False)
        assert _rel(y, _inference_gold(x, w, b, adapters)) < TOLERANCE[x.dtype]
        assert all(_rel(y, earlier.double()) > 0.05 for earlier in outputs if earlier.dtype == y.dtype), "stale"
        outputs.append(y)

    follows(x, w, b)
    with torch.no_grad():
        last = adapters[-1].lora_B
        last.copy_(torch.randn(last.shape, generator=gen).to(device))
    follows(x, w, b)
    with torch.no_grad():
        adapters[0].lora_A.mul_(-1.0)
    follows(x, w, b)
    adapters[0].lora_B.data = adapters[0].lora_B.data * 3  # new storage under the same tensor and version counter
    follows(x, w, b)
    adapters[0] = LoraFactors(adapters[0].lora_A, adapters[0].lora_B, -adapters[0].scale)
    follows(x, w, b)
    adapters[-1] = LoraFactors(adapters[-1].lora_A, adapters[-1].lora_B.detach() * -2, adapters[-1].scale)
    follows(x, w, b)
    follows(x.float(), w.float(), b.float())


def test_inference_keeps_only_copies_and_drops_them_with_their_factors():
    from lorakit.ops.triton import fused_linear

    x, w, b, adapters = _case("cpu", torch.bfloat16, torch.float32, (4, 8), 6, INFERENCE_SPECS)
    with torch.inference_mode():  # kept for later calls, which may run outside inference mode
        kept = fused_linear._prepared(x.dtype, adapters)
    assert not any(t.requires_grad or t.is_inference() for t in kept[:2])  # and hold no autograd graph
    again = fused_linear._prepared(x.dtype, adapters)
    assert again[0] is kept[0] and again[1] is kept[1]  # the same tensors again: made once
    first = weakref.ref(adapters[0].lora_A)
    key = id(adapters[0].lora_A)
    assert key in fused_linear._PREPARED
    del adapters
    gc.collect()
    assert first() is None and key not in fused_linear._PREPARED  # nothing kept holds a factor alive
    same_dtype = _case("cpu", torch.float32, torch.float32, (4, 8), 6, INFERENCE_SPECS[:1])[3]
    a, b_, _ = fused_linear._prepared(torch.float32, same_dtype)
    assert a is same_dtype[0].lora_A and b_ is same_dtype[0].lora_B  # used as they are: no copy, nothing kept


def test_inference_tensors_are_never_kept_and_their_changes_are_seen():
    with torch.inference_mode():
        x, w, b, adapters = _case("cpu", torch.float32, torch.bfloat16, (4, 8), 6, INFERENCE_SPECS)
        frozen = [LoraFactors(a.lora_A.detach(), a.lora_B.detach(), a.scale) for a in adapters]
        first = lora_linear(x, w, b, frozen, False)
        frozen[1].lora_B.mul_(-3.0)  # an inference tensor has no version counter to tell this change
        again = lora_linear(x, w, b, frozen, False)
    assert _rel(again, _inference_gold(x, w, b, frozen)) < TOLERANCE[torch.float32]
    assert _rel(again, first.double()) > 0.05


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_adapters", [1, 3])
def test_compiled_inference_matches_eager(device, n_adapters):
    # on CPU aot_eager checks that the inference path traces whole; on CUDA inductor compiles the dispatcher's path
    torch._dynamo.reset()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, w, b, adapters = _case(device, dtype, torch.float32, (2, 33, 96), 80, INFERENCE_SPECS[:n_adapters])
    op, backend = (ops.lora_linear, "inductor") if device == "cuda" else (lora_linear, "aot_eager")
    compiled = torch.compile(lambda x: op(x, w, b, adapters, False), fullgraph=True, backend=backend)
    with torch.no_grad():
        y, eager = compiled(x), lora_linear(x, w, b, adapters, False)
    assert y.grad_fn is None and _rel(y, eager.double()) < TOLERANCE[dtype]
    assert _rel(y, _inference_gold(x, w, b, adapters)) < TOLERANCE[dtype]


def test_autocast_falls_back_to_the_reference():
    x, w, b, adapters = _case("cpu", torch.float32, torch.float32, (6, 11), 7, INFERENCE_SPECS)
    for grad in (True, False):
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
            y = lora_linear(x, w, b, adapters, False)
            expected = ops.reference.lora_linear(x, w, b, adapters, False)
        assert torch.equal(y, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("specs", [[(4, 0.0)], MIXED], ids=["plain", "mixed"])
def test_a_bf16_layer_under_bf16_autocast_stays_fused(device, specs, monkeypatch):
    """`lorakit train`'s default on a GPU: a bf16 model, fp32 factors, bf16 autocast. Autocast would compute every
    product in bf16 as the fused op does, so the op runs (the reference is never called): the output and gradients
    are those of the same call without autocast, bit for bit, and follow float64 math (dropout included)."""
    dtype = torch.bfloat16
    x, w, b, adapters = _case(device, dtype, torch.float32, (3, 7, 40), 24, specs)
    inputs = [x] + [t for a in adapters for t in (a.lora_A, a.lora_B)]
    grad_out = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(1)).to(device, dtype)

    def run(autocast: bool):
        torch.manual_seed(0)
        with torch.autocast(device, dtype=dtype, enabled=autocast):
            y = lora_linear(x, w, b, adapters, True)
        return [y, *torch.autograd.grad(y, inputs, grad_out)]

    plain = run(False)
    monkeypatch.setattr(ops.reference, "lora_linear", lambda *args: pytest.fail("the reference ran"))
    for got, want in zip(run(True), plain, strict=True):
        assert torch.equal(got, want)
    _check(lambda: lora_linear(x, w, b, adapters, True), x, w, b, None, adapters, dtype)


@needs_kernels
@pytest.mark.parametrize("factor_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hooked", [False, True], ids=["bare", "hooked"])
def test_routed_layers_add_into_their_base_output_only_where_nothing_else_reads_it(factor_dtype, hooked, monkeypatch):
    """A routed layer's kernels may add into the base layer's output instead of copying it (no variant reads it, no
    hook holds it); rows equal each adapter alone, and a hook on the base layer keeps what the base computed."""
    from lorakit import LoraConfig, get_lora_model
    from lorakit.ops import routed_dense
    from tests.cases import mlp

    monkeypatch.setattr(routed_dense, "DENSE_MAX", 0)  # the segment kernels, as a prefill's many rows take
    model = mlp().to("cuda", torch.bfloat16)
    config = LoraConfig(r=4, init_lora_weights=False, target_modules=["lin0", "lin1"])
    torch.manual_seed(5)
    lora = get_lora_model(model, config, "a", adapter_dtype=factor_dtype)
    lora.add_adapter("b", config, adapter_dtype=factor_dtype)
    lora.eval()
    seen = []
    if hooked:
        base = lora.get_submodule("model.lin0").base_layer
        base.register_forward_hook(lambda module, args, output: seen.append((output, output.clone())))
    names = ["a", "b", "__base__", "b", "a", "a"]
    x = torch.randn(6, 40, 6, generator=torch.Generator().manual_seed(0)).to("cuda", torch.bfloat16)
    with torch.inference_mode():
        mixed = [lora(x=x, adapter_names=names) for _ in range(2)]  # the second call reuses the kept plans
        alone = []
        for i, name in enumerate(names):
            if name == "__base__":
                with lora.disable_adapter():
                    alone.append(lora(x=x)[i])
            else:
                lora.set_adapter(name)
                alone.append(lora(x=x)[i])
    for y in mixed:
        torch.testing.assert_close(y, torch.stack(alone), atol=2e-2, rtol=2e-2)
    for held, copy in seen:
        assert torch.equal(held, copy)
