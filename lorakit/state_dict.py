"""PEFT's get_peft_model_state_dict / set_peft_model_state_dict / load_peft_weights for a LoraModel: one adapter's
tensors under PEFT's keys (the adapter name left out), as PEFT's functions give and take them, for code written
against PEFT; and get_ / set_base_model_state_dict: the base model's own tensors under the keys it had before any
adapter (what FSDP and checkpoint code written for the bare model expect).

The keys are io.py's (adapter_tensors, the ones save_pretrained writes), so a dict from either library loads in the
other. Loading checks every key and shape before it changes anything. A model adapted by inject_adapter_in_model
(no wrapper) has PEFT's keys for such a model: without the "base_model.model." prefix.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys
from torch.nn.utils import parametrize

from lorakit import io
from lorakit.errors import LorakitError
from lorakit.injected import owner_of
from lorakit.layer import LoraLayer
from lorakit.model import LoraModel, remap_keys
from lorakit.saved import SavedModule


def get_peft_model_state_dict(
    model: LoraModel | nn.Module,
    state_dict: dict[str, Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: str | bool = "auto",
) -> dict[str, Tensor]:
    """Adapter `adapter_name`'s tensors by PEFT key, detached views of the live ones (no copy), as PEFT's function.

    state_dict: the model's own state_dict (lorakit's keys) to read the values from instead, as gathered under
    DeepSpeed ZeRO-3 or FSDP. unwrap_compiled: a torch.compile'd LoraModel is read through its `_orig_mod`.
    save_embedding_layers: the base tables of the input / output embeddings too (io.embedding_base_tensors)."""
    model, bare = _lora_model(model, unwrap_compiled)
    config = _config(model, adapter_name)
    live = io.adapter_tensors(model.model, adapter_name, config)
    live |= io.embedding_base_tensors(model.model, config, save_embedding_layers)
    if state_dict is not None and bare:  # the injected model's own state_dict: its keys are the LoraModel's minus
        state_dict = {f"model.{key}": value for key, value in state_dict.items()}  # the wrapper's "model."
    got = (
        {key: t.detach() for key, t in live.items()}
        if state_dict is None
        else _from_state_dict(model, live, state_dict)
    )
    return {key.removeprefix(io.PEFT_PREFIX): t for key, t in got.items()} if bare else got


def set_peft_model_state_dict(
    model: LoraModel | nn.Module,
    peft_model_state_dict: dict[str, Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> _IncompatibleKeys:
    """Copies a dict of get_peft_model_state_dict's form (either library's) into adapter `adapter_name` in place.

    Returns PEFT's load result. missing_keys: this adapter's keys (in the dict's form) that the dict lacks, left as
    they were; PEFT lists every key of the model not loaded, base weights included, with the adapter name inside.
    unexpected_keys: always empty, since a key that is not this adapter's (another model or config) raises, as a
    shape that does not fit does, unless ignore_mismatched_sizes skips that tensor with PEFT's warning.
    low_cpu_mem_usage: accepted as PEFT's; no effect (the adapter's tensors exist and are copied into)."""
    model, bare = _lora_model(model, unwrap_compiled=True)  # PEFT's would load nothing into a compiled model's keys
    config = _config(model, adapter_name)
    # either form loads into either model: a PeftModel's dict (prefixed) or an injected model's (not)
    peft_model_state_dict = {_prefixed(key): value for key, value in peft_model_state_dict.items()}
    if adapter_name in model.merged_adapters:  # the merged weight would keep the old delta, and unmerge the new one
        raise LorakitError(f"adapter {adapter_name!r} is merged into the weights; unmerge_adapter() before setting it")
    weights = io.without_peft_wrapper_names(peft_model_state_dict)
    expected = io.adapter_tensors(model.model, adapter_name, config) | io.base_weights_in_file(model.model, weights)
    unexpected = sorted(k for k in weights if k not in expected)
    if unexpected:
        raise LorakitError(
            f"{len(unexpected)} keys are not tensors of adapter {adapter_name!r} of this model (a dict from another "
            "model, or an adapter with other target_modules, r or modules_to_save?); get_peft_model_state_dict's "
            f"keys carry no adapter name: {io.few(unexpected)}"
        )
    mismatched = [
        (key, tuple(weights[key].shape), tuple(target.shape))
        for key, target in expected.items()
        if key in weights and weights[key].shape != target.shape
    ]
    if mismatched and not ignore_mismatched_sizes:
        raise LorakitError(
            "tensors whose shapes do not fit this model (another base model, or another r?); pass "
            "ignore_mismatched_sizes=True to leave them as they are:\n  "
            + "\n  ".join(f"{key}: the dict has {theirs}, the model needs {ours}" for key, theirs, ours in mismatched)
        )
    if mismatched:
        _warn_mismatched(mismatched)
    skipped = {key for key, _, _ in mismatched}
    with torch.no_grad():
        for key, target in expected.items():
            if key in weights and key not in skipped:
                target.copy_(weights[key])
    missing = [k for k in expected if k not in weights or k in skipped]
    if bare:
        missing = [k.removeprefix(io.PEFT_PREFIX) for k in missing]
    return _IncompatibleKeys(missing_keys=missing, unexpected_keys=[])


def load_peft_weights(
    model_id: str | Path, device: str | None = None, key_mapping: dict[str, str] | None = None, **kwargs: Any
) -> dict[str, Tensor]:
    """PEFT's: an adapter folder's tensors under the keys of its file, on `device` (CUDA where there is one, as
    PEFT's), for set_peft_model_state_dict. Only safetensors files are read (adapter_model.bin is a pickle, refused
    with the fix); key_mapping renames keys by regex as PEFT's; of PEFT's hub arguments, subfolder is taken."""
    hub = sorted(k for k, v in kwargs.items() if k != "subfolder" and v is not None)
    if hub:
        raise LorakitError(
            f"load_peft_weights got {hub}: lorakit reads local adapter folders only; download the adapter first "
            "(huggingface_hub.snapshot_download(repo_id, revision=...)) and pass its folder"
        )
    folder = Path(model_id) / kwargs["subfolder"] if kwargs.get("subfolder") else Path(model_id)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    weights = {key: value.to(device) for key, value in io.read_weights(folder).items()}
    return remap_keys(weights, key_mapping)


def get_base_model_state_dict(model: LoraModel | nn.Module) -> dict[str, Tensor]:
    """PEFT's: the base model's tensors (merged adapters in them, if any) under its original keys, no adapter's."""
    model, _ = _lora_model(model, unwrap_compiled=True)
    state = model.model.state_dict()
    return {original: state[key] for key, original in _original_keys(model.model).items() if key in state}


