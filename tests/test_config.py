"""LoraConfig validates on construction and speaks PEFT's JSON."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import warnings

import peft
import pytest

from lorakit import ConfigError, LoraConfig, VeraConfig
from lorakit.config import PEFT_UNSUPPORTED


@pytest.mark.parametrize("r", [0, -1, 2.5, True, "8"])
def test_rank_must_be_a_positive_integer(r):
    with pytest.raises(ConfigError, match="positive integer"):
        LoraConfig(r=r)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"bias": "some"}, "bias must be one of"),
        ({"init_lora_weights": "kaiming"}, "init_lora_weights"),
        ({"task_type": "CLS"}, "task_type"),
        ({"target_modules": "(unclosed"}, "not a valid regular expression"),
        ({"target_modules": 3}, "target_modules must be"),
        ({"rank_pattern": {"q": 0}}, r"rank_pattern\['q'\]"),
        ({"target_modules": ".*q", "layers_to_transform": [0]}, "layers_to_transform"),
        ({"target_modules": ["q"], "layers_pattern": "layers"}, "layers_pattern only names"),
        ({"target_modules": ".*q", "layers_pattern": "layers"}, "layers_pattern only names"),
    ],
)
def test_bad_values_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**kwargs)


def test_patterns_override_rank_and_alpha_by_module_suffix():
    config = LoraConfig(r=8, lora_alpha=16, rank_pattern={"q_proj": 4}, alpha_pattern={r"layers\.1\..*": 2})
    assert config.rank_and_alpha("model.layers.0.self_attn.q_proj") == (4, 16)
    assert config.rank_and_alpha("model.layers.1.mlp.up_proj") == (8, 2)
    assert config.rank_and_alpha("model.layers.0.self_attn.k_proj") == (8, 16)


def test_rslora_scale():
    assert LoraConfig(r=16, lora_alpha=8).scale(16, 8) == 0.5
    assert LoraConfig(r=16, lora_alpha=8, use_rslora=True).scale(16, 8) == 2.0


def test_json_round_trips_through_peft(tmp_path):
    ours = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q", "v"],
        lora_dropout=0.1,
        modules_to_save=["head"],
        rank_pattern={"q": 2},
        use_rslora=True,
        task_type="CAUSAL_LM",
    )
    (tmp_path / "adapter_config.json").write_text(json.dumps(ours.to_dict()))
    theirs = peft.PeftConfig.from_pretrained(tmp_path)
    assert (theirs.r, theirs.lora_alpha, theirs.lora_dropout, theirs.use_rslora) == (4, 8, 0.1, True)
    assert theirs.target_modules == {"q", "v"} and theirs.rank_pattern == {"q": 2}

    theirs.save_pretrained(tmp_path / "peft")
    back = LoraConfig.from_json_file(tmp_path / "peft" / "adapter_config.json")
    assert back.r == 4 and sorted(back.target_modules) == ["q", "v"] and back.modules_to_save == ["head"]


def test_unknown_peft_type_is_refused(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 20}))
    with pytest.raises(ConfigError, match="peft_type 'PREFIX_TUNING'"):
        LoraConfig.from_json_file(path)


def test_settings_we_would_silently_ignore_are_refused():
    with pytest.raises(ConfigError, match="layer_replication"):
        LoraConfig.from_dict({"peft_type": "LORA", "r": 4, "layer_replication": [[0, 2]]})


def test_corrupt_config_json(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text('{"r": 4, ')
    with pytest.raises(ConfigError, match="not valid JSON"):
        LoraConfig.from_json_file(path)


# -- strict types (issue 8 items 5 and 8) ----------------------------------------------------------------
BOOL_FIELDS = ["fan_in_fan_out", "use_rslora", "use_dora", "inference_mode"]


@pytest.mark.parametrize("field", BOOL_FIELDS)
@pytest.mark.parametrize("value", ["false", "true", 0, 1, None])
def test_bool_fields_take_only_real_bools(field, value):
    with pytest.raises(ConfigError, match=f"{field} must be true or false"):
        LoraConfig(**{field: value})


def test_text_false_in_a_file_is_refused_not_read_as_true(tmp_path):
    """issue 8 item 5: "use_rslora": "false" loaded with rsLoRA on."""
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"peft_type": "LORA", "r": 4, "use_rslora": "false"}))
    with pytest.raises(ConfigError, match="use_rslora must be true or false"):
        LoraConfig.from_json_file(path)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf"), 1e308, True, "16", None])
def test_lora_alpha_must_be_a_finite_sane_number(alpha):
    with pytest.raises(ConfigError, match="lora_alpha must be"):
        LoraConfig(lora_alpha=alpha)


def test_non_finite_alpha_in_a_file_is_refused(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": NaN}')  # Python's json reads NaN
    with pytest.raises(ConfigError, match="lora_alpha"):
        LoraConfig.from_json_file(path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank_pattern": {"q": "4"}}, r"rank_pattern\['q'\] must be a positive integer"),
        ({"rank_pattern": [["q", 4]]}, "rank_pattern must be a dict"),
        ({"alpha_pattern": {"q": "x"}}, r"alpha_pattern\['q'\] must be a number"),
        ({"alpha_pattern": {"q": float("nan")}}, r"alpha_pattern\['q'\] must be a finite"),
        ({"layers_to_transform": ["0"]}, "layers_to_transform must be"),
        ({"layers_to_transform": True}, "layers_to_transform must be"),
        ({"layers_to_transform": -1}, "layers_to_transform must be"),
        ({"lora_dropout": "0.1"}, "lora_dropout must be a number"),
        ({"lora_dropout": float("nan")}, "lora_dropout must be a finite"),
        ({"target_modules": [1, 2]}, "target_modules must be"),
        ({"target_parameters": "lin0.weight"}, "target_parameters must be a list of strings"),
        ({"modules_to_save": "head"}, "modules_to_save must be a list of strings"),
        ({"task_type": 3}, "task_type must be one of"),
        ({"bias": None}, "bias must be one of"),
        ({"init_lora_weights": 1}, "init_lora_weights must be one of"),
        ({"layers_pattern": 3}, "layers_pattern must be"),
        ({"base_model_name_or_path": 3}, "base_model_name_or_path must be a string"),
        ({"r": 2**21}, "at most"),
    ],
)
def test_wrong_types_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**kwargs)


def test_peft_spellings_are_normalised():
    config = LoraConfig(layers_to_transform=1, target_modules=("q", "v"), rank_pattern=None)
    assert config.layers_to_transform == [1] and config.target_modules == ["q", "v"] and config.rank_pattern == {}


def test_every_field_has_a_type_check():
    from lorakit.config import _FIELD_CHECKS
    from lorakit.variants.vera import _VERA_CHECKS

    assert set(_FIELD_CHECKS) == {f.name for f in dataclasses.fields(LoraConfig)}
    assert set(_VERA_CHECKS) == {f.name for f in dataclasses.fields(VeraConfig)}


@pytest.mark.parametrize("cls", [LoraConfig, VeraConfig])
def test_unknown_fields_raise_config_error_naming_them(cls):
    with pytest.raises(ConfigError, match="has no field 'lora_alpah'"):
        cls(lora_alpah=16)
    with pytest.raises(ConfigError, match="has no field 'foo'"):
        cls(foo=1)


def test_unknown_field_that_is_peft_s_says_what_peft_offers():
    with pytest.raises(ConfigError, match="has no field 'layer_replication'.*merge_and_unload"):
        LoraConfig(layer_replication=[[0, 1]])


def test_vera_config_is_strict_too():
    with pytest.raises(ConfigError, match="save_projection must be true or false"):
        VeraConfig(save_projection="false")
    with pytest.raises(ConfigError, match="d_initial must be a finite"):
        VeraConfig(d_initial=float("inf"))
    with pytest.raises(ConfigError, match="projection_prng_key must be an integer"):
        VeraConfig(projection_prng_key=1.5)


def test_r_too_large_to_allocate_names_the_layer(monkeypatch):
    """Where the factors cannot be allocated the error names r and the layer, and no layer keeps the adapter."""
    from lorakit import get_lora_model, inject
    from tests.cases import mlp

    real, calls = inject.Adapter, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 26388279066624 bytes")
        return real(*args, **kwargs)

    model = get_lora_model(mlp(), LoraConfig(r=2, target_modules=["lin0"]))
    monkeypatch.setattr(inject, "Adapter", failing)
    with pytest.raises(ConfigError, match=r"r=4 is too large for lin1"):
        model.add_adapter("big", LoraConfig(r=4, target_modules=["lin0", "lin1"]))
    assert "big" not in model.model.lin0.adapters and list(model.peft_config) == ["default"]


# -- config files that are wrong in every way a file can be (issue 8 item 8) -----------------------------
def test_config_file_not_utf8(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_bytes(b'{"r": 4, "target_modules": ["\xff\xfe"]}')
    with pytest.raises(ConfigError, match="not UTF-8"):
        LoraConfig.from_json_file(path)


def test_config_file_nested_too_deeply(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text('{"r": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ConfigError, match="nests JSON too deeply"):
        LoraConfig.from_json_file(path)


def test_config_path_is_a_folder(tmp_path):
    (tmp_path / "adapter_config.json").mkdir()
    with pytest.raises(ConfigError, match="is a folder"):
        LoraConfig.from_json_file(tmp_path / "adapter_config.json")


def test_config_path_is_a_fifo_and_nothing_hangs(tmp_path):
    path = tmp_path / "adapter_config.json"
    os.mkfifo(path)
    signal.alarm(10)  # a regression would block in open(); fail instead of hanging the suite
    try:
        with pytest.raises(ConfigError, match="not a regular file"):
            LoraConfig.from_json_file(path)
    finally:
        signal.alarm(0)


def test_config_file_missing(tmp_path):
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        LoraConfig.from_json_file(tmp_path / "adapter_config.json")


@pytest.mark.parametrize("peft_type", [["LORA"], 3, None])
def test_peft_type_must_be_a_string(tmp_path, peft_type):
    from lorakit.io import read_config

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, "r": 4}))
    with pytest.raises(ConfigError, match="peft_type"):
        read_config(tmp_path)


# -- every option PEFT 0.21 writes (issue 9 section 2) -----------------------------------------------------
def _peft_file_dict(tmp_path, **kwargs) -> dict:
    peft.LoraConfig(r=2, target_modules=["lin0"], **kwargs).save_pretrained(tmp_path)
    return json.loads((tmp_path / "adapter_config.json").read_text())


def test_a_default_peft_file_with_every_option_loads(tmp_path):
    data = _peft_file_dict(tmp_path)
    assert set(PEFT_UNSUPPORTED) <= set(data)  # PEFT 0.21 writes each of them, at its default
    assert LoraConfig.from_dict(data).r == 2


# a value other than PEFT's default for each option; an option lorakit comes to support leaves PEFT_UNSUPPORTED
# (and this test) by itself
_NOT_DEFAULT = {
    "use_qalora": True,
    "alora_invocation_tokens": [5, 6],
    "layer_replication": [[0, 1]],
    "use_bdlora": {"target_modules_bd_a": ["lin0"], "nblocks": 2},
    "arrow_config": {"top_k": 2},
    "kasa_config": {"x": 1},
    "monteclora_config": {"num_samples": 2},
    "velora_config": {"num_groups": 2},
    "ensure_weight_tying": True,
    "lora_bias": True,
    "trainable_token_indices": [1, 2],
}


def test_every_refused_option_is_tried():
    assert set(PEFT_UNSUPPORTED) <= set(_NOT_DEFAULT)


_REFUSED = [(k, v) for k, v in _NOT_DEFAULT.items() if k in PEFT_UNSUPPORTED] + [("some_future_option", {"a": 1})]


@pytest.mark.parametrize("key, value", _REFUSED)
def test_options_that_change_the_forward_are_refused_by_name(tmp_path, key, value):
    data = _peft_file_dict(tmp_path) | {key: value}
    with pytest.raises(ConfigError, match=f"{key}="):
        LoraConfig.from_dict(data)


@pytest.mark.parametrize("init", ["eva", "orthogonal", "mica"])
def test_inits_that_leave_the_base_alone_load_as_plain_lora_like_peft(tmp_path, init):
    """PEFT's update_layer draws these factors at load and then copies the file's over them: a plain LoRA."""
    import torch

    from lorakit import LoraModel
    from tests.cases import mlp

    torch.manual_seed(0)
    theirs = peft.get_peft_model(mlp(), peft.LoraConfig(r=2, target_modules=["lin0", "lin1"], init_lora_weights=False))
    theirs.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"init_lora_weights": init}))
    x = torch.randn(4, 6)
    expected = peft.PeftModel.from_pretrained(mlp(), tmp_path)(x)
    torch.testing.assert_close(LoraModel.from_pretrained(mlp(), tmp_path)(x), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(theirs(x), expected)


@pytest.mark.parametrize(
    "init, message",
    [("corda", "path_initial_model_for_weight_conversion"), ("lora_ga", "path_initial_model_for_weight_conversion"),
     ("loftq", "LoftQ-quantized base")],
)  # fmt: skip
def test_inits_that_change_the_base_are_refused_with_peft_s_conversion(init, message):
    with pytest.raises(ConfigError, match=f"init_lora_weights='{init}'.*{message}"):
        LoraConfig.from_dict({"peft_type": "LORA", "r": 2, "init_lora_weights": init})


def test_peft_inits_lorakit_cannot_compute_are_refused_for_new_adapters():
    with pytest.raises(ConfigError, match="init_lora_weights='eva' cannot be computed by lorakit"):
        LoraConfig(init_lora_weights="eva")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_unconverted_pissa_and_olora_folders_load_like_peft(tmp_path, init):
    """PEFT recomputes the init at load (the base keeps the residual) and then copies the file's factors; so does
    lorakit, so a folder saved without path_initial_model_for_weight_conversion gives PEFT's outputs."""
    import torch

    from lorakit import LoraModel
    from tests.cases import mlp

    torch.manual_seed(0)
    theirs = peft.get_peft_model(mlp(), peft.LoraConfig(r=2, target_modules=["lin0", "lin1"], init_lora_weights=init))
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param) * 0.1)  # trained factors, unlike the init's
    theirs.save_pretrained(tmp_path)
    x = torch.randn(4, 6)
    expected = peft.PeftModel.from_pretrained(mlp(), tmp_path)(x)
    torch.testing.assert_close(LoraModel.from_pretrained(mlp(), tmp_path)(x), expected, atol=1e-6, rtol=0)


