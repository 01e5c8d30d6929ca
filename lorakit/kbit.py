"""PEFT's prepare_model_for_kbit_training, for QLoRA recipes that call it on a quantized base before adapting it.

What it does, as PEFT's function does it: every parameter frozen; half-precision parameters (not the 4-bit packed
ones) cast to fp32, unless the model is quantized by a method that keeps its own weights (GPTQ, AQLM, EETQ, torchao,
HQQ); and on a quantized model, gradient checkpointing on, with the embeddings' output requiring grad where
checkpointing is reentrant (its recomputed segments otherwise see no input that needs a gradient, and the adapters
get none). lorakit's own 4-bit base (LoraConfig's QLoRA path) needs none of this.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

_OWN_WEIGHTS = ("gptq", "aqlm", "eetq", "torchao", "hqq")  # quantization methods whose weights are left as they are


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict | None = None,
    auto_clear_cache: bool = True,
) -> nn.Module:
    """The model, prepared in place (PEFT's arguments and semantics)."""
    method = getattr(model, "quantization_method", None)
    own_weights = method in _OWN_WEIGHTS or getattr(model, "hqq_quantized", False)
    quantized = own_weights or getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
    kwargs = dict(gradient_checkpointing_kwargs or {})
    for param in model.parameters():
        param.requires_grad_(False)
    if not own_weights:
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
                param.data = param.data.float()
        if auto_clear_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()  # the half-precision copies are gone: give their memory back
    if quantized and use_gradient_checkpointing:
        if kwargs.get("use_reentrant", True):
            inputs_require_grad(model)
        enable = model.gradient_checkpointing_enable
        takes_kwargs = "gradient_checkpointing_kwargs" in inspect.signature(enable).parameters
        enable(**({"gradient_checkpointing_kwargs": kwargs} if takes_kwargs else {}))
    return model


def inputs_require_grad(model: nn.Module) -> None:
    """The input embeddings' outputs require grad, so reentrant checkpointing passes gradients into its segments."""
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
        return
    model.get_input_embeddings().register_forward_hook(lambda module, args, output: output.requires_grad_(True))
