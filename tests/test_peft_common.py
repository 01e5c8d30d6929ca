"""PEFT's common checks (tests/testing_common.py, PeftCommonTester), LoRA's part: the same steps run with PEFT and with
lorakit on the same base weights and factors give the same outputs, files, errors, warnings and states."""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable

import peft
import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraModel, get_lora_model, set_peft_model_state_dict
from lorakit.inject import lora_layers, saved_modules
from tests.cases import tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_opt, tiny_t5

ATOL = 1e-5


IDS = torch.tensor([[5, 9, 3, 17, 2], [8, 1, 30, 4, 11]])
MODELS: dict[str, tuple[Callable[[], nn.Module], dict]] = {  # name -> (base, LoRA config)
    "llama": (tiny_llama, {"target_modules": ["q_proj", "v_proj"]}),
    "opt": (tiny_opt, {"target_modules": ["q_proj", "v_proj", "fc1"]}),
    "gpt2": (tiny_gpt2, {"target_modules": ["c_attn", "c_fc"]}),
    "bert": (tiny_bert_cls, {"target_modules": ["query", "value"], "task_type": "SEQ_CLS"}),
    "t5": (tiny_t5, {"target_modules": ["q", "v"], "task_type": "SEQ_2_SEQ_LM"}),
}
GENERATING = ["llama", "opt", "t5"]


def _inputs(model_name: str) -> dict[str, torch.Tensor]:
    if model_name == "t5":
        return {"input_ids": IDS, "decoder_input_ids": IDS[:, :3]}
    return {"input_ids": IDS}


def _config(model_name: str, library, **extra):
    """The model's LoRA config in `library` (peft or lorakit), with random factors so that every check can fail."""
    return library.LoraConfig(**{"r": 4, "init_lora_weights": False, **MODELS[model_name][1], **extra})


def _pair(model_name: str, name: str = "default", **extra) -> tuple[peft.PeftModel, LoraModel]:
    """PEFT's model and ours on the same base weights, adapter `name` holding the same factors (and head copy)."""
    build = MODELS[model_name][0]
    torch.manual_seed(11)
    theirs = peft.get_peft_model(build(), _config(model_name, peft, **extra), adapter_name=name)
    ours = get_lora_model(build(), _config(model_name, lorakit, **extra), adapter_name=name)
    _copy_adapter(theirs, ours, name)
    return theirs, ours


def _copy_adapter(theirs: peft.PeftModel, ours: LoraModel, name: str) -> None:
    state = peft.get_peft_model_state_dict(theirs, adapter_name=name)
    set_peft_model_state_dict(ours, state, adapter_name=name)


def _add(theirs: peft.PeftModel, ours: LoraModel, model_name: str, name: str, **extra) -> None:
    torch.manual_seed(12)
    theirs.add_adapter(name, _config(model_name, peft, **extra))
    ours.add_adapter(name, _config(model_name, lorakit, **extra))
    _copy_adapter(theirs, ours, name)


def _out(model: nn.Module, model_name: str, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs(model_name), **kwargs)[0]


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def _warnings(action: Callable[[], object]) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return sorted({str(w.message) for w in caught if issubclass(w.category, UserWarning)})


# -- files: save_pretrained with selected adapters, from_pretrained, load_adapter ------------------------------------
@pytest.mark.parametrize("model_name", ["llama", "bert", "t5"])
def test_save_pretrained_selected_adapters_as_peft(model_name, tmp_path):
    theirs, ours = _pair(model_name)
    _add(theirs, ours, model_name, "new_adapter")
    theirs.save_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    for folder in ("", "new_adapter"):
        assert _files(tmp_path / "ours" / folder) == _files(tmp_path / "theirs" / folder)
    back = peft.PeftModel.from_pretrained(MODELS[model_name][0](), tmp_path / "ours").eval()
    back.load_adapter(tmp_path / "ours" / "new_adapter", "new_adapter")
    ours.eval()
    for name in ("default", "new_adapter"):
        back.set_adapter(name)
        ours.set_adapter(name)
        _close(_out(back, model_name), _out(ours, model_name))
    ours.save_pretrained(tmp_path / "one", selected_adapters=["default"])
    theirs.save_pretrained(tmp_path / "one_theirs", selected_adapters=["default"])
    assert _files(tmp_path / "one") == _files(tmp_path / "one_theirs")


