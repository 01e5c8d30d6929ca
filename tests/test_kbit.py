"""prepare_model_for_kbit_training against PEFT's: what it freezes, casts and turns on."""

from __future__ import annotations

import peft
import pytest
import torch

from lorakit import LoraConfig, get_lora_model, prepare_model_for_kbit_training
from tests.cases import tiny_llama


def _state(model) -> tuple:
    return (
        {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()},
        model.is_gradient_checkpointing,
        bool(getattr(model, "_require_grads_hook", None)),
    )


@pytest.mark.parametrize("quantized", [{}, {"is_loaded_in_4bit": True}, {"quantization_method": "gptq"}])
@pytest.mark.parametrize("kwargs", [{}, {"gradient_checkpointing_kwargs": {"use_reentrant": False}}])
def test_the_model_is_prepared_as_peft_prepares_it(quantized, kwargs):
    ours, theirs = tiny_llama().to(torch.bfloat16), tiny_llama().to(torch.bfloat16)
    for model in (ours, theirs):
        for name, value in quantized.items():
            setattr(model, name, value)
    assert prepare_model_for_kbit_training(ours, **kwargs) is ours
    peft.prepare_model_for_kbit_training(theirs, **kwargs)
    assert _state(ours) == _state(theirs)


def test_reentrant_checkpointing_after_it_trains_the_adapter():
    base = tiny_llama()
    base.is_loaded_in_4bit = True
    model = get_lora_model(prepare_model_for_kbit_training(base), LoraConfig(r=2, target_modules=["q_proj"]))
    model.train()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.model.model.gradient_checkpointing
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
