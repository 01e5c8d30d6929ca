"""The rest of PEFT's LoRA surface: lora_bias, trainable tokens, nn.MultiheadAttention; parity with PEFT both ways."""

from __future__ import annotations

import re

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lorakit import (
    ConfigError,
    LoraConfig,
    LorakitError,
    LoraLayer,
    LoraModel,
    TargetError,
    TrainableTokensConfig,
    get_lora_model,
)
from tests.cases import conv_mlp, mha_block, mlp, tiny_gpt2, tiny_llama

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


# -- trainable tokens ----------------------------------------------------------------------------------------------
def _ids() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 20, (2, 7), generator=torch.Generator().manual_seed(1))
    ids[0, :3] = torch.tensor([1, 3, 5])  # the trained rows are looked up
    return {"ids": ids}


def _run(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**_ids())


def _random_rows(model: LoraModel) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.normal_()


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(target_modules=["lin1"], trainable_token_indices={"emb": [1, 3]}, init_lora_weights=False),
        TrainableTokensConfig(target_modules=["emb"], token_indices=[1, 3, 5]),
    ],
    ids=["with-lora", "alone"],
)
def test_trainable_tokens_files_both_ways_with_peft(config, tmp_path):
    ours = get_lora_model(conv_mlp(), config)
    _random_rows(ours)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(conv_mlp(), tmp_path / "ours")
    expected = _run(ours)
    assert not torch.allclose(expected, _run(conv_mlp()), atol=1e-4)
    torch.testing.assert_close(_run(theirs), expected, atol=ATOL, rtol=0)
    theirs.save_pretrained(tmp_path / "theirs")
    back = LoraModel.from_pretrained(conv_mlp(), tmp_path / "theirs")
    torch.testing.assert_close(_run(back), expected, atol=ATOL, rtol=0)


def test_trainable_tokens_train_only_their_rows_and_merge_writes_them():
    model = get_lora_model(conv_mlp(), TrainableTokensConfig(target_modules=["emb"], token_indices=[1, 3]))
    assert model.get_nb_trainable_parameters()[0] == 2 * 12
    assert torch.equal(_run(model), _run(conv_mlp()))  # the rows start as they were
    _random_rows(model)
    delta = next(p for n, p in model.named_parameters() if "trainable_tokens_delta" in n).detach().clone()
    expected = _run(model)
    merged = model.merge_and_unload()
    assert type(merged.emb) is nn.Embedding
    # the rows arrive as W + (delta - W[idx]): delta within one rounding step (PEFT copies them in exactly)
    torch.testing.assert_close(merged.emb.weight[[1, 3]].detach(), delta, atol=1e-6, rtol=0)
    torch.testing.assert_close(merged.emb.weight[[0, 2, 4]].detach(), conv_mlp().emb.weight[[0, 2, 4]].detach())
    torch.testing.assert_close(_run(merged), expected, atol=ATOL, rtol=0)


def test_trainable_tokens_refuse_tied_tables_and_ids_outside_the_table():
    with pytest.raises(TargetError, match="tied embeddings"):
        get_lora_model(tiny_gpt2(), LoraConfig(target_modules=["c_attn"], trainable_token_indices=[1, 2]))
    with pytest.raises(TargetError, match=r"\[25\] are outside emb's table of 20 rows"):
        get_lora_model(conv_mlp(), TrainableTokensConfig(target_modules=["emb"], token_indices=[1, 25]))
    with pytest.raises(ConfigError, match="distinct token ids"):
        LoraConfig(target_modules=["lin1"], trainable_token_indices=[1, 1])


# -- nn.MultiheadAttention -----------------------------------------------------------------------------------------
# PEFT adapts in_proj_weight and out_proj.weight of a targeted nn.MultiheadAttention, under the keys attn.lora_A/B and
# attn.base_layer.out_proj.lora_A/B. PEFT 0.21 adds out_proj's delta twice (W + 2 dW) in forward and merge
# (huggingface/peft#3774); lorakit computes W + dW, so parity with PEFT is checked with out_proj's delta at zero and
# the whole adapter against the math written out.
def _mha_ids() -> dict[str, torch.Tensor]:
    return {"ids": torch.randint(1, 20, (2, 7), generator=torch.Generator().manual_seed(1))}


def _mha_run(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**_mha_ids())