def _files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("model_name", ["llama", "bert"])
def test_load_adapter_returns_peft_s_load_result(model_name, tmp_path):
    theirs, _ = _pair(model_name)
    theirs.save_pretrained(tmp_path)
    peft_model = peft.PeftModel.from_pretrained(MODELS[model_name][0](), tmp_path)
    ours = LoraModel.from_pretrained(MODELS[model_name][0](), tmp_path)
    for name in ("other", "yet-another"):
        expected = peft_model.load_adapter(tmp_path, adapter_name=name)
        got = ours.load_adapter(tmp_path, adapter_name=name)
        assert got.missing_keys == expected.missing_keys == []
        assert got.unexpected_keys == expected.unexpected_keys


@pytest.mark.parametrize("is_trainable", [False, True])
def test_from_pretrained_config_and_training_mode_as_peft(is_trainable, tmp_path):
    """GPT-2 has dropout: a model loaded for inference is put in eval mode, so its outputs are PEFT's."""
    theirs, _ = _pair("gpt2")
    theirs.save_pretrained(tmp_path)
    bases = [tiny_gpt2().train(), tiny_gpt2().train()]
    config = _config("gpt2", peft)
    loaded = peft.PeftModel.from_pretrained(bases[0], tmp_path, is_trainable=is_trainable, config=config)
    ours = LoraModel.from_pretrained(bases[1], tmp_path, is_trainable=is_trainable, config=_config("gpt2", lorakit))
    assert ours.peft_config["default"].inference_mode == loaded.peft_config["default"].inference_mode
    assert ours.training == loaded.training == is_trainable
    assert {m.training for m in ours.modules()} == {m.training for m in loaded.modules()} == {is_trainable}
    if not is_trainable:
        _close(_out(ours, "gpt2"), _out(loaded, "gpt2"))
    ours.train()
    ours.load_adapter(tmp_path, "frozen")
    assert not ours.training


def test_from_pretrained_takes_peft_s_device_map(tmp_path):
    theirs, _ = _pair("llama")
    theirs.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path, device_map={"": "cpu"})
    ours = LoraModel.from_pretrained(tiny_llama(), tmp_path, device_map={"": "cpu"})
    _close(_out(ours, "llama"), _out(loaded, "llama"))


