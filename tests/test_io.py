"""Adapter files are PEFT's, both ways: same weights give the same outputs (fp32, 1e-5)."""

from __future__ import annotations

import copy
import json
import re

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit import AdapterFileError, ConfigError, LoraConfig, LorakitError, LoraModel, atomic, get_lora_model, io
from lorakit.io import CONFIG_NAME, WEIGHTS_NAME, adapter_tensors
from tests.cases import CASES, PEFT_OUTPUTS, Case, mlp, output, tiny_bert_cls, trained_files_load_both_ways

ATOL = 1e-5


def _perturb_saved_copies(model: LoraModel) -> None:
    """Makes modules_to_save copies differ from the originals, so a test sees which one runs."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".copies." in name:
                param.add_(torch.randn_like(param) * 0.1)


def _ours(case: Case, **extra) -> LoraModel:
    torch.manual_seed(2)
    model = get_lora_model(case.build(), LoraConfig(init_lora_weights=False, **case.config, **extra))
    _perturb_saved_copies(model)
    return model.eval()


def _run(model, case: Case) -> torch.Tensor:
    with torch.no_grad():
        return output(model(**case.inputs()))


@pytest.mark.parametrize("case", PEFT_OUTPUTS, ids=str)
def test_our_files_load_in_peft_with_same_outputs(case: Case, tmp_path):
    ours = _ours(case)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(case.build(), tmp_path).eval()
    base = _run(case.build().eval(), case)
    expected = _run(ours, case)
    assert not torch.allclose(expected, base, atol=1e-4), "the adapter must change the output"
    torch.testing.assert_close(_run(theirs, case), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", PEFT_OUTPUTS, ids=str)
def test_peft_files_load_in_ours_with_same_outputs(case: Case, tmp_path):
    torch.manual_seed(3)
    theirs = peft.get_peft_model(case.build(), peft.LoraConfig(init_lora_weights=False, **case.config))
    _perturb_saved_copies_peft(theirs)
    theirs.eval().save_pretrained(tmp_path)
    ours = LoraModel.from_pretrained(case.build(), tmp_path).eval()
    torch.testing.assert_close(_run(ours, case), _run(theirs, case), atol=ATOL, rtol=0)


def _perturb_saved_copies_peft(model) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.add_(torch.randn_like(param) * 0.1)


@pytest.mark.parametrize("case", PEFT_OUTPUTS, ids=str)
def test_same_weights_same_outputs_as_peft_in_memory(case: Case):
    """PEFT builds its own layers from the same config; our tensors are copied in by key."""
    ours = _ours(case)
    theirs = peft.get_peft_model(case.build(), peft.LoraConfig(**case.config)).eval()
    state = {k: v.detach() for k, v in adapter_tensors(ours.model, "default", ours.peft_config["default"]).items()}
    result = peft.set_peft_model_state_dict(theirs, state)
    assert not [k for k in result.unexpected_keys if "lora" in k]
    torch.testing.assert_close(_run(theirs, case), _run(ours, case), atol=ATOL, rtol=0)


def test_saved_keys_and_config_are_peft_names(tmp_path):
    case = CASES[0]
    _ours(case).save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / WEIGHTS_NAME))
    assert "base_model.model.lin1.lora_A.weight" in keys
    assert "base_model.model.emb.lora_embedding_B" in keys
    assert "base_model.model.head.weight" in keys
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["modules_to_save"] == ["head"]
    assert peft.PeftConfig.from_pretrained(tmp_path).target_modules == {"emb", "conv1", "conv2", "lin1", "lin2"}


def test_several_adapters_round_trip_both_ways(tmp_path):
    case = next(c for c in CASES if c.name == "llama-all-linear")
    torch.manual_seed(4)
    ours = get_lora_model(case.build(), LoraConfig(init_lora_weights=False, target_modules=["q_proj"]))
    ours.add_adapter("second", LoraConfig(init_lora_weights=False, r=3, target_modules=["v_proj", "up_proj"]))
    ours.eval().save_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / "second" / WEIGHTS_NAME).exists()

    theirs = peft.PeftModel.from_pretrained(case.build(), tmp_path / "ours").eval()
    theirs.load_adapter(tmp_path / "ours" / "second", adapter_name="second")
    back = LoraModel.from_pretrained(case.build(), tmp_path / "ours").eval()
    back.load_adapter(tmp_path / "ours" / "second", "second")
    for name in ("default", "second"):
        ours.set_adapter(name)
        theirs.set_adapter(name)
        back.set_adapter(name)
        expected = _run(ours, case)
        torch.testing.assert_close(_run(theirs, case), expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(_run(back, case), expected, atol=ATOL, rtol=0)

    theirs.save_pretrained(tmp_path / "theirs")
    again = LoraModel.from_pretrained(case.build(), tmp_path / "theirs").eval()
    again.load_adapter(tmp_path / "theirs" / "second", "second")
    again.set_adapter("second")
    torch.testing.assert_close(_run(again, case), expected, atol=ATOL, rtol=0)


def test_loaded_adapter_is_frozen_unless_trainable(tmp_path):
    case = CASES[0]
    _ours(case).save_pretrained(tmp_path)
    frozen = LoraModel.from_pretrained(case.build(), tmp_path)
    assert frozen.get_nb_trainable_parameters()[0] == 0
    trainable = LoraModel.from_pretrained(case.build(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] > 0


def test_bf16_base_keeps_fp32_factors_and_saves_them(tmp_path):
    case = CASES[0]
    model = get_lora_model(case.build().to(torch.bfloat16), LoraConfig(**case.config))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    assert tensors["base_model.model.lin1.lora_A.weight"].dtype == torch.float32
    assert copy.deepcopy(model)  # a LoraModel can be copied (parametrizations and all)


# -- bad input ---------------------------------------------------------------------------------------


def test_adapter_from_another_base_names_each_tensor_and_both_shapes(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    case = next(c for c in CASES if c.name == "llama-layer1")
    _ours(case).save_pretrained(tmp_path)
    wider = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=48,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    before = [type(m) for m in wider.modules()]
    with pytest.raises(AdapterFileError) as err:
        LoraModel.from_pretrained(wider, tmp_path)
    message = str(err.value)
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight: the file has shape (4, 32)" in message
    assert "the model needs (4, 48)" in message
    assert [type(m) for m in wider.modules()] == before  # nothing left half-adapted


def test_missing_and_unexpected_keys_are_named(tmp_path):
    case = CASES[0]
    _ours(case).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    del tensors["base_model.model.lin1.lora_B.weight"]
    tensors["base_model.model.lin9.lora_A.weight"] = torch.zeros(8, 16)
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    with pytest.raises(AdapterFileError, match=r"missing from the file: base_model.model.lin1.lora_B.weight"):
        LoraModel.from_pretrained(case.build(), tmp_path)
    with pytest.raises(AdapterFileError, match=r"not in the model: base_model.model.lin9.lora_A.weight"):
        LoraModel.from_pretrained(case.build(), tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_weights_file(tmp_path, damage):
    case = CASES[0]
    _ours(case).save_pretrained(tmp_path)
    path = tmp_path / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64)
    with pytest.raises(AdapterFileError, match="truncated or corrupt"):
        LoraModel.from_pretrained(case.build(), tmp_path)


def test_pickle_weights_are_never_loaded(tmp_path):
    case = CASES[0]
    _ours(case).save_pretrained(tmp_path)
    (tmp_path / WEIGHTS_NAME).rename(tmp_path / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match="pickle"):
        LoraModel.from_pretrained(case.build(), tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(AdapterFileError, match="does not exist"):
        LoraModel.from_pretrained(CASES[0].build(), tmp_path / "nope")


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    case = CASES[0]
    model = _ours(case)
    target = tmp_path / "adapter"
    model.save_pretrained(target)
    good = (target / WEIGHTS_NAME).read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", disk_full)
    with torch.no_grad():
        model.model.lin1.adapters["default"].lora_A.add_(1.0)
    with pytest.raises(AdapterFileError, match="No space left on device"):
        model.save_pretrained(target)
    assert (target / WEIGHTS_NAME).read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no stage folder left behind
    assert sorted(p.name for p in target.iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]


# -- values no adapter has (issue 8 item 6) ----------------------------------------------------------------
def _saved(tmp_path):
    case = CASES[0]
    _ours(case).save_pretrained(tmp_path)
    return case, load_file(tmp_path / WEIGHTS_NAME)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int64, torch.bool])
def test_non_float_adapter_tensors_are_refused_by_name(tmp_path, dtype):
    case, tensors = _saved(tmp_path)
    key = "base_model.model.lin1.lora_A.weight"
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    with pytest.raises(AdapterFileError, match=rf"{key} has dtype {str(dtype)[6:]}; adapter weights are floating"):
        LoraModel.from_pretrained(case.build(), tmp_path)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_adapter_tensors_are_refused_by_name(tmp_path, value):
    case, tensors = _saved(tmp_path)
    key = "base_model.model.lin2.lora_B.weight"
    tensors[key][1, 0] = value
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    with pytest.raises(AdapterFileError, match=rf"{key} holds NaN or infinite values"):
        LoraModel.from_pretrained(case.build(), tmp_path)


def _relabel(path, key: str, dtype: str) -> None:
    """Changes one tensor's dtype in the safetensors header, leaving its bytes as they are."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    header[key]["dtype"] = dtype
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size :])


