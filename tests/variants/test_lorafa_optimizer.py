"""LoRA-FA's optimizer (lorakit.optim.create_lorafa_optimizer) against PEFT's and against float64 math."""

from __future__ import annotations

import copy

import peft
import peft.optimizers.lorafa as peft_lorafa
import pytest
import torch
from peft.optimizers import create_lorafa_optimizer as peft_lorafa_optimizer
from torch import nn

from lorakit import ConfigError, LoraConfig, VeraConfig, get_lora_model
from lorakit.io import adapter_tensors
from lorakit.optim import LoraFAOptimizer, create_lorafa_optimizer
from tests.cases import (
    conv_mlp,
    ids_input,
    positional,
    same_adapter_weights,
    step_side_by_side,
    tiny_bert_cls,
    tiny_llama,
)


def _loss(model, inputs) -> torch.Tensor:
    out = model(**inputs())
    return (out.logits if hasattr(out, "logits") else out).square().mean()


@pytest.mark.parametrize(
    ("build", "inputs", "config"),
    [
        (tiny_llama, ids_input(64), {"target_modules": "all-linear", "r": 4, "lora_alpha": 8}),
        (
            tiny_llama,
            ids_input(64),
            {"target_modules": ["q_proj", "down_proj"], "r": 4, "lora_alpha": 6, "use_rslora": True,
             "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"q_proj": 3}},
        ),
        (tiny_bert_cls, ids_input(64),
         {"target_modules": ["query", "value"], "r": 3, "modules_to_save": ["classifier"]}),
    ],
    ids=["llama-all-linear", "llama-rslora-patterns", "bert-saved-head"],
)  # fmt: skip
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["no-decay", "decay"])
def test_steps_equal_peft(monkeypatch, build, inputs, config, weight_decay):
    # PEFT projects under bf16 autocast wherever bf16 exists (the CPU too), which rounds the gradient; with that
    # off, both compute the same float32 math, so three steps agree to rounding
    monkeypatch.setattr(peft_lorafa, "is_bf16_available", lambda: False)
    ours, theirs = same_adapter_weights(build, config)
    r, alpha = config["r"], config.get("lora_alpha", 8)
    opts = [
        create_lorafa_optimizer(ours, r, alpha, lr=1e-2, weight_decay=weight_decay),
        peft_lorafa_optimizer(theirs, r, alpha, lr=1e-2, weight_decay=weight_decay),
    ]
    before = {
        k: v.detach().clone() for k, v in adapter_tensors(ours.model, "default", ours.peft_config["default"]).items()
    }
    step_side_by_side((ours, theirs), opts, inputs, steps=3)
    want = peft.get_peft_model_state_dict(theirs)
    got = adapter_tensors(ours.model, "default", ours.peft_config["default"])
    assert sorted(got) == sorted(want)
    for key, tensor in got.items():
        torch.testing.assert_close(tensor.detach(), want[key], atol=1e-6, rtol=1e-5, msg=key)
        if ".lora_A." in key:
            assert torch.equal(tensor, before[key]), f"{key}: A is frozen"
        elif ".lora_B." in key:
            assert not torch.equal(tensor, before[key]), f"{key}: B trained"


def _float64_step(a: torch.Tensor, b: torch.Tensor, grad_b: torch.Tensor, scale: float, lr: float) -> torch.Tensor:
    """B after one step of LoRA-FA's AdamW, in float64: g = g_B (A A^T + 1e-8 I)^-1 / s^2; m = 0.1 g, v = 1e-3 g^2;
    the bias-corrected step is lr * m_hat / (sqrt(v_hat) + eps) with eps applied before the correction."""
    a, b, g = (t.double().reshape(t.shape[0], -1) for t in (a, b, grad_b))
    g = g @ torch.linalg.inv(a @ a.T + 1e-8 * torch.eye(a.shape[0], dtype=torch.float64)) / scale**2
    m, v = 0.1 * g, 0.001 * g * g
    step = lr * (1 - 0.999) ** 0.5 / (1 - 0.9)
    return b - step * m / (v.sqrt() + 1e-6)


