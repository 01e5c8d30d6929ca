"""Variant choice and refusals, LoRA+, PiSSA/OLoRA, LoRA-FA, Delta-LoRA: each against a reference that can fail."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

from lorakit import ConfigError, LoraConfig, LoraModel, TargetError, get_lora_model, ops
from lorakit.optim import create_loraplus_optimizer, create_optimizer
from lorakit.quant import NF4Linear
from tests.cases import conv_mlp


def _mlp(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10)).to(dtype)


# -- config: variant choice and refusals --------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"use_dora": True, "variant": "lora_fa"}, "use_dora=True cannot be combined"),
        ({"use_dora": True, "target_parameters": ["w"]}, "target_parameters"),
        ({"variant": "vera"}, "VeraConfig"),
        ({"variant": "qlora"}, "variant must be one of"),
        ({"init_lora_weights": "pissa_niter_x"}, "init_lora_weights"),
    ],
)
def test_nonsense_combinations_are_refused_at_config_time(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**kwargs)


def test_delta_lora_on_a_4bit_base_is_refused_before_any_change():
    model = nn.Sequential(NF4Linear.from_linear(nn.Linear(64, 64)))
    with pytest.raises(ConfigError, match="quantized"):
        get_lora_model(model, LoraConfig(target_modules=["0"], variant="delta_lora"))
    assert isinstance(model[0], NF4Linear)


def test_lora_fa_refuses_embeddings_and_pissa_refuses_convs():
    with pytest.raises(TargetError, match="lora_fa"):
        get_lora_model(conv_mlp(), LoraConfig(target_modules=["emb"], variant="lora_fa"))
    with pytest.raises(TargetError, match="pissa"):
        get_lora_model(conv_mlp(), LoraConfig(target_modules=["conv1"], init_lora_weights="pissa"))


def test_variant_field_round_trips_and_plain_lora_files_do_not_carry_it():
    assert "variant" not in LoraConfig().to_dict()
    assert LoraConfig.from_dict(LoraConfig(variant="lora_fa").to_dict()).variant == "lora_fa"
    assert LoraConfig.from_dict(LoraConfig(use_dora=True).to_dict()).use_dora


# -- LoRA+ ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer_cls", [torch.optim.AdamW, torch.optim.SGD])
def test_loraplus_gives_b_ratio_times_the_lr_and_embeddings_their_own(optimizer_cls):
    model = get_lora_model(conv_mlp(), LoraConfig(target_modules=["emb", "lin1"], use_dora=False))
    opt = create_loraplus_optimizer(model, optimizer_cls, lr=1e-3, loraplus_lr_embedding=1e-5)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    lin1, emb = model.model.lin1.adapters["default"], model.model.emb.adapters["default"]
    assert lr_of[id(lin1.lora_A)] == 1e-3
    assert lr_of[id(lin1.lora_B)] == pytest.approx(16e-3)
    assert lr_of[id(emb.lora_A)] == lr_of[id(emb.lora_B)] == 1e-5
    assert len(lr_of) == sum(p.requires_grad for p in model.parameters())


def test_loraplus_step_moves_b_by_ratio_times_a_step_with_sgd():
    """With SGD the update is lr * grad: B's is exactly 16x what lr alone would give."""
    model = get_lora_model(_mlp(), LoraConfig(target_modules=["0"], init_lora_weights=False))
    adapter = model.model[0].adapters["default"]
    opt = create_loraplus_optimizer(model, torch.optim.SGD, lr=0.1, loraplus_lr_ratio=16)
    before = adapter.lora_B.detach().clone()
    model(torch.randn(4, 12)).pow(2).sum().backward()
    grad = adapter.lora_B.grad.clone()
    opt.step()
    torch.testing.assert_close(adapter.lora_B.detach(), before - 1.6 * grad, atol=1e-6, rtol=0)


# -- PiSSA / OLoRA ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["pissa", "pissa_niter_4", "olora"])
def test_weight_inits_keep_the_output_and_convert_to_plain_lora_for_peft(mode, tmp_path):
    x = torch.randn(5, 12)
    base_out = _mlp()(x)
    model = get_lora_model(_mlp(), LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=mode))
    torch.testing.assert_close(model(x), base_out, atol=1e-5, rtol=0)
    layer = model.model[0]
    assert not torch.allclose(layer.weight, _mlp()[0].weight)  # the residual sits in W
    model.save_pretrained(tmp_path / "init")
    with torch.no_grad():  # "training"
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    trained = model(x).detach()
    model.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "init")
    theirs = peft.PeftModel.from_pretrained(_mlp(), tmp_path / "lora")  # the original W, not the residual
    assert theirs.peft_config["default"].r == 8
    torch.testing.assert_close(theirs(x), trained, atol=1e-5, rtol=0)
    ours = LoraModel.from_pretrained(_mlp(), tmp_path / "lora")
    torch.testing.assert_close(ours(x), trained, atol=1e-5, rtol=0)


