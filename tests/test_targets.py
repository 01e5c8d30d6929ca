"""Target selection follows PEFT's rules; mistakes get one message naming the fix."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

from lorakit import ConfigError, LoraConfig, LorakitError, LoraLayer, LoraModel, TargetError, get_lora_model
from tests.cases import (
    conv_mlp,
    float_input,
    mha_block,
    mlp,
    tiny_bert_cls,
    tiny_gpt2,
    tiny_llama,
    trained_files_load_both_ways,
)


def _adapted(model) -> set[str]:
    return {path.removeprefix("model.") for path, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_all_linear_skips_the_output_head():
    model = get_lora_model(tiny_llama(), LoraConfig(target_modules="all-linear"))
    adapted = _adapted(model)
    assert "lm_head" not in adapted
    assert len(adapted) == 2 * 7  # q k v o gate up down per layer
    gpt2 = get_lora_model(tiny_gpt2(), LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in _adapted(gpt2) and "transformer.h.0.attn.c_attn" in _adapted(gpt2)


def test_default_targets_come_from_the_architecture():
    assert _adapted(get_lora_model(tiny_llama(), LoraConfig())) == {
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    }
    assert all(p.endswith(("query", "value")) for p in _adapted(get_lora_model(tiny_bert_cls(), LoraConfig())))


def test_unknown_architecture_without_targets_says_to_pass_them():
    with pytest.raises(TargetError, match="pass target_modules"):
        get_lora_model(conv_mlp(), LoraConfig())


def test_regex_layers_to_transform_and_exclude():
    regex = get_lora_model(tiny_llama(), LoraConfig(target_modules=r".*\.1\.self_attn\.(q|k)_proj"))
    assert _adapted(regex) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"}
    layers = get_lora_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], layers_to_transform=0))
    assert _adapted(layers) == {"model.layers.0.self_attn.q_proj"}
    excluded = get_lora_model(tiny_llama(), LoraConfig(target_modules="all-linear", exclude_modules=["down_proj"]))
    assert not any(p.endswith("down_proj") for p in _adapted(excluded))


def test_target_matching_nothing_lists_close_candidates():
    with pytest.raises(TargetError, match=r"Did you mean \['q_proj', .*Adaptable module names"):
        get_lora_model(tiny_llama(), LoraConfig(target_modules=["q_prj"]))


def test_partly_matching_list_warns_about_the_rest():
    with pytest.warns(UserWarning, match="query"):
        get_lora_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "query"]))


def test_unsupported_layer_kind_suggests_target_parameters():
    with pytest.raises(TargetError, match=r"input_layernorm \(LlamaRMSNorm\).*target_parameters"):
        get_lora_model(tiny_llama(), LoraConfig(target_modules=["input_layernorm"]))
    separate_qkv = nn.Sequential(nn.MultiheadAttention(8, 2, kdim=4, vdim=4))  # PEFT refuses it too
    with pytest.raises(TargetError, match=r"0 \(MultiheadAttention\)"):
        get_lora_model(separate_qkv, LoraConfig(target_modules=["0"]))


def test_target_parameters_errors():
    with pytest.raises(TargetError, match="close: .*attn.in_proj_weight"):
        get_lora_model(mha_block(), LoraConfig(target_parameters=["attn.in_proj_weights"]))
    with pytest.raises(TargetError, match="2-D"):
        get_lora_model(mha_block(), LoraConfig(target_parameters=["attn.in_proj_bias"]))
    with pytest.raises(ConfigError, match="lora_dropout must be 0"):
        get_lora_model(mha_block(), LoraConfig(target_parameters=["attn.in_proj_weight"], lora_dropout=0.1))


def test_modules_to_save_that_match_nothing():
    with pytest.raises(TargetError, match="modules_to_save \\['clasifier'\\]"):
        get_lora_model(tiny_bert_cls(), LoraConfig(target_modules=["query"], modules_to_save=["clasifier"]))


def test_a_failed_injection_leaves_the_model_untouched():
    model = tiny_llama()
    before = [type(m) for m in model.modules()]
    with pytest.raises(TargetError):
        get_lora_model(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["nothing"]))
    assert [type(m) for m in model.modules()] == before


def test_grouped_conv_needs_a_rank_its_groups_divide_and_refuses_to_merge():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 1))
    before = [type(m) for m in model.modules()]
    with pytest.raises(TargetError, match="groups=2.*r divisible by 2"):
        get_lora_model(model, LoraConfig(target_modules=["0", "1"], r=3))
    assert [type(m) for m in model.modules()] == before  # refused before anything changed
    adapted = get_lora_model(model, LoraConfig(target_modules=["0", "1"], r=4))
    assert _adapted(adapted) == {"0", "1"}
    with pytest.raises(LorakitError, match="groups=2 cannot merge"):
        adapted.merge_adapter()


def _mlp_input() -> torch.Tensor:
    return float_input(3, 6)()["x"]


def test_two_adapters_on_one_target_parameter_match_peft_both_ways(tmp_path):
    torch.manual_seed(0)
    ours = get_lora_model(mlp(), LoraConfig(target_parameters=["lin0.weight"], init_lora_weights=False))
    ours.add_adapter("other", LoraConfig(target_parameters=["lin0.weight"], r=3, init_lora_weights=False))
    ours.eval().save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(mlp(), tmp_path / "ours").eval()
    theirs.load_adapter(tmp_path / "ours" / "other", adapter_name="other")
    theirs.save_pretrained(tmp_path / "theirs")
    back = LoraModel.from_pretrained(mlp(), tmp_path / "theirs").eval()
    back.load_adapter(tmp_path / "theirs" / "other", "other")
    x = _mlp_input()
    outputs = []
    for name in ("default", "other"):
        for model in (ours, theirs, back):
            model.set_adapter(name)
        with torch.no_grad():
            expected = ours(x)
            torch.testing.assert_close(theirs(x), expected, atol=1e-5, rtol=0)
            torch.testing.assert_close(back(x), expected, atol=1e-5, rtol=0)
        outputs.append(expected)
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-4), "the two adapters must differ"


def test_a_deep_copy_with_target_parameters_is_independent():
    model = get_lora_model(mlp(), LoraConfig(target_parameters=["lin0.weight"], init_lora_weights=False))
    x = _mlp_input()
    with torch.no_grad():
        before = model(x)
        merged = copy.deepcopy(model).merge_and_unload()
        torch.testing.assert_close(merged(x), before, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(x), before, atol=0, rtol=0)
    assert type(merged.lin0) is nn.Linear and type(model.model.lin0.base_layer) is not nn.Linear
    model.merge_and_unload()  # the original still unwraps on its own
    assert type(model.model.lin0) is nn.Linear


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(
        T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4)
    )


def _llama_body():
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    return LlamaModel(config)


@pytest.mark.parametrize(
    "build,kwargs",
    [
        (_t5, {"target_modules": ["q"], "layers_to_transform": [1]}),  # block 1, not every block's layer.1
        (_t5, {"target_modules": ["q", "wo"], "layers_to_transform": 0, "layers_pattern": "block"}),
        (_llama_body, {"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": "layers"}),
        (tiny_llama, {"target_modules": ["model.layers.0.self_attn.q_proj", "v_proj"], "layers_to_transform": [1]}),
        (tiny_llama, {"target_modules": ["q_proj"], "layers_to_transform": []}),  # no filter
    ],
    ids=["t5-first-index", "t5-pattern", "pattern-opens-the-path", "full-path-skips-the-filter", "empty-list"],
)
def test_layers_to_transform_selects_the_modules_peft_selects(build, kwargs):
    ours = _adapted(get_lora_model(build(), LoraConfig(**kwargs)))
    theirs = peft.get_peft_model(build(), peft.LoraConfig(**kwargs))
    expected = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    assert ours == expected and ours


def test_an_unknown_modules_to_save_lists_module_names_not_list_indices():
    with pytest.raises(TargetError, match="modules_to_save \\['nonexistent'\\] match no module") as caught:
        get_lora_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], modules_to_save=["nonexistent"]))
    assert "'q_proj'" in str(caught.value) and "'0'" not in str(caught.value)


def _distilbert_cls():
    import transformers

    torch.manual_seed(0)
    config = transformers.DistilBertConfig(
        vocab_size=64, dim=32, hidden_dim=48, n_layers=1, n_heads=4, max_position_embeddings=40
    )
    return transformers.DistilBertForSequenceClassification(config).eval()


@pytest.mark.parametrize(
    ("config", "selector"),
    [
        ({"target_modules": ["q_lin", "pre_classifier"], "modules_to_save": ["classifier"]}, r"\['pre_classifier'\]"),
        ({"target_modules": "all-linear", "task_type": "SEQ_CLS"}, "'all-linear'"),
        ({"target_modules": r".*(q_lin|pre_classifier)", "modules_to_save": ["classifier"]}, "q_lin"),
    ],
    ids=["named", "all-linear", "regex"],
)
def test_a_lora_target_that_modules_to_save_takes_by_text_is_refused_as_in_peft(config, selector):
    """DistilBERT: "classifier" ends pre_classifier's path as text, so modules_to_save takes it too (PEFT's rule).
    Selected for LoRA as well, PEFT refuses (TypeError); here an error names both matches and the fix."""
    with pytest.raises(TypeError, match="modules_to_save cannot be applied"):
        peft.get_peft_model(_distilbert_cls(), peft.LoraConfig(**config))
    with pytest.raises(
        TargetError, match=rf"pre_classifier \(modules_to_save 'classifier'.*{selector}.*exclude_modules"
    ):
        get_lora_model(_distilbert_cls(), LoraConfig(**config))


@pytest.mark.parametrize(
    "config",
    [
        {"target_modules": "all-linear", "task_type": "SEQ_CLS", "exclude_modules": ["pre_classifier"]},
        {"target_modules": ["q_lin", "classifier"], "task_type": "SEQ_CLS"},  # named at a dot: saved whole, no LoRA
    ],
    ids=["excluded", "named-head"],
)
def test_what_peft_accepts_of_a_saved_head_trains_the_same_and_loads_both_ways(config, tmp_path):
    """The fix the error names (exclude_modules), and a head named in target_modules that modules_to_save names at a
    dot (PEFT gives it no LoRA): the same modules train in full as in PEFT, and each side's file loads in the other."""
    ids = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    ours = get_lora_model(_distilbert_cls(), LoraConfig(r=4, **config))
    theirs = peft.get_peft_model(_distilbert_cls(), peft.LoraConfig(r=4, **config))
    full = {n.split(".copies.")[0].removeprefix("model.") for n, _ in ours.named_parameters() if ".copies." in n}
    expected = {
        n.split(".modules_to_save.")[0].removeprefix("base_model.model.")
        for n, p in theirs.named_parameters()
        if p.requires_grad and ".modules_to_save." in n
    }
    assert full == expected == {"pre_classifier", "classifier"}
    trained_files_load_both_ways(ours, theirs, _distilbert_cls, lambda model: model(input_ids=ids).logits, tmp_path)


def test_a_peft_folder_that_lists_an_excluded_module_loads_without_a_word(tmp_path):
    """PEFT writes the resolved target list, excluded modules included (DistilBERT's pre_classifier, excluded so it
    trains in full under SEQ_CLS): loading it must not warn that those entries matched nothing."""
    import warnings

    theirs = peft.get_peft_model(
        _distilbert_cls(),
        peft.LoraConfig(task_type="SEQ_CLS", target_modules="all-linear", exclude_modules=["pre_classifier"]),
    )
    theirs.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="target_modules entries matched nothing")
        ours = LoraModel.from_pretrained(_distilbert_cls(), tmp_path)
    assert not isinstance(ours.model.get_submodule("pre_classifier"), LoraLayer)