@pytest.mark.parametrize(
    ("build", "inputs", "target"),
    [(conv_mlp, positional(ids_input(20)), "conv2"), (conv_mlp, positional(ids_input(20)), "lin1")],
    ids=["conv2d", "linear"],
)
def test_one_step_equals_float64_math_on_linear_and_conv(build, inputs, target):
    # PEFT's pairing transposes a 4-D A and fails on a convolution; here A is flattened to r x in*k*k
    model = get_lora_model(build(), LoraConfig(target_modules=[target], r=3, lora_alpha=5, init_lora_weights=False))
    opt = create_lorafa_optimizer(model, 3, 5, lr=1e-3)
    adapter = dict(model.named_modules())[f"model.{target}"].adapters["default"]
    _loss(model, inputs).backward()
    a, b, grad = adapter.lora_A.detach().clone(), adapter.lora_B.detach().clone(), adapter.lora_B.grad.clone()
    assert adapter.lora_A.grad is None and not adapter.lora_A.requires_grad
    opt.step()
    want = _float64_step(a, b, grad, adapter.scale, 1e-3).reshape(b.shape)
    torch.testing.assert_close(adapter.lora_B.detach().double(), want, atol=1e-7, rtol=1e-6)
    assert torch.equal(adapter.lora_A, a)


def test_bf16_factors_train_with_the_projection_in_float32():
    # PEFT's pinv refuses bf16 factors; here the projection is float32 and B's step is rounded once, to bf16
    model = get_lora_model(conv_mlp(), LoraConfig(target_modules=["lin1"], r=4, init_lora_weights=False))
    model.to(torch.bfloat16)
    opt = create_lorafa_optimizer(model, 4, 8, lr=1e-3)
    adapter = model.model.lin1.adapters["default"]
    _loss(model, positional(ids_input(20))).backward()
    a, b, grad = adapter.lora_A.detach().clone(), adapter.lora_B.detach().clone(), adapter.lora_B.grad.clone()
    opt.step()
    want = _float64_step(a, b, grad, adapter.scale, 1e-3).to(torch.bfloat16)
    assert adapter.lora_B.dtype == torch.bfloat16
    torch.testing.assert_close(adapter.lora_B.detach(), want, atol=0, rtol=1e-2)


def test_a_a_transpose_is_inverted_once_per_a_and_again_after_a_changes(monkeypatch):
    calls = []
    pinv = torch.linalg.pinv
    monkeypatch.setattr(torch.linalg, "pinv", lambda m: calls.append(m.shape) or pinv(m))
    model = get_lora_model(conv_mlp(), LoraConfig(target_modules=["lin1", "lin2"], r=2, init_lora_weights=False))
    opt = create_lorafa_optimizer(model, 2, 8, lr=1e-3)
    for _ in range(3):
        _loss(model, positional(ids_input(20))).backward()
        opt.step()
        opt.zero_grad()
    assert len(calls) == 2
    with torch.no_grad():
        model.model.lin1.adapters["default"].lora_A.mul_(2.0)  # A changed in place: its inverse is stale
    _loss(model, positional(ids_input(20))).backward()
    opt.step()
    assert len(calls) == 3


