"""get_layer_status, get_model_status, get_nb_trainable_parameters and print_trainable_parameters against PEFT's own
output for the same model: every field of every entry, and the printed line character for character."""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import Callable
from typing import Any

import peft
import pytest
import torch
from peft.peft_model import TunerLayerStatus, TunerModelStatus
from torch import nn

from lorakit import LoraConfig, LoraModel, TrainableTokensConfig, VeraConfig, get_lora_model
from lorakit.status import LayerStatus, ModelStatus
from tests.cases import CASES, Case, conv_mlp, mha_block, tiny_bert_cls, tiny_gpt2, tiny_llama

# lorakit's config class -> PEFT's, so one set of keyword arguments builds both sides
_PEFT_CONFIGS = {
    LoraConfig: peft.LoraConfig,
    VeraConfig: peft.VeraConfig,
    TrainableTokensConfig: peft.TrainableTokensConfig,
}


def _report(model: nn.Module) -> dict[str, Any]:
    """Everything the introspection API says about `model`, as plain data."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        model.print_trainable_parameters()
    return {
        "layers": [dataclasses.asdict(s) for s in model.get_layer_status()],
        "model": dataclasses.asdict(model.get_model_status()),
        "counts": model.get_nb_trainable_parameters(),
        "printed": out.getvalue(),
    }


def assert_same_report(ours: LoraModel, theirs: peft.PeftModel) -> None:
    """Field by field, so a failure names the layer and the field that differ."""
    got, want = _report(ours), _report(theirs)
    assert [s["name"] for s in got["layers"]] == [s["name"] for s in want["layers"]]
    for mine, peft_s in zip(got["layers"], want["layers"], strict=True):
        assert mine == peft_s, mine["name"]
    assert got["model"] == want["model"]
    assert got["counts"] == want["counts"]
    assert got["printed"] == want["printed"]


def _pair(build: Callable[[], nn.Module], config_class: type = LoraConfig, **config) -> tuple[LoraModel, Any]:
    """The same config on identical fresh copies of the base model, one per library."""
    theirs = peft.get_peft_model(build(), _PEFT_CONFIGS[config_class](**config))
    return get_lora_model(build(), config_class(**config)), theirs


def _add(ours: LoraModel, theirs: peft.PeftModel, name: str, **config) -> None:
    ours.add_adapter(name, LoraConfig(**config))
    theirs.add_adapter(name, peft.LoraConfig(**config))


class SequentialMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class EmbeddingConv(nn.Module):
    """An embedding and a Conv2d next to a subclass of nn.Linear, which PEFT reports as a plain lora.Linear."""

    class OwnLinear(nn.Linear):
        pass

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(2, 4, 3)
        self.proj = self.OwnLinear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(self.emb(ids)))


class TwoWeights(nn.Module):
    """Two weights of one module adapted by target_parameters: PEFT nests two ParamWrappers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fused = nn.Module()
        self.fused.w1 = nn.Parameter(torch.randn(6, 4))
        self.fused.w2 = nn.Parameter(torch.randn(4, 6))
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x @ self.fused.w1.T @ self.fused.w2.T)


LLAMA_QV = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
SINGLE = {
    "llama": (tiny_llama, LoraConfig, LLAMA_QV),
    "bert-seq-cls": (tiny_bert_cls, LoraConfig, {"r": 4, "target_modules": ["query", "value"], "task_type": "SEQ_CLS"}),
    "gpt2-conv1d": (tiny_gpt2, LoraConfig, {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}),
    "sequential-mlp": (SequentialMLP, LoraConfig, {"r": 2, "target_modules": ["net.0", "net.2"]}),
    "embedding-conv2d": (EmbeddingConv, LoraConfig, {"r": 2, "target_modules": ["emb", "conv", "proj"]}),
    "modules-to-save": (EmbeddingConv, LoraConfig, {"target_modules": ["proj"], "modules_to_save": ["head"]}),
    "bias-all": (conv_mlp, LoraConfig, {"r": 2, "target_modules": ["lin1", "conv2"], "bias": "all"}),
    "bias-lora-only": (conv_mlp, LoraConfig, {"r": 2, "target_modules": ["lin1", "conv2"], "bias": "lora_only"}),
    "dora": (conv_mlp, LoraConfig, {"r": 2, "target_modules": ["emb", "conv2", "lin1"], "use_dora": True}),
    "patterns": (tiny_llama, LoraConfig, {**LLAMA_QV, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 16}}),
    "layers-to-transform": (tiny_llama, LoraConfig, {**LLAMA_QV, "layers_to_transform": [1]}),
    "tokens-list": (tiny_llama, LoraConfig, {"target_modules": ["q_proj"], "trainable_token_indices": [1, 2, 3]}),
    "tokens-dict": (conv_mlp, LoraConfig, {"target_modules": ["lin1"], "trainable_token_indices": {"emb": [1, 2]}}),
    "mha-module": (mha_block, LoraConfig, {"r": 2, "target_modules": ["attn"]}),
    "target-parameters-nested": (
        TwoWeights,
        LoraConfig,
        {"target_modules": ["out"], "target_parameters": ["fused.w1", "fused.w2"]},
    ),
    "vera": (tiny_gpt2, VeraConfig, {"r": 4, "target_modules": ["c_attn"], "fan_in_fan_out": True}),
    "tokens-alone": (tiny_llama, TrainableTokensConfig, {"target_modules": ["embed_tokens"], "token_indices": [1, 2]}),
}


