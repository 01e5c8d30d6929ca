"""PEFT's low-level API: adapters injected into a model that is returned as it is, with no wrapper around it.

`inject_adapter_in_model(config, model)` adapts `model` in place and returns it, as PEFT's function does, for code
that trains, saves and loads the model itself (a library's own loader, a custom training loop). The LoraModel that
owns the injected layers is kept in the model's __dict__ (not a submodule, so state_dict and named_modules are the
model's own), and the model gets PEFT's `peft_config` attribute. lorakit.get_peft_model_state_dict /
set_peft_model_state_dict read and write such a model with PEFT's keys for it (no "base_model.model." prefix).
"""

from __future__ import annotations

from torch import nn

from lorakit.errors import LorakitError
from lorakit.inject import lora_layers
from lorakit.io import as_config
from lorakit.model import LoraModel, get_lora_model
from lorakit.variants import VeraConfig

_OWNER = "_lorakit_owner"


def inject_adapter_in_model(
    peft_config: object,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict | None = None,
) -> nn.Module:
    """Adds adapter `adapter_name` to `model`'s modules in place and returns `model`: the base frozen, the adapter
    trainable, as after PEFT's function. A second call adds another adapter to the same layers (inactive until
    owner_of(model).set_adapter(name), as LoraModel.add_adapter leaves it). low_cpu_mem_usage: accepted as PEFT's,
    no effect. state_dict: PEFT reads target modules from its keys; here the config's target_modules say them."""
    if isinstance(model, LoraModel):
        raise LorakitError("inject_adapter_in_model takes the base model; this is a LoraModel: use its add_adapter()")
    if state_dict is not None:
        raise LorakitError(
            "inject_adapter_in_model(..., state_dict=...) would guess target modules from the keys; name them in the "
            "config's target_modules instead, then load the values with set_peft_model_state_dict(model, state_dict)"
        )
    config = as_config(peft_config)
    if isinstance(config, VeraConfig):  # as PEFT refuses it: its shared vera_A / vera_B live on the wrapper
        raise LorakitError(
            "inject_adapter_in_model does not take VeRA (its factors are shared model-wide); use get_lora_model"
        )
    owner = owner_of(model)
    if owner is None:
        if next(lora_layers(model), None) is not None:
            raise LorakitError(
                "this model already holds lorakit layers owned by a LoraModel; add the adapter through that "
                "LoraModel's add_adapter()"
            )
        owner = get_lora_model(model, config, adapter_name)
        model.__dict__[_OWNER] = owner
        model.__dict__["peft_config"] = owner.peft_config  # PEFT sets it: code reads model.peft_config[name]
    else:
        owner.add_adapter(adapter_name, config)
    return model


def owner_of(model: nn.Module) -> LoraModel | None:
    """The LoraModel that owns the adapters injected into `model` by inject_adapter_in_model (None if none)."""
    return model.__dict__.get(_OWNER)
