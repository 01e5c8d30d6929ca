"""Several target_parameters on one module (a fused MoE block's gate_up_proj and down_proj), one layer each, nested as
PEFT nests its ParamWrappers: the same file keys, outputs, merging and deleting as PEFT, one or more adapters."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import transformers
from torch import nn

from lorakit import LoraConfig, LoraModel, TargetError, get_lora_model
from lorakit.io import adapter_tensors

ATOL = 1e-5
EXPERTS = "base_model.model.model.layers.0.mlp.experts"


def _mixtral() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, num_local_experts=2, num_experts_per_tok=2,
    )  # fmt: skip
    return transformers.MixtralForCausalLM(config).eval()


def _run(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _config(parameters: list[str], **extra) -> dict:
    return {"target_parameters": parameters, "init_lora_weights": False, **extra}


def _shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in tensors.items()}


def _expert_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The stored expert weights (merged adapters in them, live ones not)."""
    experts = model.get_submodule("model.layers.0.mlp.experts")
    experts = getattr(experts, "weight_host", experts)
    stored = getattr(experts, "parametrizations", {})
    return {
        name: (stored[name].original if name in stored else getattr(experts, name)).detach().clone()
        for name in ("gate_up_proj", "down_proj")
    }


@pytest.mark.parametrize("order", [["gate_up_proj", "down_proj"], ["down_proj", "gate_up_proj"]])
def test_two_parameters_of_one_module_match_peft_both_ways(order: list[str], tmp_path):
    torch.manual_seed(2)
    ours = get_lora_model(_mixtral(), LoraConfig(**_config(order))).eval()
    expected = _run(ours)
    assert not torch.allclose(expected, _run(_mixtral()), atol=1e-4), "the adapters must change the output"
    torch.manual_seed(2)
    theirs = peft.get_peft_model(_mixtral(), peft.LoraConfig(**_config(order)))
    keys = _shapes(adapter_tensors(ours.model, "default", ours.peft_config["default"]))
    assert keys == _shapes(peft.get_peft_model_state_dict(theirs))
    assert {f"{EXPERTS}.base_layer.lora_A.weight", f"{EXPERTS}.lora_A.weight"} <= set(keys)  # gate_up_proj inner

    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(_mixtral(), tmp_path / "ours").eval()
    torch.testing.assert_close(_run(back), expected, atol=ATOL, rtol=0)
    theirs.eval().save_pretrained(tmp_path / "theirs")
    loaded = LoraModel.from_pretrained(_mixtral(), tmp_path / "theirs").eval()
    torch.testing.assert_close(_run(loaded), _run(theirs), atol=ATOL, rtol=0)


