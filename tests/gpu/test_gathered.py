"""The gathered decode kernels (lorakit/ops/triton/gathered.py) against float64 math, and compiled decode steps
through them (CUDA graphs, mode reduce-overhead) against the same model run eagerly."""

from __future__ import annotations

import pytest
import torch

from lorakit import LoraConfig, get_lora_model
from lorakit.layer import LoraLayer
from lorakit.ops import gather_table, reference
from lorakit.ops.reference import LoraFactors
from tests.gpu.models import tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the gathered kernels need a CUDA GPU")
CUDA = torch.device("cuda")
RANKS = [1, 7, 16, 64, 128, 3]


def _factors(n_in: int, n_out: int, dtype: torch.dtype, absent: tuple[int, ...] = (2,)) -> list[LoraFactors | None]:
    gen = torch.Generator(CUDA).manual_seed(0)
    factors: list[LoraFactors | None] = []
    for g, rank in enumerate(RANKS):
        a = torch.randn(rank, n_in, device=CUDA, generator=gen).div_(n_in**0.5).to(dtype)
        b = torch.randn(n_out, rank, device=CUDA, generator=gen).div_(rank**0.5).to(dtype)
        factors.append(None if g in absent else LoraFactors(a, b, 0.5 + g, 0.0))
    return factors


def _wide(factors: list[LoraFactors | None]) -> list[LoraFactors | None]:
    return [None if f is None else LoraFactors(f.lora_A.double(), f.lora_B.double(), f.scale, 0.0) for f in factors]


@pytest.mark.parametrize(
    "x_dtype,factor_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
     (torch.float16, torch.float16)],
    ids=["fp32", "bf16", "bf16-on-fp32-factors", "fp16"],
)  # fmt: skip
@pytest.mark.parametrize("n_in,n_out", [(2048, 512), (96, 8192), (8192, 2048), (100, 33)])
@pytest.mark.parametrize("paths", [1, 3])
def test_the_kernels_add_each_rows_adapters_as_float64_math_does(x_dtype, factor_dtype, n_in, n_out, paths):
    factors = _factors(n_in, n_out, factor_dtype)
    table = gather_table(factors)
    gen = torch.Generator(CUDA).manual_seed(1)
    tokens = 37
    x = torch.randn(tokens, n_in, device=CUDA, generator=gen).to(x_dtype)
    out = torch.randn(tokens, n_out, device=CUDA, generator=gen).to(x_dtype)
    slots = torch.randint(-1, len(RANKS), (tokens, paths), device=CUDA, generator=gen, dtype=torch.int32)
    want = reference.add_gathered_lora(out.double(), x.double(), slots, _wide(factors))
    from lorakit.ops.triton.gathered import add_gathered_lora

    got = add_gathered_lora(out.clone(), x, slots, table)
    exact = x_dtype == torch.float32
    tol = 1e-4 if exact else 2e-2
    torch.testing.assert_close(got.double(), want, atol=tol * want.abs().max().item(), rtol=tol)
    base_rows = ((slots == 2) | (slots < 0)).all(-1)  # no adapter, or only the one absent from the table
    assert torch.equal(got[base_rows], out[base_rows])  # untouched, not rounded again
    assert not torch.allclose(got[~base_rows], out[~base_rows])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "one-element-off"])
def test_the_kernels_with_16_byte_loads_match_float64_math(dtype, offset):
    """Ranks that keep every row 16-byte aligned: the kernels load 16 bytes at a time (GatherTable.aligned); the
    same factors one element past an aligned address keep element loads. Both as float64 math."""
    gen = torch.Generator(CUDA).manual_seed(2)
    n_in, n_out, factors = 2048, 520, []
    for g, rank in enumerate((8, 16, 64, 128)):
        values = torch.randn(rank, n_in, device=CUDA, generator=gen).div_(n_in**0.5)
        a = torch.empty(rank * n_in + offset, device=CUDA, dtype=dtype)[offset:].view(rank, n_in).copy_(values)
        b = torch.randn(n_out, rank, device=CUDA, generator=gen).div_(rank**0.5).to(dtype)
        factors.append(LoraFactors(a, b, 0.5 + g, 0.0))
    table = gather_table(factors)
    assert table.aligned == (offset == 0)
    x = torch.randn(64, n_in, device=CUDA, generator=gen).to(dtype)
    out = torch.randn(64, n_out, device=CUDA, generator=gen).to(dtype)
    slots = (torch.arange(64, device=CUDA, dtype=torch.int32) % 4)[:, None]
    want = reference.add_gathered_lora(out.double(), x.double(), slots, _wide(factors))
    from lorakit.ops.triton.gathered import add_gathered_lora

    got = add_gathered_lora(out.clone(), x, slots, table)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, atol=tol * want.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("sizes", [(2048, 512, 512), (8192, 8192), (33, 100, 7)], ids=["qkv", "gate-up", "odd"])
