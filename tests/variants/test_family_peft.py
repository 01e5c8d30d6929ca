"""The LoRA family against PEFT where the earlier checks stopped: LoRA+'s step, orthogonal init, PiSSA with K=0
subspace iterations, and the inputs each of them refuses."""

from __future__ import annotations

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer as peft_loraplus_optimizer
from torch import nn

from lorakit import ConfigError, LoraConfig, LoraModel, TargetError, VeraConfig, get_lora_model
from lorakit.io import adapter_tensors
from lorakit.optim import create_loraplus_optimizer
from lorakit.variants import init as weight_init
from tests.cases import conv_mlp, ids_input, positional, same_adapter_weights, step_side_by_side, tiny_bert_cls


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10))


_SAVED = ["classifier", "LayerNorm"]


# -- LoRA+ ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("build", "inputs", "config"),
    [  # an embedding adapter with DoRA's magnitude, trained biases (bias="all"), lora_bias and a LayerNorm copy
        (conv_mlp, positional(ids_input(20)), {"target_modules": ["emb", "lin1"], "use_dora": True, "bias": "all"}),
        (tiny_bert_cls, ids_input(64), {"target_modules": ["query"], "lora_bias": True, "modules_to_save": _SAVED}),
    ],
    ids=["convmlp-dora-bias", "bert-lora-bias"],
)
@pytest.mark.parametrize("decay", [{}, {"loraplus_weight_decay": 0.1}], ids=["no-decay", "decay"])
@pytest.mark.filterwarnings("ignore:Adapter .default.:UserWarning")
def test_loraplus_steps_equal_peft(build, inputs, config, decay):
    # PEFT's groups: every 1-D tensor learns at lr * ratio (DoRA's magnitude on an embedding, biases), each group
    # decays by loraplus_weight_decay (0 by default, not the optimizer's own) except biases and LayerNorm weights
    ours, theirs = same_adapter_weights(build, config)
    kwargs = {"lr": 1e-2, "loraplus_lr_ratio": 4, "loraplus_lr_embedding": 1e-3, **decay}
    opts = [
        create_loraplus_optimizer(ours, torch.optim.AdamW, **kwargs),
        peft_loraplus_optimizer(theirs, torch.optim.AdamW, **kwargs),
    ]
    step_side_by_side((ours, theirs), opts, inputs, steps=2)
    want = peft.get_peft_model_state_dict(theirs)
    got = adapter_tensors(ours.model, "default", ours.peft_config["default"])
    assert sorted(got) == sorted(want)
    for key, tensor in got.items():
        torch.testing.assert_close(tensor.detach(), want[key], atol=1e-6, rtol=1e-5, msg=key)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loraplus_lr_ratio": 0}, "loraplus_lr_ratio"),
        ({"loraplus_lr_ratio": -2.0}, "loraplus_lr_ratio"),
        ({"loraplus_lr_ratio": float("nan")}, "loraplus_lr_ratio"),
        ({"loraplus_lr_ratio": float("inf")}, "loraplus_lr_ratio"),
        ({"loraplus_lr_ratio": "16"}, "loraplus_lr_ratio"),
        ({"loraplus_lr_embedding": -1e-6}, "loraplus_lr_embedding"),
        ({"weight_decay": 0.1}, "loraplus_weight_decay"),
    ],
)
def test_loraplus_bad_arguments_get_one_clear_error(kwargs, message):
    model = get_lora_model(_mlp(), LoraConfig(target_modules=["0"]))
    with pytest.raises(ConfigError, match=message):
        create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, **kwargs)


# -- init_lora_weights="orthogonal" (PEFT's: B A = 0, W untouched) ------------------------------------------
def test_orthogonal_init_draws_peft_factors_for_a_seed_and_files_load_both_ways(tmp_path):
    x = torch.randn(5, 12)
    config = {"r": 4, "target_modules": ["0", "2"], "init_lora_weights": "orthogonal"}
    ours = get_lora_model(_mlp(), LoraConfig(**config))
    torch.testing.assert_close(ours(x), _mlp()(x), atol=1e-6, rtol=0)  # B A = 0, W as it was
    theirs = peft.get_peft_model(_mlp(), peft.LoraConfig(**config))
    adapter, layer = ours.model[0].adapters["default"], theirs.base_model.model[0]
    with torch.no_grad():
        torch.manual_seed(11)
        weight_init.orthogonal_init(adapter)
        torch.manual_seed(11)
        layer.orthogonal_init("default")
    assert adapter.lora_A.abs().min() > 0 and adapter.lora_B.abs().max() > 0
    torch.testing.assert_close(adapter.lora_A, layer.lora_A["default"].weight, atol=1e-7, rtol=0)
    torch.testing.assert_close(adapter.lora_B, layer.lora_B["default"].weight, atol=1e-7, rtol=0)
    ours.save_pretrained(tmp_path)
    assert LoraModel.from_pretrained(_mlp(), tmp_path).peft_config["default"].init_lora_weights == "orthogonal"
    torch.testing.assert_close(peft.PeftModel.from_pretrained(_mlp(), tmp_path)(x), ours(x), atol=1e-6, rtol=0)


def test_orthogonal_init_refuses_odd_ranks_and_convolutions():
    with pytest.raises(ConfigError, match="even"):
        LoraConfig(r=3, init_lora_weights="orthogonal")
    with pytest.raises(ConfigError, match=r"even.*\[5\]"):
        LoraConfig(r=4, rank_pattern={"lin1": 5}, init_lora_weights="orthogonal")
    with pytest.raises(TargetError, match="linear layers only"):
        get_lora_model(conv_mlp(), LoraConfig(r=2, target_modules=["conv1"], init_lora_weights="orthogonal"))


# -- PiSSA / OLoRA, and the inits lorakit leaves to PEFT -----------------------------------------------------
@pytest.mark.parametrize("mode", ["pissa_niter_0", "olora"])
def test_weight_init_factors_and_residual_equal_peft(mode):
    # pissa_niter_0: PEFT takes any K >= 0 (a randomized SVD without subspace iterations)
    config = {"r": 3, "lora_alpha": 6, "target_modules": ["0"], "init_lora_weights": mode, "use_rslora": True}
    torch.manual_seed(5)
    ours = get_lora_model(_mlp(), LoraConfig(**config))
    torch.manual_seed(5)
    theirs = peft.get_peft_model(_mlp(), peft.LoraConfig(**config))
    adapter, layer = ours.model[0].adapters["default"], theirs.base_model.model[0]
    torch.testing.assert_close(adapter.lora_A, layer.lora_A["default"].weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(adapter.lora_B, layer.lora_B["default"].weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.model[0].weight, layer.base_layer.weight, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("mode", "fix"), [("eva", "initialize_lora_eva_weights"), ("mica", "train it with PEFT"), ("corda", "path_initial")]
)
def test_inits_lorakit_leaves_to_peft_say_what_to_use_instead(mode, fix):
    with pytest.raises(ConfigError, match=fix):
        LoraConfig(init_lora_weights=mode)
    if mode != "corda":  # a saved EVA / MiCA adapter is a plain LoRA
        assert LoraConfig.from_dict({"init_lora_weights": mode}).init_lora_weights is True


def test_vera_seed_out_of_generator_range_is_refused_at_config_time():
    with pytest.raises(ConfigError, match="projection_prng_key"):
        VeraConfig(r=4, target_modules=["q_proj"], projection_prng_key=2**64)