def test_state_dict_round_trip_continues_the_same_steps():
    def build():
        model = get_lora_model(conv_mlp(), LoraConfig(target_modules=["lin1", "conv1"], r=2, init_lora_weights=False))
        return model, create_lorafa_optimizer(model, 2, 8, lr=1e-2, weight_decay=0.01)

    def step(model, opt):
        _loss(model, positional(ids_input(20))).backward()
        opt.step()
        opt.zero_grad()

    first, opt = build()
    for _ in range(2):
        step(first, opt)
    second, opt2 = build()
    second.load_state_dict(first.state_dict())
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # a state_dict holds the live state tensors
    step(first, opt)
    step(second, opt2)
    for (name, p), q in zip(first.named_parameters(), second.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_a_second_frozen_adapter_and_unused_b_are_left_alone():
    # PEFT's optimizer pairs tensors by name and fails on a B without a gradient (an inactive adapter)
    model = get_lora_model(conv_mlp(), LoraConfig(target_modules=["lin1"], r=2, init_lora_weights=False))
    model.add_adapter("other", LoraConfig(target_modules=["lin1"], r=2, init_lora_weights=False))
    other = model.model.lin1.adapters["other"]
    kept = other.lora_B.detach().clone()
    opt = create_lorafa_optimizer(model, 2, 8, lr=1e-2)
    _loss(model, positional(ids_input(20))).backward()
    opt.step()
    assert torch.equal(other.lora_B, kept)
    assert isinstance(opt, LoraFAOptimizer)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: get_lora_model(conv_mlp(), LoraConfig(target_modules=["lin1"], use_dora=True)), "dora"),
        (lambda: get_lora_model(conv_mlp(), VeraConfig(target_modules=["lin1", "lin2"], r=4)), "vera"),
        (lambda: get_lora_model(conv_mlp(), LoraConfig(target_modules=["emb"])), "starts at zero"),
    ],
    ids=["dora", "vera", "embedding"],
)
def test_adapters_lorafa_cannot_train_are_refused_by_name(make, message):
    with pytest.raises(ConfigError, match=message):
        create_lorafa_optimizer(make(), 8, 8, lr=1e-3)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((0, 8), {"lr": 1e-3}, "r must be"),
        ((8, -1.0), {"lr": 1e-3}, "lora_alpha must be"),
        ((8, 8), {"lr": float("nan")}, "lr must be"),
        ((8, 8), {"lr": 1e-3, "weight_decay": -0.1}, "weight_decay must be"),
        ((8, 8), {"lr": 1e-3, "betas": (0.9, 1.0)}, "betas"),
        ((8, 8), {"lr": 1e-3, "use_rslora": True}, "use_rslora"),
        ((8, 8), {"lr": 1e-3, "frozen": True}, "found nothing to train"),
    ],
)
def test_bad_arguments_get_one_clear_error(args, kwargs, message):
    model = get_lora_model(nn.Sequential(nn.Linear(4, 4)), LoraConfig(target_modules=["0"]))
    if kwargs.pop("frozen", False):
        model.set_requires_grad("default", False)
    with pytest.raises(ConfigError, match=message):
        create_lorafa_optimizer(model, *args, **kwargs)


def test_a_sharded_factor_is_refused_with_the_way_out():
    class DTensor(torch.Tensor):  # what FSDP2 makes of a parameter, as far as the check looks
        pass

    model = get_lora_model(nn.Sequential(nn.Linear(4, 4)), LoraConfig(target_modules=["0"]))
    adapter = model.model._modules["0"].adapters["default"]
    adapter.lora_A = nn.Parameter(torch.Tensor._make_subclass(DTensor, adapter.lora_A.detach()))
    with pytest.raises(ConfigError, match="sharded .FSDP.: LoRA-FA's projection needs each A whole"):
        create_lorafa_optimizer(model, 8, 8, lr=1e-3)


def test_lora_bias_trains_by_adamw_beside_the_projected_b():
    # PEFT pairs tensors by "lora" in their names, so lora_B's bias would be taken for the next layer's A there
    model = get_lora_model(
        conv_mlp(), LoraConfig(target_modules=["lin1", "lin2"], lora_bias=True, init_lora_weights=False)
    )
    opt = create_lorafa_optimizer(model, 8, 8, lr=1e-3)
    adapter = model.model.lin1.adapters["default"]
    _loss(model, positional(ids_input(20))).backward()
    a, b, grad = adapter.lora_A.detach().clone(), adapter.lora_B.detach().clone(), adapter.lora_B.grad.clone()
    bias, bias_grad = adapter.lora_B_bias.detach().clone(), adapter.lora_B_bias.grad.clone()
    opt.step()
    want = _float64_step(a, b, grad, adapter.scale, 1e-3).reshape(b.shape)
    torch.testing.assert_close(adapter.lora_B.detach().double(), want, atol=1e-7, rtol=1e-6)
    step = 1e-3 * (1 - 0.999) ** 0.5 / (1 - 0.9)  # adamw-hf's first step on the bias's own gradient
    g = bias_grad.double()
    want_bias = bias.double() - step * (0.1 * g) / ((0.001 * g * g).sqrt() + 1e-6)
    torch.testing.assert_close(adapter.lora_B_bias.detach().double(), want_bias, atol=1e-7, rtol=1e-6)
