"""PEFT's hot-swap functions (peft.utils.hotswap) over lorakit's slots (lorakit.multi.cache), so code written for
PEFT's compiled hot-swapping (diffusers' among it) runs unchanged: prepare before torch.compile, then swap folders
into the compiled model without a recompile.

    prepare_model_for_compiled_hotswap(model, target_rank=64)   # every adapter padded to rank 64, scale folded in B
    model = torch.compile(model)
    hotswap_adapter(model, "adapters/other", adapter_name="default")
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

from torch import nn

from lorakit.errors import ConfigError, LorakitError
from lorakit.model import LoraModel

_CHECKS = ("error", "warn", "ignore")


def prepare_model_for_compiled_hotswap(
    model: nn.Module,
    *,
    target_rank: int | None = None,
    config: Any = None,
    check_compiled: Literal["error", "warn", "ignore"] = "error",
) -> None:
    """PEFT's: every loaded adapter put in slot form before torch.compile (rank padded to `target_rank`, its scale
    folded into B, outputs unchanged), so that later swaps of other ranks and alphas only copy. `config` (a
    LoraConfig or a dict of them) gets r and rank_pattern set to target_rank, as PEFT sets them."""
    from lorakit.multi import cache

    if check_compiled not in _CHECKS:
        raise ConfigError(f"check_compiled must be one of {list(_CHECKS)}, got {check_compiled!r}")
    if _is_compiled(model):
        message = (
            "prepare_model_for_compiled_hotswap was called on a compiled model: call it before torch.compile, or "
            "the padded shapes recompile the model"
        )
        if check_compiled == "error":
            raise LorakitError(message)
        if check_compiled == "warn":
            warnings.warn(message, stacklevel=2)
    lora = _lora_model(model, "prepare_model_for_compiled_hotswap")
    if not lora.peft_config:
        raise LorakitError(
            "the model holds no adapter: load the first adapter (LoraModel.from_pretrained(base, folder)), then call "
            "prepare_model_for_compiled_hotswap, then torch.compile"
        )
    cache.prepare_slots(lora, list(lora.peft_config), target_rank)  # all checked first: none half converted
    if config and target_rank is not None:
        for each in config.values() if isinstance(config, dict) else [config]:
            each.r = target_rank
            each.rank_pattern = dict.fromkeys(each.rank_pattern or {}, target_rank)


def hotswap_adapter(
    model: nn.Module, model_name_or_path: str | Path, adapter_name: str, torch_device: str | None = None, **kwargs: Any
) -> None:
    """PEFT's: the adapter folder copied into the loaded adapter `adapter_name` in place (same name, same layers;
    a compiled model is not recompiled). A different lora_dropout is refused, as PEFT refuses it (the slot keeps
    its own); different rsLoRA or alpha_pattern settings, which PEFT refuses, swap exactly, each layer's scale being
    folded into B. The slot's device is kept, so torch_device only has to agree with it; of PEFT's **kwargs,
    subfolder is taken and the hub's refused (lorakit reads local folders)."""
    hub = sorted(k for k, v in kwargs.items() if k != "subfolder" and v is not None)
    if hub:
        raise LorakitError(
            f"hotswap_adapter got {hub}: lorakit reads local adapter folders only; download the adapter first "
            "(huggingface_hub.snapshot_download(repo_id, revision=...)) and pass its folder"
        )
    lora = _lora_model(model, "hotswap_adapter")
    folder = Path(model_name_or_path)
    if kwargs.get("subfolder"):
        folder = folder / kwargs["subfolder"]
    if torch_device is not None:
        _check_device(lora, adapter_name, torch_device)
    _check_dropout(lora, folder, adapter_name)
    lora.hotswap_adapter(folder, adapter_name)


def _check_dropout(model: LoraModel, folder: Path, adapter_name: str) -> None:
    from lorakit import io

    try:
        incoming = io.read_config(folder)
    except LorakitError:
        return  # the swap itself names what is wrong with the folder, before anything changes
    held = model.peft_config.get(adapter_name)
    if held is not None and getattr(incoming, "lora_dropout", None) != getattr(held, "lora_dropout", None):
        raise LorakitError(
            f"hotswap_adapter: {folder} has lora_dropout={incoming.lora_dropout}, adapter {adapter_name!r} "
            f"{held.lora_dropout}; a swap keeps the adapter's dropout (PEFT refuses this too): load it with "
            "load_adapter instead"
        )


def _is_compiled(model: nn.Module) -> bool:
    return hasattr(model, "_orig_mod") or bool(getattr(model, "_compiled_call_impl", None))


def _lora_model(model: nn.Module, what: str) -> LoraModel:
    inner = getattr(model, "_orig_mod", model)  # torch.compile(model) wraps it
    if not isinstance(inner, LoraModel):
        raise LorakitError(
            f"{what} takes a LoraModel (or torch.compile of one), got {type(inner).__name__}; load the first adapter "
            "with lorakit.LoraModel.from_pretrained(base, folder)"
        )
    return inner


def _check_device(model: LoraModel, adapter_name: str, torch_device: str) -> None:
    import torch

    want = torch.device(torch_device)
    for param in model.parameters():
        if param.device.type == want.type and (want.index is None or param.device.index == want.index):
            return
    raise LorakitError(
        f"hotswap_adapter: torch_device={torch_device!r}, but adapter {adapter_name!r} lives on "
        f"{next(model.parameters()).device}; a swap copies into the adapter where it is (move the model first)"
    )
