"""The rest of PEFT's LoRA surface: lora_bias, trainable tokens, nn.MultiheadAttention; parity with PEFT both ways."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

from lorakit import ConfigError, LoraConfig, LorakitError, LoraModel, TargetError, get_lora_model
from tests.cases import conv_mlp, mlp

ATOL = 1e-5


# -- lora_bias -----------------------------------------------------------------------------------------------------
def test_lora_bias_merges_s_times_its_bias_into_the_base_bias():
    model = get_lora_model(mlp(), LoraConfig(target_modules=["lin0"], lora_bias=True, lora_alpha=4, r=2))
    adapter = model.model.lin0.adapters["default"]
    assert adapter.lora_B_bias.abs().sum() == 0  # starts at the base model, as PEFT's zero init does
    with torch.no_grad():
        adapter.lora_B_bias.normal_()
    before = model.model.lin0.base_layer.bias.detach().clone()
    expected = before + 2.0 * adapter.lora_B_bias.detach()  # s = alpha / r = 2
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged.lin0.bias.detach(), expected, atol=1e-6, rtol=0)


def test_lora_bias_gradient_equals_peft():
    torch.manual_seed(0)
    ours = get_lora_model(mlp(), LoraConfig(target_modules=["lin0", "lin1"], lora_bias=True, init_lora_weights=False))
    theirs = peft.get_peft_model(mlp(), peft.LoraConfig(target_modules=["lin0", "lin1"], lora_bias=True))
    peft.set_peft_model_state_dict(theirs, _peft_state(ours))
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    ours(x).square().sum().backward()
    theirs(x).square().sum().backward()
    grad = ours.model.lin0.adapters["default"].lora_B_bias.grad
    torch.testing.assert_close(grad, theirs.base_model.model.lin0.lora_B["default"].bias.grad, atol=1e-5, rtol=1e-5)


def _peft_state(model: LoraModel) -> dict[str, torch.Tensor]:
    from lorakit.io import adapter_tensors

    return {k: v.detach() for k, v in adapter_tensors(model.model, "default", model.peft_config["default"]).items()}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"use_dora": True}, "use_dora"),
        ({"target_parameters": ["lin0.weight"], "target_modules": None}, "target_parameters"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights True or False"),
    ],
)
def test_lora_bias_refuses_what_peft_refuses(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**{"target_modules": ["lin0"], "lora_bias": True, **kwargs})


def test_lora_bias_refuses_embeddings_before_any_change():
    model = conv_mlp()
    before = [type(m) for m in model.modules()]
    with pytest.raises(TargetError, match="embeddings.*exclude emb"):
        get_lora_model(model, LoraConfig(target_modules=["lin1", "emb"], lora_bias=True))
    assert [type(m) for m in model.modules()] == before


def test_lora_bias_on_a_layer_without_bias_runs_but_refuses_to_merge():
    model = nn.Sequential(nn.Linear(4, 3, bias=False))
    lora = get_lora_model(model, LoraConfig(target_modules=["0"], lora_bias=True, init_lora_weights=False))
    x = torch.randn(2, 4)
    with torch.no_grad():
        expected = lora(x)
    with pytest.raises(LorakitError, match="none to merge it into"):
        lora.merge_adapter()
    torch.testing.assert_close(lora(x).detach(), expected)  # nothing was changed