def test_merge_unmerge_copy_and_unload_with_two_parameters():
    base = _expert_weights(_mixtral())
    ours = get_lora_model(_mixtral(), LoraConfig(**_config(["gate_up_proj", "down_proj"]))).eval()
    expected = _run(ours)
    twin = copy.deepcopy(ours)
    torch.testing.assert_close(_run(twin), expected, atol=0, rtol=0)
    ours.merge_adapter()
    merged = _expert_weights(ours.model)
    assert all(not torch.equal(merged[name], base[name]) for name in base), "both weights take their delta"
    torch.testing.assert_close(_run(ours), expected, atol=ATOL, rtol=0)
    ours.unmerge_adapter()
    for name, weight in _expert_weights(ours.model).items():
        torch.testing.assert_close(weight, base[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(_run(ours), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(_run(twin.merge_and_unload()), expected, atol=ATOL, rtol=0)
    unloaded = ours.unload()
    assert type(unloaded.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    torch.testing.assert_close(_run(unloaded), _run(_mixtral()), atol=ATOL, rtol=0)  # unmerged within rounding


def test_second_adapter_on_the_same_parameters_matches_peft_and_deletes(tmp_path):
    config = _config(["gate_up_proj", "down_proj"])
    torch.manual_seed(2)
    ours = get_lora_model(_mixtral(), LoraConfig(**config))
    ours.add_adapter("other", LoraConfig(**config, r=4))
    torch.manual_seed(2)
    theirs = peft.get_peft_model(_mixtral(), peft.LoraConfig(**config))
    theirs.add_adapter("other", peft.LoraConfig(**config, r=4))
    for name in ("default", "other"):
        keys = _shapes(adapter_tensors(ours.model, name, ours.peft_config[name]))
        assert keys == _shapes(peft.get_peft_model_state_dict(theirs, adapter_name=name))
    ours.set_adapter("other")
    expected = _run(ours.eval())
    ours.save_pretrained(tmp_path, selected_adapters=["other"])
    back = peft.PeftModel.from_pretrained(_mixtral(), tmp_path / "other").eval()
    torch.testing.assert_close(_run(back), expected, atol=ATOL, rtol=0)
    ours.delete_adapter("default")
    torch.testing.assert_close(_run(ours), expected, atol=0, rtol=0)
    assert set(adapter_tensors(ours.model, "other", ours.peft_config["other"])) == set(
        peft.get_peft_model_state_dict(theirs, adapter_name="other")
    )


def test_adapters_on_different_parameters_are_keyed_as_each_alone(tmp_path):
    """PEFT refuses adapters that target different parameters; lorakit keys each adapter's weights as PEFT keys
    that adapter alone, so each file loads in PEFT."""
    ours = get_lora_model(_mixtral(), LoraConfig(**_config(["down_proj"])))
    ours.add_adapter("both", LoraConfig(**_config(["gate_up_proj", "down_proj"])))
    ours.add_adapter("gate_up", LoraConfig(**_config(["gate_up_proj"])))
    for name, parameters in (
        ("default", ["down_proj"]),
        ("both", ["gate_up_proj", "down_proj"]),
        ("gate_up", ["gate_up_proj"]),
    ):
        alone = peft.get_peft_model(_mixtral(), peft.LoraConfig(**_config(parameters)))
        keys = _shapes(adapter_tensors(ours.model, name, ours.peft_config[name]))
        assert keys == _shapes(peft.get_peft_model_state_dict(alone)), name
        ours.set_adapter(name)
        expected = _run(ours.eval())
        ours.save_pretrained(tmp_path, selected_adapters=[name])
        folder = tmp_path if name == "default" else tmp_path / name
        torch.testing.assert_close(
            _run(peft.PeftModel.from_pretrained(_mixtral(), folder).eval()), expected, atol=ATOL, rtol=0
        )
        torch.testing.assert_close(
            _run(LoraModel.from_pretrained(_mixtral(), folder).eval()), expected, atol=ATOL, rtol=0
        )


def test_a_module_and_its_parameter_are_not_both_adapted():
    with pytest.raises(TargetError, match=r"q_proj is already adapted as linear.*as a whole \(target_modules\)"):
        get_lora_model(_mixtral(), LoraConfig(target_modules=["q_proj"], target_parameters=["q_proj.weight"]))
    ours = get_lora_model(_mixtral(), LoraConfig(target_parameters=["q_proj.weight"]))
    with pytest.raises(TargetError, match=r"q_proj is already adapted as parameter \(weight\)"):
        ours.add_adapter("other", LoraConfig(target_modules=["q_proj"]))


def test_dropout_with_all_linear_on_fused_experts_names_where_the_weight_targets_came_from() -> None:
    """all-linear on a fused MoE model adapts the expert weights as parameters (as PEFT does), which take no
    dropout: the error says so, although the user never wrote target_parameters."""
    from lorakit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"lora_dropout must be 0 for .*experts.*all-linear"):
        get_lora_model(_mixtral(), LoraConfig(target_modules="all-linear", lora_dropout=0.1))
    config = LoraConfig(target_modules="all-linear", lora_dropout=0.0)
    model = get_lora_model(_mixtral(), config)
    keys = adapter_tensors(model.model, "default", model.peft_config["default"])
    assert any(".experts." in key for key in keys)


def test_a_file_of_target_parameters_alone_loads_in_peft_without_its_default_modules(tmp_path):
    """An adapter of target_parameters only is saved with target_modules [] (not null, which PEFT reads as its
    default modules for the architecture and adapts them too, from no tensors), so PEFT loads exactly it."""
    from tests.cases import tiny_llama

    ours = get_lora_model(tiny_llama(), LoraConfig(**_config(["mlp.up_proj.weight"]))).eval()
    expected = _run(ours)
    assert not torch.allclose(expected, _run(tiny_llama()), atol=1e-4), "the adapter must change the output"
    ours.save_pretrained(tmp_path)
    back = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    adapted = {n.split(".lora_A")[0] for n, _ in back.named_parameters() if ".lora_A" in n}
    assert adapted == {f"base_model.model.model.layers.{i}.mlp.up_proj" for i in range(2)}
    torch.testing.assert_close(_run(back), expected, atol=ATOL, rtol=0)
    again = LoraModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(_run(again), expected, atol=ATOL, rtol=0)