def test_save_pretrained_writes_peft_s_card_metadata_and_base_name(tmp_path):
    import yaml

    models = _pair("llama")
    for model, folder in zip(models, ("theirs", "ours"), strict=True):
        model.get_base_model().config._name_or_path = "org/tiny-llama"
        model.get_base_model().name_or_path = "org/tiny-llama"
        model.peft_config["default"].base_model_name_or_path = None
        model.save_pretrained(tmp_path / folder)
    for folder in ("theirs", "ours"):
        card = (tmp_path / folder / "README.md").read_text().split("---")[1]
        meta = yaml.safe_load(card)
        assert meta["library_name"] == "peft" and meta["base_model"] == "org/tiny-llama" and "lora" in meta["tags"]
        config = json.loads((tmp_path / folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "org/tiny-llama"


# -- merging ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_merge_unmerge_and_merge_and_unload_give_peft_s_outputs(model_name):
    theirs, ours = _pair(model_name)
    theirs.eval(), ours.eval()
    _close(_out(ours, model_name), _out(theirs, model_name))
    theirs.merge_adapter()
    ours.merge_adapter()
    _close(_out(ours, model_name), _out(theirs, model_name))
    theirs.unmerge_adapter()
    ours.unmerge_adapter()
    _close(_out(ours, model_name), _out(theirs, model_name))
    merged_theirs, merged_ours = theirs.merge_and_unload(), ours.merge_and_unload()
    assert type(merged_ours) is type(merged_theirs) and not hasattr(merged_ours, "peft_config")
    _close(_out(merged_ours, model_name), _out(merged_theirs, model_name))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_merge_and_unload_gives_peft_s_weights(dtype):
    theirs, ours = _pair("llama")
    merged_theirs = theirs.to(dtype).eval().merge_and_unload()
    merged_ours = ours.to(dtype).eval().merge_and_unload()
    step = torch.finfo(dtype).eps  # PEFT rounds the delta and then the sum, lorakit the sum only
    for (key, expected), (_, got) in zip(
        merged_theirs.state_dict().items(), merged_ours.state_dict().items(), strict=True
    ):
        assert got.dtype == expected.dtype == dtype, key
        torch.testing.assert_close(got, expected, atol=step, rtol=step, msg=key)


def test_merging_twice_or_unmerging_nothing_warns_as_peft():
    theirs, ours = _pair("llama")
    _add(theirs, ours, "llama", "other")
    for model in (theirs, ours):
        model.eval()
        assert _warnings(model.unmerge_adapter) == ["Already unmerged. Nothing to do."]
        assert _warnings(model.merge_adapter) == []
    for model in (theirs, ours):
        assert _warnings(model.merge_adapter) == ["All adapters are already merged, nothing to do."]
    _close(_out(ours, "llama"), _out(theirs, "llama"))
    expected = ["Already following adapters were merged default. You are now additionally merging other."]
    assert _warnings(lambda: ours.merge_adapter(["default", "other"])) == expected
    assert _warnings(lambda: theirs.merge_adapter(["default", "other"])) == expected
    _close(_out(ours, "llama"), _out(theirs, "llama"))
    for model in (theirs, ours):
        assert _warnings(lambda model=model: model.merge_and_unload()) == [
            "All adapters are already merged, nothing to do."
        ]


@pytest.mark.parametrize("call", ["merge_adapter", "merge_and_unload"])
def test_one_adapter_name_as_a_string_is_peft_s_type_error(call):
    theirs, ours = _pair("llama")
    for model in (theirs, ours):
        with pytest.raises(TypeError, match="adapter_names should be a list of strings, got 'default'"):
            getattr(model, call)(adapter_names="default")
    assert ours.merged_adapters == []


def test_merge_and_unload_of_chosen_adapters_gives_peft_s_outputs():
    theirs, ours = _pair("llama")
    _add(theirs, ours, "llama", "adapter-2")
    theirs.eval(), ours.eval()
    for names in (["adapter-2", "default"], ["adapter-2"], ["default"]):
        expected = _out(copy.deepcopy(theirs).merge_and_unload(adapter_names=names), "llama")
        _close(_out(copy.deepcopy(ours).merge_and_unload(adapter_names=names), "llama"), expected)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_safe_merge_refuses_broken_factors_as_peft(value):
    theirs, ours = _pair("llama")
    with torch.no_grad():
        for model in (theirs, ours):
            for name, param in model.named_parameters():
                if "lora_A" in name:
                    param[0] = value
    for model in (theirs, ours):  # PEFT's words in both, so code matching them works unchanged
        with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems"):
            model.merge_and_unload(safe_merge=True)
    assert ours.merged_adapters == []


# -- unload, delete, disable -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["llama", "bert", "t5"])
def test_unload_gives_peft_s_base_model_back(model_name):
    theirs, ours = _pair(model_name)
    base = MODELS[model_name][0]().eval()
    unloaded_theirs, unloaded_ours = theirs.eval().unload(), ours.eval().unload()
    assert list(unloaded_ours.state_dict()) == list(unloaded_theirs.state_dict()) == list(base.state_dict())
    assert not hasattr(unloaded_ours, "peft_config")
    _close(_out(unloaded_ours, model_name), _out(base, model_name))


@pytest.mark.parametrize("model_name", ["llama", "bert"])
@pytest.mark.parametrize("active", [True, False], ids=["active", "inactive"])
def test_delete_adapter_as_peft(active, model_name):
    theirs, ours = _pair(model_name)
    _add(theirs, ours, model_name, "delete_me")
    for model in (theirs, ours):
        if active:
            model.set_adapter("delete_me")
        model.delete_adapter("delete_me")
        model.eval()
    assert ours.active_adapters == theirs.active_adapters == ["default"]
    assert list(ours.peft_config) == list(theirs.peft_config) == ["default"]
    assert all(list(layer.adapters) == ["default"] for _, layer in lora_layers(ours.model))
    assert all(list(saved.copies) == ["default"] for _, saved in saved_modules(ours.model))
    _close(_out(ours, model_name), _out(theirs, model_name))
    for model in (theirs, ours):
        model.delete_adapter("default")
    assert ours.active_adapters == theirs.active_adapters == []
    assert list(ours.peft_config) == list(theirs.peft_config) == []
    _close(_out(ours.base_model, model_name), _out(theirs.base_model, model_name))


def test_deleting_an_unknown_adapter_raises_peft_s_error():
    for model in _pair("llama"):
        with pytest.raises(ValueError, match="Adapter unknown-adapter does not exist"):
            model.delete_adapter("unknown-adapter")


@pytest.mark.parametrize("model_name", GENERATING)
def test_disable_adapter_gives_peft_s_generate_scores(model_name):
    theirs, ours = _pair(model_name)
    theirs.eval(), ours.eval()
    base = MODELS[model_name][0]().eval()

    def scores(model) -> torch.Tensor:
        kwargs = {"max_new_tokens": 3, "do_sample": False, "return_dict_in_generate": True, "output_scores": True}
        return model.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), **kwargs).scores[0]

    with_adapter = scores(theirs)
    assert not torch.allclose(with_adapter, scores(base))
    _close(scores(ours), with_adapter)
    with theirs.disable_adapter(), ours.disable_adapter():
        _close(scores(ours), scores(theirs))
        _close(scores(ours), scores(base))
    _close(scores(ours), with_adapter)


