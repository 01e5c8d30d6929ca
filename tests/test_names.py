"""Adapter names are checked where they enter: a name never leads outside the save folder."""

from __future__ import annotations

import pytest
import torch

from lorakit import LoraConfig, LoraModel, get_lora_model
from lorakit.errors import AdapterNameError, ConfigError
from lorakit.io import save_adapter
from lorakit.names import check_adapter_name
from tests.cases import mlp

BAD = ["", ".", "..", "/", "a/b", "a\\b", "/tmp/elsewhere", "../up", "nul\x00", "x" * 256, "a.b", "__class__",
       "training", "keys", "forward", "__base__", 3, None]  # fmt: skip
GOOD = ["default", "french", "my-adapter_2", "Ünïcode", "x" * 255]


def _config() -> LoraConfig:
    return LoraConfig(r=2, target_modules=["lin0"], init_lora_weights=False)


@pytest.mark.parametrize("name", BAD, ids=repr)
def test_bad_names_are_refused_by_add_adapter(name):
    model = get_lora_model(mlp(), _config())
    with pytest.raises(AdapterNameError, match="adapter name"):
        model.add_adapter(name, _config())
    assert list(model.peft_config) == ["default"]


@pytest.mark.parametrize("name", ["/tmp/abs", "..", ""], ids=repr)
def test_bad_names_are_refused_before_any_file_is_read(name, tmp_path):
    missing = tmp_path / "no-such-folder"  # the name is refused first, so the missing folder is never reached
    with pytest.raises(AdapterNameError):
        LoraModel.from_pretrained(mlp(), missing, adapter_name=name)
    with pytest.raises(AdapterNameError):
        get_lora_model(mlp(), _config()).load_adapter(missing, name)


def test_adapter_name_error_is_a_config_error():
    assert issubclass(AdapterNameError, ConfigError)


def test_save_refuses_a_name_that_would_leave_the_folder(tmp_path):
    """The last defence in io: even a name that got past add_adapter writes nothing outside `directory`."""
    model = get_lora_model(mlp(), _config())
    outside = tmp_path / "outside"
    with pytest.raises(AdapterNameError):
        save_adapter(model.model, str(outside), model.peft_config["default"], tmp_path / "save" / str(outside))
    assert not outside.exists() and not (tmp_path / "save").exists()


@pytest.mark.parametrize("name", GOOD, ids=lambda n: n[:12])
def test_peft_style_names_save_and_load(name, tmp_path):
    torch.manual_seed(0)
    model = get_lora_model(mlp(), _config())
    model.add_adapter(name, _config()) if name != "default" else None
    model.set_adapter(name)
    with torch.no_grad():
        model.model.lin0.adapters[name].lora_B.normal_()
    model.save_pretrained(tmp_path)
    folder = tmp_path if name == "default" else tmp_path / name
    back = LoraModel.from_pretrained(mlp(), folder, adapter_name=name)
    x = torch.randn(3, 6)
    torch.testing.assert_close(back(x), model(x))


def test_check_returns_the_name():
    assert check_adapter_name("french") == "french"