@pytest.mark.parametrize("name", list(SINGLE))
def test_one_adapter_reports_as_peft(name):
    build, config_class, config = SINGLE[name]
    assert_same_report(*_pair(build, config_class, **config))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_every_case_of_the_table_reports_as_peft(case: Case):
    assert_same_report(*_pair(case.build, **case.config))


def test_status_classes_have_peft_s_fields_in_peft_s_order():
    for ours, theirs in ((LayerStatus, TunerLayerStatus), (ModelStatus, TunerModelStatus)):
        assert [f.name for f in dataclasses.fields(ours)] == [f.name for f in dataclasses.fields(theirs)]


def test_a_second_adapter_through_set_adapter_merge_and_disable_reports_as_peft():
    ours, theirs = _pair(tiny_llama, **LLAMA_QV, modules_to_save=["lm_head"])
    _add(ours, theirs, "b", r=2, target_modules=["q_proj", "k_proj"])  # lm_head: "default"'s copy, or the original
    assert_same_report(ours, theirs)  # added, not active
    for model in (ours, theirs):
        model.set_adapter("b")
    assert_same_report(ours, theirs)
    for model in (ours, theirs):
        model.base_model.set_adapter(["b", "default"])
        model.merge_adapter(["b"])
    assert_same_report(ours, theirs)  # one of two active adapters merged
    for model in (ours, theirs):
        model.unmerge_adapter()
        model.merge_adapter(["default", "b"])
    assert_same_report(ours, theirs)
    for model in (ours, theirs):
        model.unmerge_adapter()
        model.base_model.disable_adapter_layers()
    assert_same_report(ours, theirs)
    for model in (ours, theirs):
        model.base_model.enable_adapter_layers()
        model.delete_adapter("default")
    assert_same_report(ours, theirs)


def test_trainable_tokens_of_two_adapters_merged_and_disabled_report_as_peft():
    ours, theirs = _pair(tiny_llama, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 2]})
    _add(ours, theirs, "b", r=2, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [4]})
    for model in (ours, theirs):
        model.set_adapter("b")
        model.merge_adapter()
    assert_same_report(ours, theirs)
    for model in (ours, theirs):
        model.unmerge_adapter()
        model.base_model.disable_adapter_layers()
    assert_same_report(ours, theirs)


def test_requires_grad_changed_by_hand_reads_irregular_as_in_peft():
    ours, theirs = _pair(tiny_llama, **LLAMA_QV, modules_to_save=["lm_head"])
    for model in (ours, theirs):
        for name, param in model.named_parameters():
            if "layers.0.self_attn.q_proj" in name and "lora_A" in name:
                param.requires_grad_(False)  # half of one layer's factors: that layer and the model irregular
    assert_same_report(ours, theirs)
    assert ours.get_model_status().requires_grad == {"default": "irregular"}
    for model in (ours, theirs):
        for name, param in model.named_parameters():
            if "lm_head" in name and "original_module" not in name:
                param.requires_grad_(False)  # the saved copy frozen
            elif "lora_" in name:
                param.requires_grad_(True)
    assert_same_report(ours, theirs)


@pytest.mark.parametrize("is_trainable", [False, True])
def test_loaded_from_a_peft_folder_reports_as_peft(is_trainable, tmp_path):
    tokens = {"embed_tokens": [1, 3]}
    config = peft.LoraConfig(**LLAMA_QV, use_dora=True, modules_to_save=["lm_head"], trainable_token_indices=tokens)
    peft.get_peft_model(tiny_llama(), config).save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=is_trainable)
    ours = LoraModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=is_trainable)
    assert_same_report(ours, theirs)
    theirs.load_adapter(tmp_path, "other", is_trainable=not is_trainable)
    ours.load_adapter(tmp_path, "other", is_trainable=not is_trainable)
    assert_same_report(ours, theirs)  # loaded, not active
    theirs.set_adapter("other")
    ours.set_adapter("other")
    assert_same_report(ours, theirs)


class Params4bit(nn.Parameter):
    """Named as bitsandbytes' packed 4-bit weight, which PEFT recognises by its class name alone."""


class MarkedWeights(nn.Module):
    """Weights that are not what they look like, without bitsandbytes or DeepSpeed: a packed 4-bit weight (two
    weights a byte) and a ZeRO-3 placeholder (empty, its size in ds_numel)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)
        self.packed = nn.Linear(8, 8)
        self.packed.weight = Params4bit(torch.zeros(32, 1, dtype=torch.uint8), requires_grad=False)
        self.sharded = nn.Linear(8, 8)
        self.sharded.weight = nn.Parameter(torch.empty(0), requires_grad=False)
        self.sharded.weight.ds_numel = 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_packed_and_sharded_weights_count_as_in_peft():
    ours, theirs = _pair(MarkedWeights, r=2, target_modules=["lin"])
    assert_same_report(ours, theirs)
    assert ours.get_nb_trainable_parameters() == (16, 20 + 64 + 8 + 64 + 8 + 16)
