"""LoraConfig validates on construction and speaks PEFT's JSON."""

from __future__ import annotations

import json

import peft
import pytest

from lorakit import ConfigError, LoraConfig


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