def _mha_model() -> LoraModel:
    torch.manual_seed(0)
    return get_lora_model(mha_block(), LoraConfig(target_modules=["attn"], r=4, init_lora_weights=False))


def _out_proj_adapter(model: LoraModel):
    return model.model.attn.base_layer.out_proj.adapters["default"]


def test_mha_adapts_in_proj_and_out_proj_as_the_math_says():
    model = _mha_model()
    reference = mha_block()
    with torch.no_grad():  # W + dW for both weights, in a plain nn.MultiheadAttention
        reference.attn.in_proj_weight += model.model.attn.adapters["default"].delta_weight()
        reference.attn.out_proj.weight += _out_proj_adapter(model).delta_weight()
    expected = _mha_run(reference)
    assert not torch.allclose(expected, _mha_run(mha_block()), atol=1e-4)
    torch.testing.assert_close(_mha_run(model), expected, atol=ATOL, rtol=0)
    merged = model.merge_and_unload()
    assert type(merged.attn) is nn.MultiheadAttention and type(merged.attn.out_proj) is not LoraLayer
    torch.testing.assert_close(_mha_run(merged), expected, atol=ATOL, rtol=0)


def test_a_second_mha_adapter_finds_both_weights_and_runs_alone():
    model = _mha_model()
    model.add_adapter("other", LoraConfig(target_modules=["attn"], r=2, init_lora_weights=False))
    model.set_adapter("other")
    reference = mha_block()
    with torch.no_grad():
        reference.attn.in_proj_weight += model.model.attn.adapters["other"].delta_weight()
        reference.attn.out_proj.weight += model.model.attn.base_layer.out_proj.adapters["other"].delta_weight()
    torch.testing.assert_close(_mha_run(model), _mha_run(reference), atol=ATOL, rtol=0)


def test_mha_in_proj_equals_peft_and_files_go_both_ways(tmp_path):
    ours = _mha_model()
    with torch.no_grad():
        _out_proj_adapter(ours).lora_B.zero_()  # PEFT doubles out_proj's delta (see above): compare in_proj alone
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(mha_block(), tmp_path / "ours")
    expected = _mha_run(ours)
    assert not torch.allclose(expected, _mha_run(mha_block()), atol=1e-4)
    torch.testing.assert_close(_mha_run(theirs), expected, atol=ATOL, rtol=0)
    theirs.save_pretrained(tmp_path / "theirs")
    back = LoraModel.from_pretrained(mha_block(), tmp_path / "theirs")
    torch.testing.assert_close(_mha_run(back), expected, atol=ATOL, rtol=0)


def test_a_peft_mha_folder_loads_tensor_for_tensor(tmp_path):
    torch.manual_seed(1)
    theirs = peft.get_peft_model(mha_block(), peft.LoraConfig(target_modules=["attn"], r=4, init_lora_weights=False))
    theirs.save_pretrained(tmp_path)
    ours = LoraModel.from_pretrained(mha_block(), tmp_path)
    file = load_file(tmp_path / "adapter_model.safetensors")
    assert set(file) == set(_peft_state(ours))
    for key, tensor in _peft_state(ours).items():
        torch.testing.assert_close(tensor, file[key], atol=0, rtol=0, msg=key)


def test_mha_out_proj_targeted_alone_or_by_all_linear_takes_effect():
    # nn.MultiheadAttention never calls out_proj, so an adapter on its output would be dead (it is in PEFT 0.21)
    for targets in (["out_proj"], "all-linear", ["attn", "out_proj"]):
        model = get_lora_model(mha_block(), LoraConfig(target_modules=targets, r=2, init_lora_weights=False))
        out_proj = model.model.get_submodule(
            "attn.base_layer.out_proj" if isinstance(model.model.attn, LoraLayer) else "attn.out_proj"
        )
        reference = mha_block()
        with torch.no_grad():
            reference.attn.out_proj.weight += out_proj.adapters["default"].delta_weight()
            if isinstance(model.model.attn, LoraLayer):
                reference.attn.in_proj_weight += model.model.attn.adapters["default"].delta_weight()
            if isinstance(model.model.out, LoraLayer):
                reference.out.weight += model.model.out.adapters["default"].delta_weight()
        torch.testing.assert_close(_mha_run(model), _mha_run(reference), atol=ATOL, rtol=0, msg=str(targets))