def test_a_second_adapter_with_bias_raises_as_peft_and_changes_nothing():
    theirs, ours = _pair("llama", name="adapter0", bias="all")
    for model, library in ((theirs, peft), (ours, lorakit)):
        with pytest.raises(ValueError):
            model.add_adapter("adapter1", _config("llama", library, bias="all"))
        assert "adapter1" not in model.peft_config and "adapter1" not in model.base_model.peft_config


# -- forward, generate and training -----------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["llama", "opt", "bert"])
def test_inputs_embeds_give_peft_s_outputs(model_name):
    theirs, ours = _pair(model_name, name="test-adapter")
    theirs.eval(), ours.eval()
    with torch.no_grad():
        embeds = theirs.get_input_embeddings()(IDS)
        _close(ours.forward(inputs_embeds=embeds)[0], theirs.forward(inputs_embeds=embeds)[0])
        _close(ours(inputs_embeds=embeds)[0], _out(ours, model_name))


@pytest.mark.parametrize("model_name", GENERATING)
def test_mixed_adapter_batches_give_peft_s_outputs_and_generate_scores(model_name):
    # OPT's fc1 sees its rows flattened to (batch x tokens), which PEFT's routing refuses: attention layers only
    extra = {"target_modules": ["q_proj", "v_proj"]} if model_name == "opt" else {}
    theirs, ours = _pair(model_name, name="adapter0", **extra)
    _add(theirs, ours, model_name, "adapter1", **extra)
    theirs.eval(), ours.eval()
    ids = torch.cat([IDS] * 3)[:5]
    names = ["__base__", "adapter0", "adapter1", "adapter0", "__base__"]
    kwargs = {"max_new_tokens": 3, "do_sample": False, "return_dict_in_generate": True, "output_scores": True}
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        if model_name == "t5":
            forward = [m(**inputs, decoder_input_ids=ids[:, :2], adapter_names=names).logits for m in (ours, theirs)]
        else:
            forward = [m(**inputs, adapter_names=names).logits for m in (ours, theirs)]
        _close(*forward)
        scores = [m.generate(**inputs, adapter_names=names, **kwargs).scores for m in (ours, theirs)]
    for got, expected in zip(*scores, strict=True):
        _close(got, expected)


