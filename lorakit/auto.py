"""PEFT's AutoPeftModel classes: an adapter folder loaded with the base model its config names.

`AutoLoraModelForCausalLM.from_pretrained("my-adapter")` reads base_model_name_or_path from the folder's
adapter_config.json (save_pretrained records where the base came from, as PEFT does), loads that base with the
transformers class of the task (a local folder; the hub only where it is reachable) and the adapter on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from lorakit import models
from lorakit.errors import LorakitError
from lorakit.io import read_config
from lorakit.model import LoraModel


class AutoLoraModel:
    """The base's class from its config.json (or the adapter's task_type); subclasses name the task."""

    task_type: ClassVar[str | None] = None

    def __init__(self) -> None:
        raise LorakitError(f"{type(self).__name__} is made by {type(self).__name__}.from_pretrained(adapter_folder)")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: object | None = None,
        **kwargs: Any,
    ) -> LoraModel:
        """kwargs go to the base's from_pretrained (dtype, device_map, ...), as in PEFT's Auto classes."""
        read = read_config(pretrained_model_name_or_path)
        base = read.base_model_name_or_path
        if not base:
            raise LorakitError(
                f"{pretrained_model_name_or_path}'s adapter_config.json names no base_model_name_or_path (an adapter "
                "saved from a model built from a config); load the base yourself: "
                "LoraModel.from_pretrained(base_model, folder)"
            )
        model = models.load_model(base, cls.task_type or read.task_type, **kwargs)
        return LoraModel.from_pretrained(
            model, pretrained_model_name_or_path, adapter_name=adapter_name, is_trainable=is_trainable, config=config
        )


class AutoLoraModelForCausalLM(AutoLoraModel):
    task_type = "CAUSAL_LM"


class AutoLoraModelForSeq2SeqLM(AutoLoraModel):
    task_type = "SEQ_2_SEQ_LM"


class AutoLoraModelForSequenceClassification(AutoLoraModel):
    task_type = "SEQ_CLS"


class AutoLoraModelForTokenClassification(AutoLoraModel):
    task_type = "TOKEN_CLS"


class AutoLoraModelForQuestionAnswering(AutoLoraModel):
    task_type = "QUESTION_ANS"


class AutoLoraModelForFeatureExtraction(AutoLoraModel):
    task_type = "FEATURE_EXTRACTION"