def test_the_all_linear_shorthand_is_read_in_any_case_as_peft_reads_it():
    assert LoraConfig(target_modules="All-Linear").target_modules == "all-linear"


def test_pattern_keys_that_clash_on_a_module_are_warned_about():
    """The first key wins, as in PEFT, but a saved config's keys come back sorted: the other may win after a load."""
    config = LoraConfig(r=4, alpha_pattern={"q_proj": 64, r"layers\.0\.self_attn\.q_proj": 1})
    with pytest.warns(UserWarning, match=r"alpha_pattern keys 'q_proj' and .*sorted"):
        assert config.rank_and_alpha("model.layers.0.self_attn.q_proj") == (4, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert config.rank_and_alpha("model.layers.1.self_attn.q_proj") == (4, 64)  # one key matches
        agreeing = LoraConfig(r=4, rank_pattern={"q_proj": 8, r".*\.q_proj": 8})
        assert agreeing.rank_and_alpha("model.layers.0.self_attn.q_proj") == (8, 8)


@pytest.mark.parametrize("value", [0, 1, "", "x", [0], {"a": 1}])
def test_an_unknown_key_away_from_its_default_is_refused_zero_too(value):
    """Unknown keys pass only at a default-like value (null, false, {} or []); 0 is not false there."""
    with pytest.raises(ConfigError, match="foo_bar"):
        LoraConfig.from_dict({"peft_type": "LORA", "r": 4, "foo_bar": value})


@pytest.mark.parametrize("value", [None, False, {}, []])
def test_an_unknown_key_at_a_default_is_read_past(value):
    assert LoraConfig.from_dict({"peft_type": "LORA", "r": 4, "foo_bar": value}).r == 4


@pytest.mark.parametrize(
    ("key", "value"),
    [("eva_config", "garbage"), ("loftq_config", [1]), ("runtime_config", 3), ("peft_version", 0.21),
     ("qalora_group_size", "16"), ("auto_mapping", "x")],
)  # fmt: skip
def test_peft_fields_read_past_are_still_checked_by_type(key, value):
    with pytest.raises(ConfigError, match=f"{key}=.*expected a"):
        LoraConfig.from_dict({"peft_type": "LORA", "r": 4, key: value})
    assert LoraConfig.from_dict({"peft_type": "LORA", "r": 4, key: None}).r == 4
