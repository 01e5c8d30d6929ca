"""inject_adapter_in_model (PEFT's low-level API): the model adapted in place and returned, against PEFT's."""

from __future__ import annotations

import peft
import pytest
import torch

from lorakit import (
    LoraConfig,
    LorakitError,
    VeraConfig,
    get_lora_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from lorakit.injected import owner_of
from tests.cases import tiny_llama

FIELDS = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}
IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def _both(init: bool = False):
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**FIELDS, init_lora_weights=init), tiny_llama())
    ours = inject_adapter_in_model(LoraConfig(**FIELDS, init_lora_weights=init), tiny_llama())
    return theirs, ours


def test_the_model_is_adapted_in_place_with_peft_s_trainable_set_and_keys():
    base = tiny_llama()
    ours = inject_adapter_in_model(LoraConfig(**FIELDS), base)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**FIELDS), tiny_llama())
    assert ours is base and "default" in ours.peft_config
    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert sorted(get_peft_model_state_dict(ours)) == sorted(peft.get_peft_model_state_dict(theirs))
    assert not any(k.startswith("base_model") for k in get_peft_model_state_dict(ours))
    assert all(not k.startswith("_lorakit") for k, _ in ours.named_modules())  # the owner is no submodule


def test_dicts_go_both_ways_and_outputs_equal_peft_s():
    theirs, ours = _both()
    set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, atol=1e-5, rtol=0)
    fresh, _ = _both()
    peft.set_peft_model_state_dict(fresh, get_peft_model_state_dict(ours))
    torch.testing.assert_close(fresh(input_ids=IDS).logits, theirs(input_ids=IDS).logits, atol=1e-5, rtol=0)
    own = ours.state_dict()  # the model's own state_dict read as the values, as PEFT's state_dict argument
    with torch.no_grad():
        own = {k: v + 1 for k, v in own.items()}
    read = get_peft_model_state_dict(ours, state_dict=own)
    live = get_peft_model_state_dict(ours)
    assert all(torch.equal(read[k], live[k] + 1) for k in live)


def test_training_the_returned_model_trains_the_adapter_only():
    _, ours = _both(init=True)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    ours(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    changed = {k for k, v in ours.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("adapters.default" in k or "copies.default" in k for k in changed)


def test_a_second_call_adds_an_adapter_to_the_same_layers():
    _, ours = _both()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), ours, "other")
    owner = owner_of(ours)
    assert sorted(ours.peft_config) == ["default", "other"]
    before = ours(input_ids=IDS).logits
    owner.set_adapter("other")
    alone = get_lora_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), "other")
    set_peft_model_state_dict(alone, get_peft_model_state_dict(ours, adapter_name="other"), "other")
    torch.testing.assert_close(ours(input_ids=IDS).logits, alone(input_ids=IDS).logits, atol=1e-5, rtol=0)
    assert not torch.allclose(before, ours(input_ids=IDS).logits)


def test_refused_with_the_fix():
    with pytest.raises(LorakitError, match="add_adapter"):
        inject_adapter_in_model(
            LoraConfig(r=2, target_modules=["q_proj"]), get_lora_model(tiny_llama(), LoraConfig(r=2))
        )
    with pytest.raises(LorakitError, match="target_modules"):
        inject_adapter_in_model(LoraConfig(r=2), tiny_llama(), state_dict={})
    with pytest.raises(LorakitError, match="inject_adapter_in_model"):
        get_peft_model_state_dict(tiny_llama())
    with pytest.raises(LorakitError, match="VeRA"):
        inject_adapter_in_model(VeraConfig(r=2, target_modules=["q_proj"]), tiny_llama())