def test_a_float_tensor_relabelled_int_in_the_header_is_refused(tmp_path):
    """Same byte size (F32 -> I32): safetensors reads it, lorakit refuses it instead of loading ~1e9 values."""
    case, _ = _saved(tmp_path)
    _relabel(tmp_path / WEIGHTS_NAME, "base_model.model.lin1.lora_A.weight", "I32")
    with pytest.raises(AdapterFileError, match="lin1.lora_A.weight has dtype int32"):
        LoraModel.from_pretrained(case.build(), tmp_path)


def test_a_header_whose_dtype_does_not_fit_the_bytes_is_caught_by_safetensors(tmp_path):
    case, _ = _saved(tmp_path)
    _relabel(tmp_path / WEIGHTS_NAME, "base_model.model.lin1.lora_A.weight", "F16")  # half the bytes it spans
    with pytest.raises(AdapterFileError, match="truncated or corrupt"):
        LoraModel.from_pretrained(case.build(), tmp_path)


def test_tensor_roles_name_each_factor_rank_and_saved_module(tmp_path):
    config = LoraConfig(
        r=4, target_modules=["query", "value"], rank_pattern={"value": 2}, task_type="SEQ_CLS", init_lora_weights=False
    )
    model = get_lora_model(tiny_bert_cls(), config)
    model.save_pretrained(tmp_path)
    roles = io.tensor_roles(io.read_config(tmp_path), io.read_weights(tmp_path))
    by_role: dict[str, list] = {}
    for item in roles:
        by_role.setdefault(item.role, []).append(item)
    layers = {path.removeprefix("model."): layer for path, layer in model.named_modules() if hasattr(layer, "adapters")}
    factors = by_role["lora_A"] + by_role["lora_B"]
    assert {item.module for item in factors} == set(layers)
    for item in factors:
        assert item.rank == layers[item.module].adapters["default"].r  # 4 for query, 2 for value
    assert {item.module for item in by_role["saved"]} == {"classifier"}
    assert "other" not in by_role