def test_half_precision_generate_gives_peft_s_tokens():
    theirs, ours = _pair("llama")
    theirs.to(torch.bfloat16).eval(), ours.to(torch.bfloat16).eval()
    kwargs = {"input_ids": IDS, "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 1, 1]]), "do_sample": False}
    with torch.no_grad():
        assert torch.equal(ours.generate(**kwargs, max_new_tokens=4), theirs.generate(**kwargs, max_new_tokens=4))


def test_beam_search_with_mixed_adapter_batches_gives_peft_s_sequences():
    theirs, ours = _pair("llama", name="adapter0")
    _add(theirs, ours, "llama", "adapter1")
    with torch.no_grad():
        for model in (theirs, ours):  # PEFT's trick: larger factors, so the adapters change the chosen tokens
            for name, param in model.named_parameters():
                if "lora_" in name or ".adapters." in name:
                    param.mul_(10.0)
    theirs.eval(), ours.eval()
    ids = torch.cat([IDS] * 2)[:3]
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_length": 12, "num_beams": 4}
    names = ["__base__", "adapter0", "adapter1"]
    with torch.no_grad():
        expected = theirs.generate(**kwargs, adapter_names=names)
        assert torch.equal(ours.generate(**kwargs, adapter_names=names), expected)
        assert len({tuple(row.tolist()) for row in expected}) == 3


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's parameter names -> gradient; ours are read through PEFT's per-layer views (lora_A[name].weight)."""
    if isinstance(model, LoraModel):
        return {
            f"{path}.lora_{ab}.default.weight": getattr(layer, f"lora_{ab}")["default"].weight.grad
            for path, layer in lora_layers(model.model)
            for ab in "AB"
        }
    prefix = "base_model.model."
    named = model.named_parameters()
    return {n.removeprefix(prefix): p.grad for n, p in named if p.grad is not None and "lora_" in n}


def _base_grads(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.grad is not None and "lora" not in n and ".adapters." not in n]


@pytest.mark.parametrize("model_name", ["llama", "bert", "t5"])
def test_training_gives_peft_s_gradients_and_only_to_the_adapters(model_name):
    theirs, ours = _pair(model_name)
    for model in (theirs, ours):
        model.train()
        (model(**_inputs(model_name))[0] ** 2).sum().backward()
    expected, got = _grads(theirs), _grads(ours)
    assert sorted(got) == sorted(expected)
    for key, grad in expected.items():
        torch.testing.assert_close(got[key], grad, atol=1e-4, rtol=1e-4, msg=key)
    heads = ["classifier"] if model_name == "bert" else []  # the task head's trained copy
    assert [n for n in _base_grads(ours) if not any(h in n for h in heads)] == []


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients_as_peft(use_reentrant):
    theirs, ours = _pair("llama")
    for model in (theirs, ours):
        model.train()
        model.prepare_model_for_gradient_checkpointing(model)
        model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
        (model(**_inputs("llama"))[0] ** 2).sum().backward()
    expected, got = _grads(theirs), _grads(ours)
    assert sorted(got) == sorted(expected) and all(g.abs().sum() > 0 for g in got.values())
    for key, grad in expected.items():
        torch.testing.assert_close(got[key], grad, atol=1e-4, rtol=1e-4, msg=key)


def test_prepare_model_for_gradient_checkpointing_makes_embeddings_require_grad_as_peft():
    theirs, ours = _pair("llama")
    for model in (theirs, ours):
        assert not model.get_input_embeddings()(IDS).requires_grad
        model.prepare_model_for_gradient_checkpointing(model)
        assert model.get_input_embeddings()(IDS).requires_grad


def test_layers_to_transform_trains_what_peft_trains():
    theirs, ours = _pair("llama", layers_to_transform=[0])
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert ours.targeted_module_names == theirs.targeted_module_names
    _close(_out(ours.eval(), "llama"), _out(theirs.eval(), "llama"))


# -- add_weighted_adapter ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", [[0.5, 1.5, 1.5], [-0.5, -0.8, -1.2]], ids=["positive", "negative"])
def test_weighted_combinations_have_peft_s_ranks_and_outputs(weights):
    """PEFT's call list: adapters of ranks 4, 4 and 12; svd takes the largest rank, cat the sum, linear the common one,
    and the linear-like types refuse different ranks."""
    torch.set_num_threads(1)  # tiny SVDs: extra threads only add overhead
    theirs, ours = _pair("llama", name="adapter1", target_modules=["q_proj", "o_proj"])
    _add(theirs, ours, "llama", "adapter_2", target_modules=["q_proj", "o_proj"])
    _add(theirs, ours, "llama", "adapter_3", target_modules=["q_proj", "o_proj"], r=12)
    calls = {
        "single": (["adapter1"], weights[:1], {}, 4),
        "svd": (["adapter_2", "adapter_3"], weights[1:], {}, 12),
        "ties_svd": (["adapter_2", "adapter_3"], weights[1:], {"combination_type": "ties_svd", "density": 0.5}, 12),
        "cat": (["adapter_2", "adapter_3"], weights[1:], {"combination_type": "cat"}, 16),
        "linear": (["adapter1", "adapter_2"], weights[:2], {"combination_type": "linear"}, 4),
        "ties": (["adapter1", "adapter_2"], weights[:2], {"combination_type": "ties", "density": 0.5}, 4),
        "one_enabled": (["adapter1", "adapter_2"], [weights[0], 0], {"combination_type": "linear"}, 4),
    }
    theirs.eval(), ours.eval()
    for name, (adapters, weight, kwargs, rank) in calls.items():
        for model in (theirs, ours):
            model.add_weighted_adapter(adapters, weight, name, **kwargs)
            model.set_adapter(name)
            assert model.active_adapters == [name]
        assert {layer.r[name] for _, layer in lora_layers(ours.model)} == {rank}
        _close(_out(ours, "llama"), _out(theirs, "llama"))
    for combination_type in ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"):
        for model in (theirs, ours):
            with pytest.raises(ValueError):
                model.add_weighted_adapter(
                    ["adapter_2", "adapter_3"], weights[1:], "uneven", combination_type=combination_type, density=0.5
                )
            assert "uneven" not in model.peft_config
