"""DoRA's closed-form norm ||W + s B A|| (no W + dW formed) against float64 math and the materialising op; its
||W||^2 cache against weights changed in place; DoRA's gradients against a float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit import LoraConfig, get_lora_model, ops
from lorakit.inject import lora_layers
from lorakit.ops import low_rank_norm
from lorakit.variants import dora

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def _float64_norm(weight: torch.Tensor, adapter) -> torch.Tensor:
    """||W + s B A|| per output feature, all in float64, W + dW formed in the kind's layout."""
    delta = adapter.kind.delta(adapter.lora_A.detach().double(), adapter.lora_B.detach().double(), adapter.scale)
    combined = weight.detach().double() + delta
    out_axis = 1 if adapter.kind.transposed else 0
    return torch.linalg.vector_norm(combined, dim=tuple(d for d in range(combined.dim()) if d != out_axis))


@pytest.mark.parametrize("r", [1, 16, 64])
@pytest.mark.parametrize("transposed", [False, True], ids=["out_in", "in_out"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("chunk", [1 << 22, 100], ids=["whole", "chunked"])
@pytest.mark.parametrize("device", DEVICES)
def test_closed_form_equals_float64_and_the_materialising_op(device, dtype, transposed, r, chunk, monkeypatch):
    monkeypatch.setattr(low_rank_norm, "_CHUNK", chunk)  # 100 elements: a narrow W is upcast row by row
    if device == "cuda":  # TF32 would round the fp32 GEMMs to 10 bits
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(r)
    out_f, in_f, scale = 48, 80, 1.7
    factors = torch.float64 if dtype == torch.float64 else torch.float32
    weight = (0.05 * torch.randn(out_f, in_f)).to(device, dtype)
    lora_A = torch.randn(r, in_f, dtype=factors, device=device) / in_f**0.5
    lora_B = 0.05 * torch.randn(out_f, r, dtype=factors, device=device)  # ||dW|| a sizable fraction of ||W||
    stored = weight.T.contiguous() if transposed else weight
    got = ops.low_rank_weight_norm(stored, lora_A, lora_B, scale, transposed=transposed)
    want = (weight.double() + scale * lora_B.double() @ lora_A.double()).norm(dim=1)
    assert got.dtype == factors and got.shape == (out_f,)
    # CUDA's bf16 W: A split into two bf16 halves (16 bits), float32 sums: within a few fp32 roundings
    tol = 1e-13 if dtype == torch.float64 else 3e-6 if device == "cuda" else 1e-6
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=0)
    delta = scale * lora_B @ lora_A
    materialised = ops.weight_norm(stored, delta.T if transposed else delta, out_axis=1 if transposed else 0)
    torch.testing.assert_close(got, materialised, rtol=2 * tol, atol=0)


@pytest.mark.parametrize("transposed", [False, True], ids=["out_in", "in_out"])
def test_split_bf16_product_equals_float64(transposed, monkeypatch):
    # CUDA's path for a bf16 W (mm with a float32 out_dtype, which only CUDA has): emulated here by the same math,
    # bf16 operands multiplied exactly and summed in float32, so the halves' layout is checked everywhere
    real = torch.mm

    def emulated(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        assert a.dtype == b.dtype == torch.bfloat16 and out_dtype == torch.float32
        return real(a.float(), b.float())

    monkeypatch.setattr(torch, "mm", emulated)
    torch.manual_seed(0)
    weight = (0.05 * torch.randn(40, 64)).bfloat16()
    lora_A = torch.randn(16, 64) / 8
    got = low_rank_norm._split_bf16_product(weight.T.contiguous() if transposed else weight, lora_A, transposed)
    want = weight.double() @ lora_A.double().T
    assert got.shape == (40, 16) and got.dtype == torch.float32
    assert (got.double() - want).norm() / want.norm() < 1e-5
    rounded_a = (weight.double() @ lora_A.bfloat16().double().T - want).norm() / want.norm()
    assert rounded_a > 1e-4  # what A in plain bf16 would lose: the split is what keeps it


def test_bf16_factors_get_a_bf16_norm_and_train():
    # computed in fp32, returned in the factors' dtype: a bf16 adapter on a bf16 base runs without autocast
    torch.manual_seed(0)
    model = _Kinds().to(torch.bfloat16)
    config = LoraConfig(r=4, target_modules=["lin", "c1d", "emb"], use_dora=True, init_lora_weights=False)
    model = get_lora_model(model, config, adapter_dtype=torch.bfloat16)
    for _, layer in lora_layers(model.model):
        adapter = layer.adapters["default"]
        norm = dora._column_norm(adapter, layer.stored_weight)
        assert norm.dtype == torch.bfloat16
        torch.testing.assert_close(norm.double(), _float64_norm(layer.stored_weight, adapter), rtol=4e-3, atol=0)
    ids = torch.randint(0, 30, (2, 5))
    model.model.c1d(torch.tanh(model.model.lin(model.model.emb(ids)))).float().square().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_closed_form_takes_no_gradient_and_ignores_autocast():
    torch.manual_seed(0)
    weight = torch.randn(12, 10, dtype=torch.bfloat16)
    lora_A = torch.randn(3, 10, requires_grad=True)
    lora_B = torch.randn(12, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.low_rank_weight_norm(weight, lora_A, lora_B, 0.5, transposed=False)
    assert not got.requires_grad and got.dtype == torch.float32
    want = (weight.double() + 0.5 * lora_B.detach().double() @ lora_A.detach().double()).norm(dim=1)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


class _Kinds(nn.Module):
    """Embedding -> Linear -> GPT-2 Conv1D (transposed) -> Conv2d: the closed form's three kinds and one it skips."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 24)
        self.lin = nn.Linear(24, 20)
        self.c1d = Conv1D(16, 20)  # weight (in x out) = (20 x 16)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.c1d(torch.tanh(self.lin(self.emb(ids))))  # (b, t, 16)
        return self.conv(h[:, None]).flatten(1)


def _dora_model(base_dtype: torch.dtype = torch.float32, targets=("emb", "lin", "c1d", "conv")):
    torch.manual_seed(0)
    model = _Kinds().to(base_dtype)
    for name, r in (("a", 1), ("b", 8), ("c", 64)):
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), use_dora=True, init_lora_weights=False)
        if name == "a":
            model = get_lora_model(model, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    return model


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_adapter_norm_equals_float64_closed_form_only_where_w_is_plain(base_dtype, monkeypatch):
    model = _dora_model(base_dtype)
    materialised = []
    full = ops.weight_norm
    monkeypatch.setattr(ops, "weight_norm", lambda w, *a, **k: materialised.append(w.shape) or full(w, *a, **k))
    for _, layer in lora_layers(model.model):
        weight = layer.stored_weight
        for adapter in layer.adapters.values():
            got = dora._column_norm(adapter, weight)
            torch.testing.assert_close(got.double(), _float64_norm(weight, adapter), rtol=1e-6, atol=0)
    assert set(materialised) == {model.model.conv.weight.shape}  # conv kinds keep forming W + dW


def test_squares_are_cached_and_recomputed_after_in_place_changes(monkeypatch):
    model = _dora_model(targets=("lin", "c1d"))
    layer = model.model.lin
    weight, b = layer.stored_weight, layer.adapters["b"]
    computed = []
    full = low_rank_norm._sum_of_squares
    monkeypatch.setattr(low_rank_norm, "_sum_of_squares", lambda w, *a: computed.append(1) or full(w, *a))

    def check(recomputed: bool) -> None:
        before = len(computed)
        torch.testing.assert_close(dora._column_norm(b, weight).double(), _float64_norm(weight, b), rtol=1e-6, atol=0)
        assert len(computed) == before + recomputed

    check(False)  # cached when the adapters were initialised
    check(False)
    with torch.no_grad():
        weight.copy_(1.5 * weight)  # an in-place load
    check(True)
    model.merge_adapter(["a"])  # W <- rescaled W + dW_a, in place
    assert model.model.lin.merged_adapters == ["a"]
    check(True)
    model.unmerge_adapter()
    check(True)
    check(False)
    layer.base_layer.weight.data = 2 * weight.detach()  # a new storage under the same Parameter
    check(True)


def test_weights_that_train_and_writes_through_data():
    torch.manual_seed(0)
    weight = torch.randn(6, 5)
    lora_A, lora_B = torch.randn(2, 5), torch.randn(6, 2)

    def norm(w: torch.Tensor) -> torch.Tensor:
        return ops.low_rank_weight_norm(w, lora_A, lora_B, 1.0, transposed=False)

    trained = nn.Parameter(weight.clone())
    norm(trained)
    assert all(entry.ref() is not trained for entry in low_rank_norm._CACHE.values())  # never cached
    frozen = nn.Parameter(weight.clone(), requires_grad=False)
    norm(frozen)
    frozen.data.copy_(3 * weight)  # bypasses the version counter: the documented way out is clear_norm_cache()
    low_rank_norm.clear_norm_cache()
    torch.testing.assert_close(norm(frozen), (3 * weight + lora_B @ lora_A).norm(dim=1), rtol=1e-6, atol=0)


def _float64_reference(model, ids: torch.Tensor) -> torch.Tensor:
    """The DoRA paper's forward with the old materialising norm, in float64: each adapted weight is replaced by
    W' = (m / ||W + dW||) * (W + dW), the norm a constant (no gradient)."""
    inner = model.model
    weights = {}
    for name in ("emb", "lin", "c1d"):
        layer = getattr(inner, name)
        adapter = layer.adapters["a"]
        weight = layer.stored_weight.detach().double()
        lora_A, lora_B = adapter.lora_A.double(), adapter.lora_B.double()
        combined = weight + adapter.kind.delta(lora_A, lora_B, adapter.scale)
        axis = 0 if adapter.kind.transposed else 1
        ratio = adapter.variant_state.lora_magnitude_vector.double() / combined.detach().norm(dim=axis)
        weights[name] = combined * (ratio[None, :] if adapter.kind.transposed else ratio[:, None])
    h = F.embedding(ids, weights["emb"])
    h = torch.tanh(F.linear(h, weights["lin"], inner.lin.base_layer.bias.double()))
    return h @ weights["c1d"] + inner.c1d.base_layer.bias.double()


def test_dora_gradients_equal_a_float64_reference_of_the_materialising_path():
    model = _dora_model(targets=("emb", "lin", "c1d"))
    model.set_adapter("a")
    with torch.no_grad():  # magnitudes away from ||W + dW||, so m / n matters
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(torch.rand_like(param) + 0.5)
    ids = torch.randint(0, 30, (3, 7), generator=torch.Generator().manual_seed(1))
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in n for n in trained) and len(trained) == 9

    inner = model.model
    got = inner.c1d(torch.tanh(inner.lin(inner.emb(ids))))
    got.square().sum().backward()
    ours = {n: p.grad.clone() for n, p in trained.items()}
    model.zero_grad()
    want = _float64_reference(model, ids)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    want.square().sum().backward()
    for name, param in trained.items():
        atol = 1e-6 * param.grad.abs().max().item()  # fp32 against float64: relative to the gradient's size
        torch.testing.assert_close(ours[name], param.grad, rtol=1e-5, atol=atol, msg=name)


def test_dropout_under_autocast_skips_casting_w_and_changes_no_bit(monkeypatch):
    # with dropout, DoRA multiplies the dropped-out input by W itself; under autocast W (bf16) is no longer cast to
    # the adapters' fp32 first, since autocast casts it straight back: outputs and gradients must be bit for bit
    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = _Kinds().to(torch.bfloat16)
        config = LoraConfig(
            r=4, target_modules=["lin", "c1d"], use_dora=True, lora_dropout=0.3, init_lora_weights=False
        )
        model = get_lora_model(model, config).train()
        h = torch.randn(2, 5, 24, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(2)  # the same dropout masks on both runs
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.model.c1d(torch.tanh(model.model.lin(h)))
        out.float().square().sum().backward()
        return out, [p.grad for p in model.parameters() if p.requires_grad]

    skipped, skipped_grads = run()
    monkeypatch.setattr(dora, "_for_product", lambda weight, dtype, device_type: weight.to(dtype))
    cast, cast_grads = run()
    assert torch.equal(skipped, cast)
    assert len(cast_grads) == 6 and all(torch.equal(a, b) for a, b in zip(skipped_grads, cast_grads, strict=True))


def test_dora_compiles_in_one_graph_and_matches_eager():
    # the ||W||^2 cache (tensor identity, version counter) is not traceable: under torch.compile it is skipped
    model = _dora_model(targets=("emb", "lin", "c1d"))
    model.set_adapter("b")
    inner = model.model
    ids = torch.randint(0, 30, (2, 5), generator=torch.Generator().manual_seed(1))

    def forward(ids: torch.Tensor) -> torch.Tensor:
        return inner.c1d(torch.tanh(inner.lin(inner.emb(ids))))

    compiled = torch.compile(forward, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(ids), forward(ids), rtol=1e-6, atol=1e-6)
