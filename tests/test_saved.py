"""modules_to_save: a SavedModule stands for the module it wraps, as PEFT's ModulesToSaveWrapper does."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, get_lora_model
from lorakit.saved import SavedModule


class _Head(nn.Module):
    """Reads its decoder's tensors without calling it, as MobileBERT's LM head does."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.decoder = nn.Linear(4, 3)
        self.decoder.note = "original"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) @ self.decoder.weight.T + self.decoder.bias


def _model():
    torch.manual_seed(0)
    model = get_lora_model(_Head(), LoraConfig(target_modules=["body"], modules_to_save=["decoder"], r=2))
    with torch.no_grad():
        model.model.decoder.copies["default"].bias.add_(1.0)
    return model


def test_attribute_reads_reach_the_module_the_forward_runs():
    model = _model()
    saved = model.model.decoder
    assert isinstance(saved, SavedModule)
    assert saved.bias is saved.copies["default"].bias and saved.weight is saved.copies["default"].weight
    assert saved.out_features == 3 and saved.note == "original"  # plain attributes too, copied with the module
    with model.disable_adapter():
        assert saved.bias is saved.original_module.bias
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        saved.missing  # noqa: B018


def test_a_saved_module_copies_pickles_and_saves_its_state_as_before():
    model = _model()
    x = torch.randn(2, 4)
    expected = model(x)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(twin(x), expected)
        assert twin.model.decoder.bias is twin.model.decoder.copies["default"].bias
    keys = {k for k in model.model.state_dict() if k.startswith("decoder.")}
    assert keys == {f"decoder.{w}.{p}" for w in ("original_module", "copies.default") for p in ("weight", "bias")}