@pytest.mark.parametrize("paths", [1, 2])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_the_group_kernels_add_each_siblings_adapters_as_float64_math_does(dtype, sizes, paths, compiled):
    """One shrink and one expand for siblings over the same x, each part its own table and output; compiled too,
    where a part's write hidden by an argument passed twice would leave that output as it was."""
    from lorakit import ops

    n_in = 96 if sizes[0] == 33 else 2048
    parts = [_factors(n_in, n, dtype, absent=(q,)) for q, n in enumerate(sizes)]  # each part lacks another adapter
    tables = [gather_table(f) for f in parts]
    gen = torch.Generator(CUDA).manual_seed(3)
    tokens = 19
    x = torch.randn(tokens, n_in, device=CUDA, generator=gen).to(dtype)
    outs = [torch.randn(tokens, n, device=CUDA, generator=gen).to(dtype) for n in sizes]
    slots = torch.randint(-1, len(RANKS), (tokens, paths), device=CUDA, generator=gen, dtype=torch.int32)
    want = [
        reference.add_gathered_lora(o.double(), x.double(), slots, _wide(f)) for o, f in zip(outs, parts, strict=True)
    ]
    call = ops.add_gathered_lora_group
    if compiled:
        torch._dynamo.reset()  # each case compiles the same lambda: the recompile limit would count them all
        call = torch.compile(lambda x, outs, slots: ops.add_gathered_lora_group(x, outs, slots, tables), fullgraph=True)
        got = call(x, [o.clone() for o in outs], slots)
    else:
        got = call(x, [o.clone() for o in outs], slots, tables)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for g, w, o in zip(got, want, outs, strict=True):
        torch.testing.assert_close(g.double(), w, atol=tol * w.abs().max().item(), rtol=tol)
        assert not torch.equal(g, o)  # every part written


def test_the_group_kernels_serve_siblings_of_different_rank_tiles_at_the_widest():
    """q's table with ranks up to 128 (a 128-wide tile), k's and v's up to 16, one unaligned: each part's rows
    masked by their own rank, as float64 math."""
    from lorakit import ops

    gen = torch.Generator(CUDA).manual_seed(4)
    n_in, sizes, ranks = 256, (256, 64, 64), ((128, 3, 16), (16, 1, 8), (7, 16, 2))
    parts = []
    for n, rs in zip(sizes, ranks, strict=True):
        a = [torch.randn(r, n_in, device=CUDA, generator=gen).div_(n_in**0.5).bfloat16() for r in rs]
        b = [torch.randn(n, r, device=CUDA, generator=gen).div_(r**0.5).bfloat16() for r in rs]
        parts.append([LoraFactors(a_, b_, 1.5 + g, 0.0) for g, (a_, b_) in enumerate(zip(a, b, strict=True))])
    tables = [gather_table(f) for f in parts]
    assert [t.block_r for t in tables] == [128, 16, 16] and not all(t.aligned for t in tables)
    x = torch.randn(24, n_in, device=CUDA, generator=gen).bfloat16()
    outs = [torch.randn(24, n, device=CUDA, generator=gen).bfloat16() for n in sizes]
    slots = torch.randint(-1, 3, (24, 1), device=CUDA, generator=gen, dtype=torch.int32)
    got = ops.add_gathered_lora_group(x, [o.clone() for o in outs], slots, tables)
    for g, o, f in zip(got, outs, parts, strict=True):
        want = reference.add_gathered_lora(o.double(), x.double(), slots, _wide(f))
        torch.testing.assert_close(g.double(), want, atol=2e-2 * want.abs().max().item(), rtol=2e-2)