def test_peft_bias_all_file_with_a_saved_module_holding_submodules_loads(tmp_path):
    """bias="all" with a modules_to_save module that has submodules (BERT's pooler): PEFT's file also carries
    "pooler.modules_to_save.<adapter>.dense.bias", a copy of "pooler.dense.bias"; it loads, with PEFT's outputs."""
    config = peft.LoraConfig(target_modules=["query"], modules_to_save=["pooler"], bias="all", init_lora_weights=False)
    theirs = peft.get_peft_model(tiny_bert_cls(), config).eval()
    with torch.no_grad():
        theirs.base_model.model.bert.pooler.modules_to_save["default"].dense.bias.add_(0.5)  # the copy trained
    theirs.save_pretrained(tmp_path)
    assert any(".modules_to_save.default.dense.bias" in k for k in load_file(tmp_path / WEIGHTS_NAME))
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    ours = LoraModel.from_pretrained(tiny_bert_cls(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=0)


def _distilbert_cls():
    import transformers

    torch.manual_seed(0)
    config = transformers.DistilBertConfig(
        vocab_size=64, dim=32, hidden_dim=48, n_layers=1, n_heads=4, max_position_embeddings=32, num_labels=2
    )
    return transformers.DistilBertForSequenceClassification(config).eval()


def _llama():
    from tests.cases import tiny_llama

    return tiny_llama().eval()


@pytest.mark.parametrize(
    ("build", "extra"),
    [
        (_distilbert_cls, {"task_type": "SEQ_CLS"}),  # its "classifier" head name is pre_classifier's ending too
        (_llama, {"modules_to_save": ["norm"]}),  # model.norm and every layer's input/post_attention_layernorm
    ],
)
def test_modules_to_save_names_end_paths_as_text_as_in_peft(build, extra, tmp_path):
    """PEFT wraps every module whose path ends with a modules_to_save name as text, not only at a dot: the same
    modules train in full here, and each side's file loads in the other with the same outputs."""
    ids = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    ours = get_lora_model(build(), LoraConfig(r=4, target_modules=["q_lin", "q_proj"], **extra))
    theirs = peft.get_peft_model(build(), peft.LoraConfig(r=4, target_modules=["q_lin", "q_proj"], **extra))
    full = {n.split(".copies.")[0].removeprefix("model.") for n, p in ours.named_parameters() if ".copies." in n}
    expected = {
        n.split(".modules_to_save.")[0].removeprefix("base_model.model.")
        for n, p in theirs.named_parameters()
        if p.requires_grad and ".modules_to_save." in n
    }
    assert full == expected and len(full) >= 2
    trained_files_load_both_ways(ours, theirs, build, lambda model: model(input_ids=ids).logits, tmp_path)


def test_a_file_given_for_the_folder_or_a_folder_for_the_weights_is_named_as_such(tmp_path):
    case = CASES[0]
    _ours(case).save_pretrained(tmp_path / "a")
    with pytest.raises(AdapterFileError, match="is a file; pass the adapter folder"):
        LoraModel.from_pretrained(case.build(), tmp_path / "a" / CONFIG_NAME)
    (tmp_path / "a" / WEIGHTS_NAME).unlink()
    (tmp_path / "a" / WEIGHTS_NAME).mkdir()
    with pytest.raises(AdapterFileError, match="is a folder, not a safetensors file"):
        LoraModel.from_pretrained(case.build(), tmp_path / "a")


def test_a_file_that_does_not_fit_names_the_config_as_a_cause_too(tmp_path):
    case = CASES[0]
    _ours(case).save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["r"] = config["r"] * 2  # the base is right; the config no longer says what saved the tensors
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match=r"(?s)another base model, or a config whose r.*the file has shape"):
        LoraModel.from_pretrained(case.build(), tmp_path)