def test_mha_refuses_dropout_and_dora():
    with pytest.raises(ConfigError, match="lora_dropout must be 0.*MultiheadAttention"):
        get_lora_model(mha_block(), LoraConfig(target_modules=["attn"], lora_dropout=0.1))
    with pytest.raises(TargetError, match="use_dora=True needs a layer's output"):
        get_lora_model(mha_block(), LoraConfig(target_modules=["attn"], use_dora=True))


def _two_adapter_models(tmp_path):
    """PEFT and lorakit with the same adapters a (active) and b, both with random non-zero B, loaded from PEFT's
    files."""
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        peft.get_peft_model(tiny_llama(), config).save_pretrained(tmp_path / name)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a").eval()
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    ours = LoraModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a").eval()
    ours.load_adapter(tmp_path / "b", "b")
    return theirs, ours


def _logits(model) -> torch.Tensor:
    ids = torch.arange(2, 12).view(2, 5)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_set_adapter_while_merged_unmerges_first_as_peft_does(tmp_path):
    theirs, ours = _two_adapter_models(tmp_path)
    theirs.merge_adapter()
    ours.merge_adapter()
    theirs.set_adapter("b")
    with pytest.warns(UserWarning, match=r"\['a'\] are merged"):
        ours.set_adapter("b")
    assert ours.merged_adapters == [] and ours.active_adapters == ["b"]
    torch.testing.assert_close(_logits(ours), _logits(theirs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("names", [None, ["a"]], ids=["active", "named"])
def test_merge_and_unload_keeps_what_was_merged_before_as_peft_does(names, tmp_path):
    theirs, ours = _two_adapter_models(tmp_path)
    theirs.merge_adapter(["b"])  # b merged, a active and not
    ours.merge_adapter(["b"])
    kwargs = {} if names is None else {"adapter_names": names}
    expected = _logits(theirs.merge_and_unload(**kwargs))
    torch.testing.assert_close(_logits(ours.merge_and_unload(**kwargs)), expected, atol=1e-5, rtol=0)


def test_save_pretrained_selected_adapters_as_peft_reads_them(tmp_path):
    _, ours = _two_adapter_models(tmp_path / "in")
    ours.save_pretrained(tmp_path / "none", selected_adapters=[])
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").iterdir())
    with pytest.raises(LorakitError, match=r"unknown adapter\(s\) \['zz'\]"):
        ours.save_pretrained(tmp_path / "bad", selected_adapters=["a", "zz"])
    assert not (tmp_path / "bad").exists()  # nothing written before the names were checked
    ours.save_pretrained(tmp_path / "one", selected_adapters=["b"])  # the model card at the top, as PEFT writes it
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["README.md", "b"]
    ours.save_pretrained(tmp_path / "named", selected_adapters="b")
    assert sorted(p.name for p in (tmp_path / "named").iterdir()) == ["README.md", "b"]
    with pytest.raises(LorakitError, match=r"\['zz'\]"):  # one name, not its letters
        ours.save_pretrained(tmp_path / "bad", selected_adapters="zz")


def test_set_adapter_trains_an_adapter_loaded_frozen_unless_inference_mode(tmp_path):
    """PEFT's set_adapter(name, inference_mode=False) and set_requires_grad: the same parameters take gradients."""
    theirs, ours = _two_adapter_models(tmp_path)  # b loaded frozen in both

    def trainable(model) -> set[str]:  # adapter names: PEFT's "...lora_A.<name>.weight", ours "...adapters.<name>..."
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        return {m.group(1) for n in names if (m := re.search(r"\.(?:adapters|lora_[AB])\.([^.]+)", n))}

    assert trainable(ours) == trainable(theirs) == set()
    theirs.set_adapter("b")
    ours.set_adapter("b")
    assert trainable(ours) == trainable(theirs) == {"b"}
    theirs.set_adapter("a", inference_mode=True)
    ours.set_adapter("a", inference_mode=True)
    assert trainable(ours) == trainable(theirs) == set()
    theirs.set_requires_grad(["a", "b"])
    ours.set_requires_grad(["a", "b"])
    assert trainable(ours) == trainable(theirs) == {"a", "b"}
    theirs.set_requires_grad("b", requires_grad=False)
    ours.set_requires_grad("b", requires_grad=False)
    assert trainable(ours) == trainable(theirs) == {"a"}


# -- PEFT's keyword arguments and return values ---------------------------------------------------------------------
_PAIR = {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}


def _saved(tmp_path) -> None:
    torch.manual_seed(1)
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(**_PAIR)).save_pretrained(tmp_path)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"torch_device": "cpu"},
        {"low_cpu_mem_usage": True},
        {"autocast_adapter_dtype": False},
        {"ephemeral_gpu_offload": False},
        {"key_mapping": {}},
    ],
    ids=lambda kwargs: next(iter(kwargs)),
)
def test_from_pretrained_and_load_adapter_take_peft_keywords(kwargs, tmp_path):
    _saved(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True, **kwargs)
    ours = LoraModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True, **kwargs)
    torch.testing.assert_close(_logits(ours), _logits(theirs), atol=1e-5, rtol=0)
    theirs.load_adapter(tmp_path, "b", True, **kwargs)
    ours.load_adapter(tmp_path, "b", True, **kwargs)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_from_pretrained_config_replaces_the_folders_config_as_in_peft(tmp_path):
    _saved(tmp_path)
    scaled = {**_PAIR, "lora_alpha": 32}  # the file says alpha 8: the given config wins in both
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path, config=peft.LoraConfig(**scaled))
    ours = LoraModel.from_pretrained(tiny_llama(), tmp_path, config=LoraConfig(**scaled))
    torch.testing.assert_close(_logits(ours), _logits(theirs), atol=1e-5, rtol=0)
    assert ours.peft_config["default"].lora_alpha == 32 and ours.peft_config["default"].inference_mode


