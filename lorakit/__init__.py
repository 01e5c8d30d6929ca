"""lorakit: LoRA and its family for any PyTorch model, adapter files interchangeable with PEFT."""

from lorakit.config import LoraConfig
from lorakit.errors import AdapterFileError, AdapterNameError, ConfigError, LorakitError, TargetError
from lorakit.injected import inject_adapter_in_model
from lorakit.layer import LoraLayer
from lorakit.model import LoraModel, get_lora_model
from lorakit.state_dict import get_peft_model_state_dict, set_peft_model_state_dict
from lorakit.variants import TrainableTokensConfig, VeraConfig

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError",
    "AdapterNameError",
    "ConfigError",
    "LoraConfig",
    "LoraLayer",
    "LoraModel",
    "LorakitError",
    "TargetError",
    "TrainableTokensConfig",
    "VeraConfig",
    "get_lora_model",
    "inject_adapter_in_model",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
]