def test_question_answering_trains_its_head_in_full_as_peft_does(tmp_path):
    """task_type QUESTION_ANS: PEFT adds qa_outputs to modules_to_save; the same modules train here, and each
    side's file loads in the other with the same start and end logits."""
    import transformers

    def build():
        torch.manual_seed(0)
        config = transformers.BertConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
            max_position_embeddings=40,
        )  # fmt: skip
        return transformers.BertForQuestionAnswering(config).eval()

    def logits(model):
        out = model(input_ids=torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(1)))
        return torch.cat([out.start_logits, out.end_logits])

    ours = get_lora_model(build(), LoraConfig(r=4, target_modules=["query"], task_type="QUESTION_ANS"))
    theirs = peft.get_peft_model(build(), peft.LoraConfig(r=4, target_modules=["query"], task_type="QUESTION_ANS"))
    assert {n for n, p in ours.named_parameters() if p.requires_grad and "lora" not in n} == {
        "model.qa_outputs.copies.default.weight",
        "model.qa_outputs.copies.default.bias",
    }
    trained_files_load_both_ways(ours, theirs, build, logits, tmp_path)


def _llama_tied():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize(
    ("build", "config", "saved"),
    [
        (_llama, {"target_modules": ["embed_tokens", "q_proj"]}, ["model.embed_tokens"]),
        (_llama, {"target_modules": ["lm_head"]}, ["lm_head"]),
        (_llama, {"target_modules": r".*(embed_tokens|q_proj)"}, ["model.embed_tokens"]),
        (_llama, {"target_modules": ["model.embed_tokens"]}, []),  # not the bare name: PEFT saves no base weight
        (_llama, {"target_modules": "all-linear"}, []),
        (_llama, {"target_modules": ["lm_head"], "trainable_token_indices": [3]}, []),  # trainable tokens: kept small
        (_llama_tied, {"target_modules": ["embed_tokens", "lm_head"]}, ["model.embed_tokens", "lm_head"]),
    ],
    ids=["names", "lm_head", "regex", "path", "all-linear", "trainable-tokens", "tied"],
)
def test_an_adapted_embedding_saves_its_base_layer_where_peft_does(build, config, saved, tmp_path):
    """PEFT's save_embedding_layers="auto": where target_modules names embed_tokens or lm_head (or a regex matches
    one), the adapted input / output embeddings' base layers are saved whole; the same keys here (a tied table
    twice), and each side's folder loads in the other."""
    ours = get_lora_model(build(), LoraConfig(**config))
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.get_peft_model(build(), peft.LoraConfig(**config))
    theirs.save_pretrained(tmp_path / "theirs")
    keys = [set(load_file(tmp_path / side / WEIGHTS_NAME)) for side in ("ours", "theirs")]
    assert keys[0] == keys[1]
    assert {k for k in keys[0] if ".base_layer." in k} == {f"base_model.model.{p}.base_layer.weight" for p in saved}
    LoraModel.from_pretrained(build(), tmp_path / "theirs")
    peft.PeftModel.from_pretrained(build(), tmp_path / "ours")