def test_from_pretrained_refuses_hub_keywords_and_reads_a_subfolder(tmp_path):
    _saved(tmp_path / "sub")
    with pytest.raises(LorakitError, match=r"\['revision'\]: lorakit reads local adapter folders only"):
        LoraModel.from_pretrained(tiny_llama(), tmp_path / "sub", revision="main")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path, subfolder="sub")
    ours = LoraModel.from_pretrained(tiny_llama(), tmp_path, subfolder="sub")
    torch.testing.assert_close(_logits(ours), _logits(theirs), atol=1e-5, rtol=0)


def test_key_mapping_renames_file_keys_as_peft_does(tmp_path):
    from safetensors.torch import save_file

    _saved(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    save_file({k.replace("model.layers", "model.blocks"): v for k, v in load_file(file).items()}, file)
    mapping = {r"^model\.blocks": "model.layers"}
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path, key_mapping=mapping)
    ours = LoraModel.from_pretrained(tiny_llama(), tmp_path, key_mapping=mapping)
    assert not torch.allclose(_logits(theirs), _logits(tiny_llama()), atol=1e-4)
    torch.testing.assert_close(_logits(ours), _logits(theirs), atol=1e-5, rtol=0)


def test_autocast_adapter_dtype_false_keeps_the_base_dtype_as_peft(tmp_path):
    def dtypes(model) -> set[torch.dtype]:
        return {p.dtype for n, p in model.named_parameters() if "lora_" in n}

    def bf16():
        return tiny_llama().to(torch.bfloat16)

    config = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
    for autocast in (True, False):
        theirs = peft.get_peft_model(bf16(), peft.LoraConfig(**config), autocast_adapter_dtype=autocast)
        ours = get_lora_model(bf16(), LoraConfig(**config), autocast_adapter_dtype=autocast)
        assert dtypes(ours) == dtypes(theirs) == {torch.float32 if autocast else torch.bfloat16}
        theirs.add_adapter("b", peft.LoraConfig(**config), autocast_adapter_dtype=autocast)
        ours.add_adapter(adapter_name="b", peft_config=LoraConfig(**config), autocast_adapter_dtype=autocast)
        assert dtypes(ours) == dtypes(theirs)
    _saved(tmp_path)
    theirs = peft.PeftModel.from_pretrained(bf16(), tmp_path, autocast_adapter_dtype=False)
    ours = LoraModel.from_pretrained(bf16(), tmp_path, autocast_adapter_dtype=False)
    assert dtypes(ours) == dtypes(theirs) == {torch.bfloat16}