@pytest.mark.parametrize("sizes", [(2048, 512, 512), (8192,), (33, 200)])
def test_base_products_and_terms_apart_match_float64_math_eagerly_and_replayed_in_a_graph(sizes):
    """ops.gathered_linear_group: each sibling's F.linear and its terms in fp32, summed as float64 math; recorded
    into a CUDA graph (the terms on a second stream beside the GEMVs) and replayed with a new x and new slots, the
    eager outputs for those: the graph waits for both branches."""
    from lorakit import ops

    n_in = 96 if sizes[0] == 33 else 2048
    parts = [_factors(n_in, n, torch.bfloat16, absent=(q,)) for q, n in enumerate(sizes)]
    tables = [gather_table(f) for f in parts]
    gen = torch.Generator(CUDA).manual_seed(5)
    weights = [torch.randn(n, n_in, device=CUDA, generator=gen).div_(n_in**0.5).bfloat16() for n in sizes]
    biases = [torch.randn(n, device=CUDA, generator=gen).bfloat16() if q == 0 else None for q, n in enumerate(sizes)]
    x = torch.randn(19, n_in, device=CUDA, generator=gen).bfloat16()
    slots = torch.randint(-1, len(RANKS), (19, 2), device=CUDA, generator=gen, dtype=torch.int32)

    def summed():
        outs, terms = ops.gathered_linear_group(x, weights, biases, slots, tables)
        assert all(t.dtype == torch.float32 for t in terms)
        return [(o + t).to(o.dtype) for o, t in zip(outs, terms, strict=True)]

    eager = summed()
    for got, w, b, f in zip(eager, weights, biases, parts, strict=True):
        base = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
        want = reference.add_gathered_lora(base, x.double(), slots, _wide(f))
        torch.testing.assert_close(got.double(), want, atol=2e-2 * want.abs().max().item(), rtol=2e-2)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the default stream, as torch's graph recipe asks
        summed()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        replayed = summed()
    x.copy_(torch.randn(19, n_in, device=CUDA, generator=gen))
    slots.copy_(torch.randint(-1, len(RANKS), (19, 2), device=CUDA, generator=gen, dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(replayed, summed(), strict=True):  # what a replay that did not wait would miss: all of it
        torch.testing.assert_close(got, want)


NAMES = [f"a{i}" for i in range(4)]


def _model(dtype: torch.dtype):
    model = get_lora_model(
        tiny_llama(dtype),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
        adapter_name=NAMES[0],
    )
    for i, name in enumerate(NAMES[1:]):  # ranks differ; one adapter leaves the MLP alone
        targets = ["q_proj", "v_proj"] if i == 1 else "all-linear"
        model.add_adapter(name, LoraConfig(r=8 * (i + 1), target_modules=targets, init_lora_weights=False))
    return model.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_decode_steps_follow_each_routing_in_one_graph(dtype):
    model = _model(dtype)
    ids = torch.randint(0, 256, (8, 1), device=CUDA, generator=torch.Generator(CUDA).manual_seed(1))
    routings = [NAMES * 2, NAMES[::-1] * 2, ["a1"] * 8, ["a0", "__base__"] * 4, ["a3", "a2"] * 4]
    tol = {"atol": 2e-4, "rtol": 2e-4} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    with torch.no_grad():
        eager = [model(input_ids=ids, adapter_names=names, use_cache=False).logits for names in routings]
        eager_forward = model.model.forward
        model.model.forward = torch.compile(eager_forward, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):  # the later rounds replay recorded graphs
            compiled = [model(input_ids=ids, adapter_names=names, use_cache=False).logits.clone() for names in routings]
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        assert all(layer._gather is not None for layer in layers)  # every routed layer reads its table
        siblings = [m for m in layers if m.path.rpartition(".")[2] in ("q_proj", "k_proj", "v_proj", "up_proj")]
        assert siblings and all(m._gather_group is not None for m in siblings)  # in one launch with their siblings
        for got, want in zip(compiled, eager, strict=True):
            torch.testing.assert_close(got, want, **tol)
        assert not torch.allclose(compiled[0], compiled[1])

        for layer in layers:  # in place, and a new scale: the replayed graphs read both where they are
            if "a1" in layer.adapters:
                layer.adapters["a1"].lora_B.mul_(-2)
                layer.adapters["a1"].scale *= 3
        after = model(input_ids=ids, adapter_names=routings[2], use_cache=False).logits.clone()
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # nothing compiled again
        model.model.forward = eager_forward
        want = model(input_ids=ids, adapter_names=routings[2], use_cache=False).logits
        torch.testing.assert_close(after, want, **tol)
        assert not torch.allclose(after, compiled[2])
