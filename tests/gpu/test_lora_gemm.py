"""The inference GEMMs with the LoRA term inside (lorakit/ops/triton/lora_gemm.py) against float64 math, and the
inference path's choice of them (a decode step's few rows; a prefill's many rows on a GPU with a TMA unit),
eagerly, compiled and replayed in a CUDA graph."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lorakit import ops
from lorakit.ops.reference import LoraFactors

HAS_KERNELS = torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(not HAS_KERNELS, reason="the triton kernels need CUDA and triton")
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}  # relative (norm) error of bf16/fp16 operands


def _operands(rows, n_in, n_out, rank, dtype, with_bias, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to("cuda", dtype)

    x, w = randn(rows, n_in), randn(n_out, n_in, scale=n_in**-0.5)
    a, b = randn(rank, n_in, scale=n_in**-0.5), randn(n_out, rank, scale=0.5)
    return x, w, randn(n_out) if with_bias else None, a, b


def _gold(x, w, bias, a, b, scale):
    x, w, a, b = (t.double() for t in (x, w, a, b))
    y = x @ w.T + scale * (x @ a.T) @ b.T
    return y if bias is None else y + bias.double()


def _rel(out, gold) -> float:
    return ((out.double() - gold).norm() / gold.norm()).item()


BF16, FP16 = torch.bfloat16, torch.float16
CASES = [  # rows (few: t in the K loop; more: t by a GEMM first), in, out, rank, dtype, bias: odd shapes and ranks
    (1, 96, 80, 1, BF16, True), (4, 2048, 512, 16, BF16, False), (5, 203, 141, 7, FP16, True),
    (16, 520, 48, 128, BF16, True), (3, 8192, 64, 16, BF16, False), (2, 64, 8192, 33, FP16, True),
    (17, 64, 33, 64, FP16, False), (64, 300, 129, 16, BF16, True), (65, 203, 141, 1, BF16, False),
    (300, 520, 200, 128, FP16, True),
]  # fmt: skip


@pytest.mark.parametrize("rows,n_in,n_out,rank,dtype,with_bias", CASES)
def test_lora_gemm_matches_float64_math(rows, n_in, n_out, rank, dtype, with_bias):
    from lorakit.ops.triton.lora_gemm import lora_gemm

    x, w, bias, a, b = _operands(rows, n_in, n_out, rank, dtype, with_bias)
    y = lora_gemm(x, w, bias, a, b, 0.75)
    assert y.dtype == dtype and y.shape == (rows, n_out)
    gold, without = _gold(x, w, bias, a, b, 0.75), _gold(x, w, bias, a, b * 0, 0.75)
    assert _rel(y, gold) < TOLERANCE[dtype]
    assert _rel(y.double() - without, gold - without) < 5 * TOLERANCE[dtype]  # the LoRA term itself, not only W x


@pytest.mark.parametrize("rows", [3, 200, 600])
def test_lora_gemm_reads_strided_rows(rows):
    """x as a column slice of a wider tensor (a fused QKV's input view), through both kernels."""
    from lorakit.ops.triton.lora_gemm import lora_gemm, lora_gemm_prefill

    x, w, bias, a, b = _operands(rows, 256, 192, 16, torch.bfloat16, True)
    wide = torch.cat([x, x], 1)[:, 256:]
    assert wide.stride(0) == 512
    gold = _gold(x, w, bias, a, b, 2.0)
    assert _rel(lora_gemm(wide, w, bias, a, b, 2.0), gold) < TOLERANCE[torch.bfloat16]
    if _has_tma():
        assert _rel(lora_gemm_prefill(wide, w, bias, a, b, 2.0), gold) < TOLERANCE[torch.bfloat16]


def _has_tma() -> bool:
    return torch.cuda.get_device_capability()[0] >= 9


needs_tma = pytest.mark.skipif(not HAS_KERNELS or not _has_tma(), reason="the prefill kernel needs a TMA unit (sm90+)")
PREFILL_CASES = [  # rows, in, out, rank, dtype, bias, t in the K loop (None: prefill_tiles' choice)
    (512, 2048, 2048, 16, BF16, False, None), (700, 136, 520, 7, FP16, True, None),
    (513, 200, 2056, 4, BF16, True, None), (1024, 64, 1032, 64, BF16, False, None),
    (600, 520, 2048, 24, FP16, False, True), (600, 520, 512, 24, BF16, True, False),
    (1500, 1024, 8192, 1, BF16, True, None),
]  # fmt: skip


@needs_tma
@pytest.mark.parametrize("rows,n_in,n_out,rank,dtype,with_bias,shrink", PREFILL_CASES)
def test_prefill_kernel_matches_float64_math(rows, n_in, n_out, rank, dtype, with_bias, shrink):
    """Odd rows, outputs and ranks (the TMA unit zero-fills and clips the edges), both ways of making t."""
    from lorakit.ops.triton.lora_gemm import lora_gemm_prefill, prefill_tiles

    x, w, bias, a, b = _operands(rows, n_in, n_out, rank, dtype, with_bias)
    tiles = prefill_tiles(n_out, rank)[0] if shrink is not None else None
    y = lora_gemm_prefill(x, w, bias, a, b, 0.75, tiles, shrink)
    assert y.dtype == dtype and y.shape == (rows, n_out)
    gold, without = _gold(x, w, bias, a, b, 0.75), _gold(x, w, bias, a, b * 0, 0.75)
    assert _rel(y, gold) < TOLERANCE[dtype]
    assert _rel(y.double() - without, gold - without) < 5 * TOLERANCE[dtype]  # the LoRA term itself, not only W x
    assert _rel(lora_gemm_prefill(x, w, bias, None, None, 0.75), without) < TOLERANCE[dtype]


@needs_tma
def test_prefill_operands_the_tma_unit_cannot_address_go_through_cublas():
    """A row stride or address off 16 bytes: prefill_ready says no where the trace can tell (strides), and the
    kernel's own call checks the addresses too."""
    from lorakit.ops.triton.lora_gemm import lora_gemm_prefill, prefill_ready

    x, w, bias, a, b = _operands(600, 128, 256, 16, BF16, True)
    shifted = torch.cat([x.new_zeros(1), x.flatten()])[1:].view(600, 128)  # 2 bytes off an aligned address
    odd_rows = torch.cat([x, x[:, :4]], 1)[:, :128]  # rows 264 bytes apart
    assert shifted.data_ptr() % 16 and not prefill_ready(odd_rows, w, bias, a, b)
    for view in (shifted, odd_rows):
        assert torch.equal(view, x)
        assert _rel(lora_gemm_prefill(view, w, bias, a, b, 2.0), _gold(x, w, bias, a, b, 2.0)) < 1e-2
    assert prefill_ready(x, w, bias, a, b) and not prefill_ready(x, w[:252], bias[:252], a, b[:252])  # out % 8


@needs_tma
@pytest.mark.parametrize("n_adapters", [1, 2])
def test_compiled_prefill_takes_the_persistent_kernel_and_follows_changed_factors(n_adapters):
    """Compiled (CUDA graphs), a prefill's rows run the persistent kernel from the compiled code; a factor changed
    in place is read by the next replay. Eagerly a layer this small keeps the composite, and so does a compiled one
    with too few output tiles for the card's SMs."""
    from torch._inductor.utils import run_and_get_code

    from lorakit.ops.triton import fused_linear

    torch._dynamo.reset()
    x, w, bias, adapters = _layer(1024, n_adapters=n_adapters, n_out=1024)
    step = torch.compile(lambda x: ops.lora_linear(x, w, bias, adapters, False), fullgraph=True, mode="reduce-overhead")
    with torch.no_grad():
        y, code = run_and_get_code(step, x)
        y = y.clone()
        assert "lora_gemm_prefill" in "\n".join(code)
        assert _rel(y, _adapters_gold(x, w, bias, adapters)) < TOLERANCE[torch.bfloat16]
        for _ in range(2):
            step(x)
        adapters[0].lora_B.mul_(-2.0)
        again = step(x).clone()
        assert _rel(again, _adapters_gold(x, w, bias, adapters)) < TOLERANCE[torch.bfloat16]
        assert _rel(again, y.double()) > 0.05
        assert fused_linear._kernel_for(x, w, bias, adapters[0].lora_A, adapters[0].lora_B) is None
    torch._dynamo.reset()
    x, w, bias, adapters = _layer(600, n_adapters=n_adapters)  # 20 tiles of 64 x 128
    with torch.no_grad():
        y, code = run_and_get_code(torch.compile(lambda x: ops.lora_linear(x, w, bias, adapters, False)), x)
    assert "lora_gemm_prefill" not in "\n".join(code)
    assert _rel(y, _adapters_gold(x, w, bias, adapters)) < TOLERANCE[torch.bfloat16]


@needs_tma
def test_eager_prefill_of_a_large_layer_takes_the_kernel(monkeypatch):
    """Eagerly, where the GEMM outlasts a launch from Python (rows x in x out >= 2^34), the kernel serves too."""
    from lorakit.ops.triton import lora_gemm as module

    x, w, bias, a, b = _operands(2048, 2048, 4096, 16, BF16, False)
    adapters = [LoraFactors(a, b, 2.0, 0.0)]
    calls = []
    kernel = module.lora_gemm_prefill
    monkeypatch.setattr(module, "lora_gemm_prefill", lambda *args: calls.append(1) or kernel(*args))
    with torch.no_grad():
        y = ops.lora_linear(x, w, bias, adapters, False)
    assert calls and _rel(y, _gold(x, w, bias, a, b, 2.0)) < TOLERANCE[torch.bfloat16]


def _layer(rows, dtype=torch.bfloat16, n_adapters=1, n_out=160):
    x, w, bias, a, b = _operands(rows, 192, n_out, 8, dtype, True)
    adapters = [LoraFactors(a, b, 2.0, 0.1)]
    for k in range(1, n_adapters):
        _, _, _, a2, b2 = _operands(rows, 192, n_out, 4, dtype, False, seed=k)
        adapters.append(LoraFactors(a2.float(), b2.float(), 0.5, 0.0))  # fp32 master factors: cast, kept
    return x, w, bias, adapters


def _adapters_gold(x, w, bias, adapters):
    y = x.double() @ w.double().T + bias.double()
    for f in adapters:
        y = y + f.scale * (x.double() @ f.lora_A.double().T) @ f.lora_B.double().T
    return y


@pytest.mark.parametrize("rows,fused", [(1, True), (16, True), (17, False)])
@pytest.mark.parametrize("n_adapters", [1, 2])
def test_compiled_inference_of_a_decode_steps_rows_takes_the_one_kernel(rows, fused, n_adapters, monkeypatch):
    """Compiled, few rows run lora_gemm's kernel (launched from the compiled code); eagerly, and for more rows,
    the cuBLAS composite (a triton launch from Python costs an eager step more than it saves)."""
    from torch._inductor.utils import run_and_get_code

    from lorakit.ops.triton import lora_gemm as module

    torch._dynamo.reset()
    x, w, bias, adapters = _layer(rows, n_adapters=n_adapters)
    gold = _adapters_gold(x, w, bias, adapters)
    with torch.no_grad():
        y, code = run_and_get_code(torch.compile(lambda x: ops.lora_linear(x, w, bias, adapters, False)), x)
        assert ("lora_gemm_kernel" in "\n".join(code)) == fused
        assert _rel(y, gold) < TOLERANCE[torch.bfloat16]
        monkeypatch.setattr(module, "lora_gemm", lambda *args, **kw: pytest.fail("an eager call took lora_gemm"))
        assert _rel(ops.lora_linear(x, w, bias, adapters, False), gold) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("dtype,training", [(torch.float32, False), (torch.bfloat16, True)], ids=["fp32", "dropout"])
def test_fp32_and_training_keep_their_paths(dtype, training):
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    x, w, bias, adapters = _layer(4, dtype)
    with torch.no_grad():
        _, code = run_and_get_code(torch.compile(lambda x: ops.lora_linear(x, w, bias, adapters, training)), x)
    assert "lora_gemm_kernel" not in "\n".join(code)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_decode_launches_the_kernel_and_follows_changed_factors(mode):
    """Compiled, the kernel is launched from the compiled code (a triton_op); replayed in a CUDA graph, a factor
    changed in place (a hot swap's copy_) is read by the next replay."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    x, w, bias, adapters = _layer(4)
    step = torch.compile(lambda x: ops.lora_linear(x, w, bias, adapters, False), fullgraph=True, mode=mode)
    with torch.no_grad():
        y, code = run_and_get_code(step, x)
        y = y.clone()  # a CUDA graph's output is overwritten by the next replay
        assert "lora_gemm_kernel" in "\n".join(code)
        assert _rel(y, _adapters_gold(x, w, bias, adapters)) < TOLERANCE[torch.bfloat16]
        for _ in range(2):
            step(x)  # recorded and replayed under reduce-overhead
        adapters[0].lora_B.mul_(-2.0)
        again = step(x).clone()
    assert _rel(again, _adapters_gold(x, w, bias, adapters)) < TOLERANCE[torch.bfloat16]
    assert _rel(again, y.double()) > 0.05


GROUP_CASES = [  # rows, in, the parts' (out, rank, bias), dtype: two and three parts, odd shapes and ranks
    (4, 2048, [(2048, 16, False), (512, 16, False), (512, 16, False)], BF16),
    (1, 96, [(80, 1, True), (33, 7, False)], FP16),
    (16, 520, [(48, 128, True), (200, 64, True), (7, 1, True)], BF16),
    (5, 203, [(141, 33, False), (141, 16, True)], BF16),
    (3, 2048, [(8192, 16, False), (8192, 16, False)], BF16),
]  # fmt: skip


@pytest.mark.parametrize("rows,n_in,parts,dtype", GROUP_CASES)
def test_lora_gemm_group_matches_float64_math_part_by_part(rows, n_in, parts, dtype):
    from lorakit.ops.triton.lora_gemm import lora_gemm_group

    x = _operands(rows, n_in, 8, 1, dtype, False)[0]
    operands = [_operands(rows, n_in, n_out, rank, dtype, bias, seed=i + 1)[1:] for i, (n_out, rank, bias) in
                enumerate(parts)]  # fmt: skip
    scales = [0.5 + i for i in range(len(parts))]
    outs = lora_gemm_group(x, *(list(t) for t in zip(*operands, strict=True)), scales)
    for y, (w, bias, a, b), scale in zip(outs, operands, scales, strict=True):
        gold, without = _gold(x, w, bias, a, b, scale), _gold(x, w, bias, a, b * 0, scale)
        assert y.dtype == dtype and y.shape == (rows, w.shape[0])
        assert _rel(y, gold) < TOLERANCE[dtype]
        assert _rel(y.double() - without, gold - without) < 5 * TOLERANCE[dtype]


@pytest.mark.parametrize("case", [GROUP_CASES[0], GROUP_CASES[2], GROUP_CASES[4]], ids=["qkv", "bias", "gate-up"])
def test_the_compiled_group_op_writes_every_part(case):
    """Compiled (the op's kernel launched from inductor's code, each written argument its own), as eagerly."""
    from lorakit.ops.triton.lora_gemm import lora_gemm_group_op

    torch._dynamo.reset()
    rows, n_in, parts, dtype = case
    x = _operands(rows, n_in, 8, 1, dtype, False)[0]
    operands = [_operands(rows, n_in, n_out, rank, dtype, bias, seed=i + 1)[1:] for i, (n_out, rank, bias) in
                enumerate(parts)]  # fmt: skip
    weights, biases, lora_as, lora_bs = (list(t) for t in zip(*operands, strict=True))
    scales = [0.5 + i for i in range(len(parts))]
    step = torch.compile(lambda x: lora_gemm_group_op(x, weights, biases, lora_as, lora_bs, scales), fullgraph=True)
    with torch.no_grad():
        outs = step(x)
    for y, (w, bias, a, b), scale in zip(outs, operands, scales, strict=True):
        assert _rel(y, _gold(x, w, bias, a, b, scale)) < TOLERANCE[dtype]


@pytest.mark.parametrize("rows,grouped", [(4, True), (17, False)])
def test_a_compiled_decode_step_runs_q_k_v_and_gate_up_as_one_launch_each(rows, grouped):
    """A compiled step of a few rows computes each group of siblings (q, k, v; gate, up) with one kernel, the
    others (o, down) with lora_gemm's own; more rows keep each layer's own path. Outputs as the eager model's."""
    from torch._inductor.utils import run_and_get_code

    from lorakit import LoraConfig, get_lora_model, packed
    from tests.gpu.models import tiny_llama

    torch._dynamo.reset()
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    model = get_lora_model(tiny_llama(BF16), config, "a0", adapter_dtype=BF16).eval()
    ids = torch.randint(0, 256, (rows, 1), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad():
        eager = model(input_ids=ids, use_cache=False).logits.float()
        model.model.forward = torch.compile(model.model.forward, fullgraph=True)
        model(input_ids=ids, use_cache=False)  # asks for the pack
        out, code = run_and_get_code(lambda: model(input_ids=ids, use_cache=False).logits.float())
    text = "\n".join(code)
    assert ("lora_gemm_group_kernel" in text) == grouped
    assert packed.STASH.pending is None and not packed.BROKEN
    assert (out - eager).abs().max().item() < 2e-2 * eager.abs().max().item()


PREFILL_GROUP = [(1024, 16, True), (512, 8, False), (512, 5, True)]  # (out, rank, bias): t's columns off 16 bytes too


def _prefill_group(rows: int = 2048, n_in: int = 512, dtype=BF16):
    x = _operands(rows, n_in, 8, 1, dtype, False)[0]
    parts = [_operands(rows, n_in, n, r, dtype, bias, seed=i + 1)[1:] for i, (n, r, bias) in enumerate(PREFILL_GROUP)]
    return x, parts


@needs_tma
def test_prefill_group_matches_float64_math_part_by_part():
    """s x A^T of every part from one GEMM over the stacked A, each part's kernel reading its columns of it (the
    last part's start and width off the TMA unit's 16 bytes: copied apart first)."""
    from lorakit.ops.triton.lora_gemm import lora_gemm_prefill_group

    x, parts = _prefill_group()
    weights, biases, lora_as, lora_bs = (list(t) for t in zip(*parts, strict=True))
    outs = lora_gemm_prefill_group(x, weights, biases, torch.cat(lora_as), lora_bs, 0.75)
    for y, (w, bias, a, b) in zip(outs, parts, strict=True):
        gold, without = _gold(x, w, bias, a, b, 0.75), _gold(x, w, bias, a, b * 0, 0.75)
        assert y.shape == (x.shape[0], w.shape[0]) and _rel(y, gold) < TOLERANCE[BF16]
        assert _rel(y.double() - without, gold - without) < 5 * TOLERANCE[BF16]


@needs_tma
def test_a_compiled_prefill_group_takes_one_shrink_for_its_parts():
    """Compiled, lora_linear_group with the parts' A side by side runs the group op; with one part's scale
    different (it rides in the one GEMM) each part keeps its own path. Outputs as float64 math either way."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    x, parts = _prefill_group()
    stacked = torch.cat([a for _, _, a, _ in parts])
    for scales, grouped in (([0.5] * 3, True), ([0.5, 0.5, 2.0], False)):
        group = [(w, bias, LoraFactors(a, b, s, 0.0)) for (w, bias, a, b), s in zip(parts, scales, strict=True)]
        step = torch.compile(lambda x, g=group: ops.lora_linear_group(x, g, False, stacked), fullgraph=True)
        with torch.no_grad():
            outs, code = run_and_get_code(step, x)
        assert ("lora_gemm_prefill_group" in "\n".join(code)) == grouped
        for y, (w, bias, a, b), s in zip(outs, parts, scales, strict=True):
            assert _rel(y, _gold(x, w, bias, a, b, s)) < TOLERANCE[BF16]
        torch._dynamo.reset()