def test_get_lora_model_takes_get_peft_models_keywords():
    kwargs = {"adapter_name": "x", "mixed": False, "autocast_adapter_dtype": True, "revision": None}
    ours = get_lora_model(tiny_llama(), LoraConfig(**_PAIR), low_cpu_mem_usage=False, **kwargs)
    assert ours.active_adapters == ["x"]
    with pytest.raises(LorakitError, match="mixed=True"):
        get_lora_model(tiny_llama(), LoraConfig(**_PAIR), mixed=True)


def test_merge_and_unload_takes_peft_positional_order(tmp_path):
    theirs, ours = _two_adapter_models(tmp_path)
    expected = _logits(theirs.merge_and_unload(True, True, ["b"]))  # progressbar, safe_merge, adapter_names
    torch.testing.assert_close(_logits(ours.merge_and_unload(True, True, ["b"])), expected, atol=1e-5, rtol=0)


def test_base_model_and_get_base_model_as_peft(tmp_path):
    theirs, ours = _two_adapter_models(tmp_path)
    assert type(ours.get_base_model()) is type(theirs.get_base_model())
    assert ours.base_model.model is ours.get_base_model()
    assert theirs.base_model.model is theirs.get_base_model()
    ours.base_model.set_adapter(["a", "b"])
    theirs.base_model.set_adapter(["a", "b"])
    torch.testing.assert_close(_logits(ours), _logits(theirs), atol=1e-5, rtol=0)


def test_the_wrapper_passes_unknown_names_to_the_base_as_peft_does():
    config = {"r": 4, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"], "task_type": "SEQ_CLS",
              "init_lora_weights": False}  # fmt: skip
    ours = get_lora_model(tiny_llama(), LoraConfig(**config))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config))
    for name in ("device", "dtype", "main_input_name", "base_model_torch_dtype", "targeted_module_names"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.generation_config is ours.model.generation_config
    assert ours.peft_type == theirs.peft_type == "LORA"
    assert ours.modules_to_save == theirs.modules_to_save == {"lm_head", "classifier", "score"}
    assert ours.active_peft_config is ours.peft_config["default"]
    assert ours.get_input_embeddings() is ours.model.model.embed_tokens
    ours.gradient_checkpointing_enable()  # a method of the base, called on the wrapper as PEFT users do
    assert ours.model.model.gradient_checkpointing
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    ours.train()
    ours(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ours.parameters() if p.requires_grad)
    with pytest.raises(AttributeError, match="no_such_name"):
        ours.no_such_name  # noqa: B018
    with pytest.raises(AttributeError, match="whole base model.*save_pretrained"):
        ours.push_to_hub("someone/adapter")


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_disable_and_enable_adapter_layers_as_peft(tmp_path):
    theirs, ours = _two_adapter_models(tmp_path)
    theirs.set_adapter("b")
    ours.set_adapter("b")  # b trains
    ours.merge_adapter()
    theirs.base_model.disable_adapter_layers()
    ours.disable_adapter_layers()
    torch.testing.assert_close(_logits(ours), _logits(tiny_llama()), atol=1e-5, rtol=0)
    assert _trainable(ours) == _trainable(theirs) == 0
    theirs.base_model.enable_adapter_layers()
    ours.enable_adapter_layers()
    torch.testing.assert_close(_logits(ours), _logits(theirs), atol=1e-5, rtol=0)
    assert _trainable(ours) == _trainable(theirs) > 0


def test_trainable_parameter_counts_and_report_are_peft_s(capsys):
    from tests.cases import tiny_bert_cls

    config = {"r": 4, "target_modules": ["query", "value"], "modules_to_save": ["classifier"], "task_type": "SEQ_CLS"}
    for model in (
        get_lora_model(tiny_bert_cls(), LoraConfig(**config)),
        peft.get_peft_model(tiny_bert_cls(), peft.LoraConfig(**config)),
    ):
        model.print_trainable_parameters()
    ours, theirs = capsys.readouterr().out.splitlines()
    assert ours == theirs  # "trainable params: 1,123 || all params: 19,056 || trainable%: 5.8931"


def test_save_pretrained_takes_peft_positional_order_and_refuses_pickles(tmp_path):
    theirs, ours = _two_adapter_models(tmp_path / "in")
    theirs.save_pretrained(tmp_path / "theirs", True, ["b"])  # safe_serialization, selected_adapters
    ours.save_pretrained(tmp_path / "ours", True, ["b"])
    assert (tmp_path / "ours" / "b" / "adapter_model.safetensors").is_file()
    assert sorted(load_file(tmp_path / "ours" / "b" / "adapter_model.safetensors")) == sorted(
        load_file(tmp_path / "theirs" / "b" / "adapter_model.safetensors")
    )
    with pytest.raises(LorakitError, match="safe_serialization=False asks for adapter_model.bin"):
        ours.save_pretrained(tmp_path / "bin", safe_serialization=False)
    with pytest.raises(LorakitError, match="renamed path_initial_model_for_weight_conversion"):
        ours.save_pretrained(tmp_path / "pissa", convert_pissa_to_lora=str(tmp_path / "init"))
    assert not (tmp_path / "bin").exists() and not (tmp_path / "pissa").exists()


def test_a_peft_config_object_is_read_as_its_file_would_be(tmp_path):
    """Code written for get_peft_model passes peft.LoraConfig objects: get_lora_model, add_adapter and
    from_pretrained(config=) take them as lorakit's own config with the same fields (DoRA, task type, targets),
    and a PEFT config of a kind lorakit has not is refused by name."""
    fields = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, use_dora=True)
    ids = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    theirs_config = get_lora_model(tiny_llama().eval(), peft.LoraConfig(task_type="CAUSAL_LM", **fields))
    torch.manual_seed(5)
    ours_config = get_lora_model(tiny_llama().eval(), LoraConfig(task_type="CAUSAL_LM", **fields))
    assert theirs_config.peft_config["default"] == ours_config.peft_config["default"]
    with torch.no_grad():
        torch.testing.assert_close(theirs_config(input_ids=ids).logits, ours_config(input_ids=ids).logits)
    ours_config.save_pretrained(tmp_path)
    loaded = LoraModel.from_pretrained(tiny_llama().eval(), tmp_path, config=peft.LoraConfig(**fields))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ours_config(input_ids=ids).logits)
    with pytest.raises(ConfigError, match="IA3Config"):
        get_lora_model(tiny_llama().eval(), peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))