def test_a_saved_base_embedding_is_loaded_into_the_base_as_peft_loads_it(tmp_path):
    """A folder whose embed_tokens base weight differs from the model's (a table trained or resized before):
    loading puts the file's table into the base layer, as PEFT does, so both give the same outputs."""
    ids = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    theirs = peft.get_peft_model(_llama(), peft.LoraConfig(target_modules=["embed_tokens"], init_lora_weights=False))
    with torch.no_grad():
        theirs.base_model.model.model.embed_tokens.base_layer.weight.add_(1.0)
    theirs.eval().save_pretrained(tmp_path)
    back = peft.PeftModel.from_pretrained(_llama(), tmp_path).eval()
    ours = LoraModel.from_pretrained(_llama(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, back(input_ids=ids).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("choice", [True, False])
def test_save_embedding_layers_takes_peft_s_values(choice, tmp_path):
    """save_pretrained(save_embedding_layers=...) as in PEFT: True saves an adapted embedding's base table even where
    "auto" would not (a path, not the name), False never; the same keys as PEFT's, and each folder loads in the
    other. Anything else is refused before a file is written."""
    config = dict(target_modules=["model.embed_tokens", "q_proj"], init_lora_weights=False)
    ours = get_lora_model(_llama(), LoraConfig(**config))
    ours.save_pretrained(tmp_path / "ours", save_embedding_layers=choice)
    theirs = peft.get_peft_model(_llama(), peft.LoraConfig(**config))
    theirs.save_pretrained(tmp_path / "theirs", save_embedding_layers=choice)
    keys = [set(load_file(tmp_path / side / WEIGHTS_NAME)) for side in ("ours", "theirs")]
    assert keys[0] == keys[1]
    assert any(".base_layer." in k for k in keys[0]) == choice
    LoraModel.from_pretrained(_llama(), tmp_path / "theirs")
    peft.PeftModel.from_pretrained(_llama(), tmp_path / "ours")
    with pytest.raises(LorakitError, match="save_embedding_layers"):
        ours.save_pretrained(tmp_path / "bad", save_embedding_layers="yes")
    assert not (tmp_path / "bad").exists()


def test_save_writes_peft_s_model_card_once_and_keeps_the_users(tmp_path):
    """The card's metadata is what the Hub and PEFT's own save write (library_name peft, base_model, a causal LM's
    pipeline tag); a README already in the folder is the user's and stays as it is."""
    from huggingface_hub import ModelCard

    from tests.cases import tiny_llama

    base = tiny_llama()
    base.config._name_or_path = "org/tiny-llama"
    model = get_lora_model(base, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "a")
    data = ModelCard.load(tmp_path / "a" / "README.md").data
    assert (data.library_name, data.base_model, data.pipeline_tag) == ("peft", "org/tiny-llama", "text-generation")
    assert "lora" in data.tags
    peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a")  # the folder stays PEFT's
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "README.md").write_text("my notes\n")
    model.save_pretrained(tmp_path / "b")
    assert (tmp_path / "b" / "README.md").read_text() == "my notes\n"


def test_a_bad_value_in_a_folders_config_names_the_file(tmp_path):
    model = get_lora_model(mlp(), LoraConfig(r=2, target_modules=["lin0"]))
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data | {"r": "4"}))
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / CONFIG_NAME)) + ": r must be a positive integer"):
        LoraModel.from_pretrained(mlp(), tmp_path)
