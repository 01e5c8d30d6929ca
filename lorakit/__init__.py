"""lorakit: LoRA and its family for any PyTorch model, adapter files interchangeable with PEFT."""

from lorakit.auto import (
    AutoLoraModel,
    AutoLoraModelForCausalLM,
    AutoLoraModelForFeatureExtraction,
    AutoLoraModelForQuestionAnswering,
    AutoLoraModelForSeq2SeqLM,
    AutoLoraModelForSequenceClassification,
    AutoLoraModelForTokenClassification,
)
from lorakit.config import LoraConfig
from lorakit.errors import AdapterFileError, AdapterNameError, ConfigError, LorakitError, TargetError
from lorakit.injected import inject_adapter_in_model
from lorakit.kbit import prepare_model_for_kbit_training
from lorakit.layer import LoraLayer
from lorakit.model import LoraModel, get_lora_model
from lorakit.state_dict import (
    get_base_model_state_dict,
    get_peft_model_state_dict,
    load_peft_weights,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from lorakit.variants import TrainableTokensConfig, VeraConfig

__version__ = "0.1.0"

__all__ = [
    "AutoLoraModel",
    "AutoLoraModelForCausalLM",
    "AutoLoraModelForFeatureExtraction",
    "AutoLoraModelForQuestionAnswering",
    "AutoLoraModelForSeq2SeqLM",
    "AutoLoraModelForSequenceClassification",
    "AutoLoraModelForTokenClassification",
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
    "prepare_model_for_kbit_training",
    "get_base_model_state_dict",
    "get_peft_model_state_dict",
    "load_peft_weights",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
]