def test_layer_and_model_status_read_as_peft_s():
    """get_layer_status / get_model_status give PEFT's report field for field: two adapters on different targets, a
    module saved per adapter, then one adapter merged, then the adapter layers disabled."""
    import dataclasses

    from tests.cases import tiny_bert_cls

    first = dict(r=4, target_modules=["query", "value"], modules_to_save=["classifier"], init_lora_weights=False)
    second = dict(r=2, target_modules=["query"], init_lora_weights=False)
    theirs = peft.get_peft_model(tiny_bert_cls(), peft.LoraConfig(**first))
    theirs.add_adapter("b", peft.LoraConfig(**second))
    ours = get_lora_model(tiny_bert_cls(), LoraConfig(**first))
    ours.add_adapter("b", LoraConfig(**second))

    def same() -> None:
        assert dataclasses.asdict(ours.get_model_status()) == dataclasses.asdict(theirs.get_model_status())
        assert [dataclasses.asdict(s) for s in ours.get_layer_status()] == [
            dataclasses.asdict(s) for s in theirs.get_layer_status()
        ]

    same()
    theirs.set_adapter("b")
    ours.set_adapter("b")
    same()
    theirs.base_model.merge_adapter(["b"])
    ours.merge_adapter(["b"])
    same()
    theirs.base_model.disable_adapter_layers()
    ours.disable_adapter_layers()  # unmerges at once; PEFT at its next forward
    with torch.no_grad():
        ids = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
    same()


@pytest.mark.parametrize("init", [False, True, "gaussian"])
def test_under_one_seed_new_factors_are_peft_s_embeddings_included(init):
    """Code that seeds torch and builds both libraries' adapters (or compares runs across them) gets the same factors:
    an embedding's are drawn N(0, 1) as PEFT's Embedding draws them, a linear layer's as nn.Linear's."""
    config = {"r": 4, "target_modules": ["embed_tokens", "q_proj", "down_proj"], "init_lora_weights": init}
    torch.manual_seed(1)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config))
    torch.manual_seed(1)
    ours = get_lora_model(tiny_llama(), LoraConfig(**config))
    want = peft.get_peft_model_state_dict(theirs, save_embedding_layers=False)
    got = _peft_state(ours)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