def set_base_model_state_dict(
    model: LoraModel | nn.Module, state_dict: dict[str, Tensor], strict: bool = True
) -> _IncompatibleKeys:
    """PEFT's: `state_dict` (the base model's original keys) copied into the wrapped base; adapters untouched.
    strict: missing or unexpected keys raise (PEFT's RuntimeError), nothing loaded."""
    model, _ = _lora_model(model, unwrap_compiled=True)
    to_key = {original: key for key, original in _original_keys(model.model).items()}
    unexpected = [k for k in state_dict if k not in to_key]
    missing = [k for k in to_key if k not in state_dict]
    if strict and (missing or unexpected):
        errors = [f"Missing key(s) in state_dict: {missing}"] if missing else []
        errors += [f"Unexpected key(s) in state_dict: {unexpected}"] if unexpected else []
        raise RuntimeError("Error(s) in loading state_dict:\n\t" + "\n\t".join(errors))
    model.model.load_state_dict({to_key[k]: v for k, v in state_dict.items() if k in to_key}, strict=False)
    return _IncompatibleKeys(missing_keys=missing, unexpected_keys=unexpected)


def _original_keys(module: nn.Module, key: str = "", original: str = "") -> dict[str, str]:
    """state_dict key -> the key it had before adaptation, for the base's own tensors: a LoraLayer stands for its
    base_layer (its adapters left out), a saved module for its original, a parametrized tensor for its original."""
    if isinstance(module, LoraLayer):
        return _original_keys(module.base_layer, _join(key, "base_layer"), original)
    if isinstance(module, SavedModule):
        return _original_keys(module.original_module, _join(key, "original_module"), original)
    found = {}
    own = {
        **module._parameters,
        **{n: b for n, b in module._buffers.items() if n not in module._non_persistent_buffers_set},
    }
    found |= {_join(key, n): _join(original, n) for n, t in own.items() if t is not None}
    if parametrize.is_parametrized(module):
        found |= {_join(key, f"parametrizations.{n}.original"): _join(original, n) for n in module.parametrizations}
    for name, child in module._modules.items():
        if child is not None and not (name == "parametrizations" and parametrize.is_parametrized(module)):
            found |= _original_keys(child, _join(key, name), _join(original, name))
    return found


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _lora_model(model: object, unwrap_compiled: bool) -> tuple[LoraModel, bool]:
    """The LoraModel, and whether `model` is a model adapted by inject_adapter_in_model (keys without the prefix)."""
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    if isinstance(model, LoraModel):
        return model, False
    owner = owner_of(model) if isinstance(model, nn.Module) else None
    if owner is None:
        fix = "pass unwrap_compiled=True" if hasattr(model, "_orig_mod") else "pass the model get_lora_model returned"
        raise LorakitError(
            f"expected a LoraModel or a model adapted by inject_adapter_in_model, got {type(model).__name__}: {fix}"
        )
    return owner, True


def _prefixed(key: str) -> str:
    """A key in PeftModel's form; "base_model.<x>" keys (VeRA's shared vera_A / vera_B) are in it already."""
    return key if key.startswith("base_model.") else io.PEFT_PREFIX + key


def _config(model: LoraModel, adapter_name: str):
    if adapter_name not in model.peft_config:
        raise LorakitError(f"no adapter {adapter_name!r} in this model; it has {sorted(model.peft_config)}")
    return model.peft_config[adapter_name]


def _from_state_dict(model: LoraModel, live: dict[str, Tensor], state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The values `state_dict` (the LoraModel's keys) holds for each live tensor; one the model's state_dict does not
    hold (a base weight computed on reading, such as a 4-bit one) is read live."""
    own = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        own.setdefault(id(tensor), key)
    absent = [own[id(t)] for t in live.values() if id(t) in own and own[id(t)] not in state_dict]
    if absent:
        raise LorakitError(f"the state_dict passed lacks tensors of this adapter: {io.few(absent)}")
    return {key: (state_dict[own[id(t)]] if id(t) in own else t).detach() for key, t in live.items()}


def _warn_mismatched(mismatched: list[tuple[str, tuple, tuple]]) -> None:
    """PEFT's warning for the tensors ignore_mismatched_sizes skipped."""
    found = "found shape {} in the checkpoint and {} in the model instantiated"
    listed = "\n".join(f"- {key}: {found.format(theirs, ours)}" for key, theirs, ours in mismatched)
    warnings.warn(
        "Some weights of LoraModel were not initialized from the model checkpoint and are being ignored because "
        f"you passed `ignore_mismatched_sizes=True`: {listed}.",
        stacklevel=3,
    )
