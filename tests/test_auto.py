"""AutoLoraModel* (PEFT's AutoPeftModel*): an adapter folder loaded with the base model its config names."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from transformers import BertForSequenceClassification, LlamaForCausalLM

from lorakit import (
    AutoLoraModel,
    AutoLoraModelForCausalLM,
    AutoLoraModelForSequenceClassification,
    LoraConfig,
    LorakitError,
    LoraModel,
    get_lora_model,
)
from tests.cases import tiny_bert_cls, tiny_llama

IDS = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def llama_folders(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    model = get_lora_model(
        LlamaForCausalLM.from_pretrained(tmp_path / "base"),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"),
    )
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter", model.eval()(input_ids=IDS).logits


def test_save_records_the_base_as_peft_does_and_auto_loads_it(llama_folders):
    base, adapter, want = llama_folders
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    for cls in (AutoLoraModel, AutoLoraModelForCausalLM):
        loaded = cls.from_pretrained(adapter)
        assert isinstance(loaded, LoraModel) and not any(p.requires_grad for p in loaded.parameters())
        torch.testing.assert_close(loaded(input_ids=IDS).logits, want, atol=1e-6, rtol=0)
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(adapter)  # PEFT's own Auto class reads it the same way
    torch.testing.assert_close(theirs(input_ids=IDS).logits, want, atol=1e-5, rtol=0)
    trainable = AutoLoraModelForCausalLM.from_pretrained(adapter, is_trainable=True, dtype=torch.float64)
    assert trainable.model.dtype == torch.float64 and any(p.requires_grad for p in trainable.parameters())


def test_the_task_picks_the_head(tmp_path):
    tiny_bert_cls().save_pretrained(tmp_path / "base")
    base = BertForSequenceClassification.from_pretrained(tmp_path / "base")
    model = get_lora_model(base, LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoLoraModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
    assert type(loaded.model) is BertForSequenceClassification


def test_an_adapter_that_names_no_base_is_refused_with_the_way_out(tmp_path):
    get_lora_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    with pytest.raises(LorakitError, match="LoraModel.from_pretrained"):
        AutoLoraModelForCausalLM.from_pretrained(tmp_path)
