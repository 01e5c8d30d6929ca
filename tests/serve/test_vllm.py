"""`lorakit info` tells whether vLLM can serve an adapter, and why not; checked on folders lorakit writes."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorakit import LoraConfig, VeraConfig, get_lora_model
from lorakit.cli import app
from lorakit.io import read_config, read_weights
from lorakit.serve.vllm import vllm_servability
from tests.serve.tiny import build_model

TARGETS = ["q_proj", "v_proj"]


def saved(tmp_path: Path, config) -> Path:
    get_lora_model(build_model(64, 0), config).save_pretrained(tmp_path)
    return tmp_path


CASES = [
    (LoraConfig(r=8, target_modules=TARGETS), None),
    (LoraConfig(r=8, target_modules=TARGETS, use_rslora=True), None),
    (LoraConfig(r=8, target_modules=TARGETS, use_dora=True), "DoRA"),
    (LoraConfig(r=8, target_modules=TARGETS, modules_to_save=["lm_head"]), "modules_to_save"),
    (LoraConfig(r=8, target_modules=TARGETS, bias="lora_only"), "biases"),
    (LoraConfig(r=8, target_modules=TARGETS, alpha_pattern={"v_proj": 32}), "own scale"),
    (LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, rank_pattern={"v_proj": 4}, alpha_pattern={"v_proj": 8}),
     None),  # same alpha / r everywhere: vLLM's single scale is right
    (VeraConfig(r=8, target_modules=TARGETS), "LoRA adapters only"),
]  # fmt: skip


@pytest.mark.parametrize(("config", "why"), CASES)
def test_verdict_names_the_reason(tmp_path: Path, config, why: str | None) -> None:
    folder = saved(tmp_path, config)
    verdict = vllm_servability(read_config(folder), read_weights(folder))
    assert verdict.servable == (why is None)
    if why:
        assert any(why in reason for reason in verdict.reasons), verdict.reasons


def test_a_large_rank_is_servable_with_a_flag(tmp_path: Path) -> None:
    folder = saved(tmp_path, LoraConfig(r=24, target_modules=TARGETS))
    verdict = vllm_servability(read_config(folder), read_weights(folder))
    assert verdict.servable and verdict.notes == ["rank 24 > 16: start vLLM with --max-lora-rank 32"]


def test_info_prints_the_verdict(tmp_path: Path) -> None:
    good = saved(tmp_path / "good", LoraConfig(r=8, target_modules=TARGETS))
    bad = saved(tmp_path / "bad", LoraConfig(r=8, target_modules=TARGETS, use_dora=True))
    out = CliRunner().invoke(app, ["info", str(good)]).output
    assert "vLLM: servable with vllm serve BASE --enable-lora" in out
    out = CliRunner().invoke(app, ["info", str(bad)]).output
    assert "vLLM: not servable: vLLM does not support DoRA" in out
