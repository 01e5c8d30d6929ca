"""VeRA against PEFT (same seed, same files both ways) and QLoRA's NF4 math against float references."""

from __future__ import annotations

import importlib.util

import peft
import pytest
import torch
from torch import nn

from lorakit import LoraConfig, LoraModel, VeraConfig, get_lora_model
from lorakit.io import adapter_tensors
from lorakit.quant import (
    NF4_LEVELS,
    NF4Linear,
    base_weight_bytes_per_param,
    dequantize_model,
    quantize_model,
    quantize_nf4,
)
from tests.cases import ids_input, tiny_llama


def _run(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**ids_input(64)()).logits


def _perturb(model, *names) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(n in name for n in names):
                param.add_(torch.randn_like(param) * 0.3)


VERA = {"r": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], "projection_prng_key": 7}


@pytest.mark.parametrize("save_projection", [True, False])
def test_vera_files_both_ways_with_peft(save_projection, tmp_path):
    torch.manual_seed(0)
    ours = get_lora_model(tiny_llama(), VeraConfig(save_projection=save_projection, **VERA)).eval()
    _perturb(ours, "vera_lambda")
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    assert not torch.equal(_run(ours), _run(tiny_llama().eval()))
    torch.testing.assert_close(_run(theirs), _run(ours), atol=1e-5, rtol=0)

    peft_model = peft.get_peft_model(tiny_llama(), peft.VeraConfig(save_projection=save_projection, **VERA))
    _perturb(peft_model, "vera_lambda")
    peft_model.eval().save_pretrained(tmp_path / "theirs")
    back = LoraModel.from_pretrained(tiny_llama(), tmp_path / "theirs").eval()
    assert isinstance(back.peft_config["default"], VeraConfig)
    torch.testing.assert_close(_run(back), _run(peft_model), atol=1e-5, rtol=0)


def test_vera_trains_only_d_and_b_with_10x_fewer_parameters_than_lora():
    vera = get_lora_model(tiny_llama(), VeraConfig(**VERA))
    lora = get_lora_model(tiny_llama(), LoraConfig(r=8, target_modules=VERA["target_modules"]))
    trainable = {n.rsplit(".", 1)[-1] for n, p in vera.named_parameters() if p.requires_grad}
    assert trainable == {"vera_lambda_b", "vera_lambda_d"}
    assert vera.get_nb_trainable_parameters()[0] * 10 <= lora.get_nb_trainable_parameters()[0]


def test_vera_pair_stays_one_tensor_after_the_model_moves():
    # model.to() converts each module's buffers separately: a pair shared as a tensor would become one copy per
    # layer (and would no longer match the saved one); a shared module is converted once
    model = get_lora_model(tiny_llama(), VeraConfig(save_projection=True, **VERA)).to(torch.float64)
    adapters = [m for m in model.modules() if hasattr(m, "vera_lambda_d")]
    pairs = {(a.vera_shared.vera_A.data_ptr(), a.vera_shared.vera_B.data_ptr()) for a in adapters}
    assert len(adapters) == 6 and len(pairs) == 1
    assert adapters[0].vera_shared.vera_A.dtype == torch.float64
    saved = adapter_tensors(model.model, "default", model.peft_config["default"])
    assert saved["base_model.vera_A"].data_ptr() == adapters[0].vera_shared.vera_A.data_ptr()


def test_vera_merge_equals_unmerged():
    model = get_lora_model(tiny_llama(), VeraConfig(**VERA)).eval()
    _perturb(model, "vera_lambda")
    expected = _run(model)
    torch.testing.assert_close(_run(model.merge_and_unload()), expected, atol=1e-5, rtol=0)


def test_dora_with_vera_is_refused():
    from lorakit import ConfigError

    with pytest.raises(ConfigError, match="use_dora"):
        VeraConfig.from_dict({"peft_type": "VERA", "r": 4, "use_dora": True})


# -- QLoRA -----------------------------------------------------------------------------------------------
def test_nf4_dequantized_within_nf4_error_and_about_half_a_byte_per_weight():
    torch.manual_seed(0)
    weight = torch.randn(256, 192) * 0.02
    module = NF4Linear.from_linear(nn.Linear(192, 256).requires_grad_(False).to(torch.float32))
    with torch.no_grad():
        module.weight = weight
    blocks = weight.flatten().reshape(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    half_gap = (NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max() / 2
    error = (module.weight.flatten().reshape(-1, 64) - blocks).abs()
    assert (error <= absmax * (half_gap + 0.01)).all()  # nearest level, plus the 8-bit absmax's own error
    assert error.mean() < 0.1 * weight.abs().mean()
    assert 0.50 <= module.storage_bytes() / weight.numel() <= 0.53
    assert quantize_nf4(weight)["packed"].dtype == torch.uint8


def test_qlora_forward_is_dequantized_linear_plus_lora_and_merge_exports_16_bit():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    quantize_model(base)
    assert 0.5 <= base_weight_bytes_per_param(base) <= 0.53
    model = get_lora_model(base, LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False))
    x = torch.randn(5, 64)
    layer = model.model[0]
    adapter = layer.adapters["default"]
    want = nn.functional.linear(x, layer.weight, layer.bias) + adapter.scale * x @ adapter.lora_A.T @ adapter.lora_B.T
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=0)
    expected = model(x).detach()
    dequantize_model(model.model)  # 16-bit export first, then an exact merge
    merged = model.merge_and_unload()
    assert isinstance(merged[0], nn.Linear)
    torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=0)


def test_qlora_merge_requantizes_in_place():
    torch.manual_seed(0)
    model = get_lora_model(
        quantize_model(nn.Sequential(nn.Linear(64, 64))), LoraConfig(target_modules=["0"], init_lora_weights=False)
    )
    layer = model.model[0]
    want = layer.weight + layer.adapters["default"].delta_weight().detach()
    merged = model.merge_and_unload()
    assert isinstance(merged[0], NF4Linear)
    blocks = want.flatten().reshape(-1, 64)
    error = (merged[0].weight.flatten().reshape(-1, 64) - blocks).abs()
    assert (error <= blocks.abs().amax(1, keepdim=True) * 0.17).all()


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
    reason="the bitsandbytes backend needs CUDA and bitsandbytes",
)
def test_bitsandbytes_backend_matches_nf4_reference():
    torch.manual_seed(0)
    linear = nn.Linear(128, 64).half()
    ours = NF4Linear.from_linear(linear)
    theirs = quantize_model(nn.Sequential(linear), backend="bitsandbytes")[0]
    x = torch.randn(4, 128, device="cuda", dtype=torch.half)
    torch.testing.assert_close(theirs(x).float().cpu(), ours(x.cpu().float()).float(), atol=5e-2, rtol=0)


def test_a_folder_without_projections_refuses_a_config_with_another_key(tmp_path):
    """Only the saved key recreates the pair such a folder was trained with; another key would change every output."""
    from lorakit import AdapterFileError

    config = VeraConfig(r=4, target_modules=["q_proj", "v_proj"], save_projection=False, projection_prng_key=3)
    get_lora_model(tiny_llama(), config).save_pretrained(tmp_path)
    other = VeraConfig(r=4, target_modules=["q_proj", "v_proj"], save_projection=False, projection_prng_key=4)
    with pytest.raises(AdapterFileError, match="projection_prng_key=3"):
        LoraModel.from_pretrained(tiny_llama(), tmp_path, config=other)
    same = VeraConfig(r=4, target_modules=["q_proj", "v_proj"], save_projection=False, projection_prng_key=3)
    LoraModel.from_pretrained(tiny_llama(), tmp_path, config=same)  # the saved key: loads