def test_pissa_factors_equal_peft_ones():
    ours = get_lora_model(_mlp(), LoraConfig(r=3, lora_alpha=6, target_modules=["0"], init_lora_weights="pissa"))
    theirs = peft.get_peft_model(
        _mlp(), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0"], init_lora_weights="pissa")
    )
    adapter, layer = ours.model[0].adapters["default"], theirs.base_model.model[0]
    torch.testing.assert_close(adapter.lora_A, layer.lora_A["default"].weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(adapter.lora_B, layer.lora_B["default"].weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.model[0].weight, layer.base_layer.weight, atol=1e-5, rtol=0)


# -- LoRA-FA ----------------------------------------------------------------------------------------------
def test_lora_fa_op_matches_the_reference_with_gradients_in_float64():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    a, b = torch.randn(4, 8, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    got = ops.frozen_a_linear_contribution(x, a, b, 0.7)
    want = ops.linear_contribution(x, a, b, 0.7)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    g = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, (x, b), g)
    want_grads = torch.autograd.grad(want, (x, b), g)
    for mine, ref in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(mine, ref, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda x, b: ops.frozen_a_linear_contribution(x, a, b, 0.7), (x, b))


def test_lora_fa_under_bf16_autocast_gives_plain_loras_gradients():
    # backward runs outside autocast, with bf16 activations and fp32 factors: it must not mix the two in a matmul
    grads = {}
    for variant in ("lora", "lora_fa"):
        torch.manual_seed(0)
        config = LoraConfig(r=4, target_modules=["0", "2"], variant=variant, init_lora_weights=False)
        model = get_lora_model(_mlp(), config)
        x = torch.randn(16, 12, generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().sum().backward()
        grads[variant] = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    for name, grad in grads["lora_fa"].items():
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, grads["lora"][name], rtol=2e-2, atol=2e-2)


def test_lora_fa_trains_only_b_and_keeps_only_a_x_for_backward():
    model = get_lora_model(_mlp(), LoraConfig(r=2, target_modules=["0"], variant="lora_fa"))
    adapter = model.model[0].adapters["default"]
    assert [n for n, p in adapter.named_parameters() if p.requires_grad] == ["lora_B"]
    saved = []
    x = torch.randn(7, 12, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = adapter.contribution(model.model[0].base_layer, x)
    assert (7, 12) not in saved and (7, 2) in saved  # A x (r values per token), never x
    out.sum().backward()
    assert adapter.lora_B.grad is not None and x.grad is not None


def test_lora_fa_files_are_plain_lora_files_for_peft(tmp_path):
    model = get_lora_model(_mlp(), LoraConfig(target_modules=["0", "2"], variant="lora_fa", init_lora_weights=False))
    model.save_pretrained(tmp_path)
    x = torch.randn(3, 12)
    torch.testing.assert_close(peft.PeftModel.from_pretrained(_mlp(), tmp_path)(x), model(x), atol=1e-5, rtol=0)
    back = LoraModel.from_pretrained(_mlp(), tmp_path)
    assert back.peft_config["default"].variant == "lora_fa"
    torch.testing.assert_close(back(x), model(x), atol=1e-5, rtol=0)


# -- Delta-LoRA -----------------------------------------------------------------------------------------
def test_delta_lora_moves_w_by_exactly_the_change_of_s_b_a():
    model = get_lora_model(
        _mlp(torch.float64), LoraConfig(r=2, lora_alpha=4, target_modules=["0"], variant="delta_lora")
    )
    layer = model.model[0]
    adapter = layer.adapters["default"]
    opt = create_optimizer(model, torch.optim.AdamW, lr=1e-2)
    assert not layer.weight.requires_grad and all(
        id(layer.weight) != id(p) for g in opt.param_groups for p in g["params"]
    )
    for _ in range(3):
        w, a, b = layer.weight.detach().clone(), adapter.lora_A.detach().clone(), adapter.lora_B.detach().clone()
        model(torch.randn(4, 12, dtype=torch.float64)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        expected = w + 2.0 * (adapter.lora_B.detach() @ adapter.lora_A.detach() - b @ a)
        torch.testing.assert_close(layer.weight.detach(), expected, atol=1e-14, rtol=0)
    assert not torch.equal(layer.weight, _mlp(torch.float64)[0].weight)
    assert not opt.state.get(layer.weight)


def test_delta_lora_files_carry_the_changed_weights_both_ways(tmp_path):
    model = get_lora_model(_mlp(), LoraConfig(target_modules=["0"], variant="delta_lora"))
    opt = create_optimizer(model, torch.optim.SGD, lr=0.5)
    for _ in range(2):
        model(torch.randn(4, 12)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(tmp_path)
    x = torch.randn(3, 12)
    back = LoraModel.from_pretrained(_mlp(), tmp_path)
    torch.testing.assert_close(back(x), model(x), atol=1e-6, rtol=0)
    theirs = peft.PeftModel.from_pretrained(_mlp(), tmp_path)
    torch.testing.assert_close(theirs(x), model(x), atol=1e-5, rtol=0)
