"""Adapter folders in PEFT's format: adapter_config.json + adapter_model.safetensors.

This module alone knows PEFT's key names. One function maps every live adapter tensor to its key, and
both saving and loading go through it, so what is written is exactly what is read back.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from lorakit import atomic
from lorakit.config import LORAKIT_ONLY_FIELDS, LoraConfig, read_json_object
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.inject import layer_chain, lora_layers, saved_modules
from lorakit.layer import LoraLayer
from lorakit.names import check_adapter_name
from lorakit.targets import logical_modules, modules_to_save, saved_name_matches
from lorakit.variants import TrainableTokensConfig, VeraConfig
from lorakit.variants.init import converted_config, converted_to_lora

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_WHOLE_MODEL_NAME = "model.safetensors"  # what transformers.Trainer writes for a model it does not know
LORAKIT_CONFIG_NAME = "lorakit_config.json"  # lorakit-only settings (variant), kept out of PEFT's file
_PREFIX = PEFT_PREFIX = "base_model.model."  # PeftModel's path to the base model, in PEFT's file keys
_EMBEDDING_NAMES = ("embed_tokens", "lm_head")  # PEFT's EMBEDDING_LAYER_NAMES: what save_embedding_layers looks for
_FACTOR_KEYS = {  # kind.is_embedding -> adapter attribute -> PEFT's name
    False: {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_B_bias": "lora_B.bias"},
    True: {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"},
}
_CONFIG_CLASSES = {"LORA": LoraConfig, "VERA": VeraConfig, "TRAINABLE_TOKENS": TrainableTokensConfig}
# trained token rows: inside PEFT's token_adapter wrapper when they come with LoRA, on the embedding when alone
_TOKEN_KEYS = {
    "LORA": "token_adapter.trainable_tokens_delta",
    "TRAINABLE_TOKENS": "trainable_tokens_delta",
}


def adapter_tensors(model: nn.Module, name: str, config: LoraConfig | VeraConfig) -> dict[str, Tensor]:
    """PEFT key -> the live tensor it names, for adapter `name` of `model` (the unwrapped base)."""
    tensors: dict[str, Tensor] = {}
    shared: dict[str, Tensor] = {}
    for path, layer in _layers_by_key_path(model, name):
        adapter = layer.adapters[name]
        # A and B under PEFT's names; a variant's own tensors (variant_state: DoRA's lora_magnitude_vector,
        # VeRA's vera_lambda_b/d) under their attribute names, which are PEFT's
        for local, tensor in adapter.state_dict(keep_vars=True).items():
            local = local.removeprefix("variant_state.")
            if local == "trainable_tokens_delta":
                local = _TOKEN_KEYS[config.peft_type]
            tensors[f"{_PREFIX}{path}.{_FACTOR_KEYS[layer.kind.is_embedding].get(local, local)}"] = tensor
        if adapter.variant.changes_base_weight:  # Delta-LoRA: the trained weight is part of the adapter
            tensors[f"{_PREFIX}{path}.base_layer.{layer.kind.weight_name()}"] = layer.stored_weight
        shared.update(adapter.variant.shared_tensors())
        if config.bias == "lora_only" and layer.bias is not None:
            tensors[f"{_PREFIX}{path}.base_layer.bias"] = layer.bias
    if getattr(config, "save_projection", False):  # VeRA's shared pair, PEFT's "base_model.vera_A"
        tensors.update({f"base_model.{key}": tensor for key, tensor in shared.items()})
    if config.bias == "all":
        for param_path, param in model.named_parameters():
            in_saved = ".copies." in param_path or ".original_module." in param_path  # saved below
            if param_path.rsplit(".", 1)[-1] == "bias" and not in_saved:
                tensors[_PREFIX + param_path] = param
    for path, saved in saved_modules(model):
        if name in saved.copies:
            for key, value in saved.copies[name].state_dict(keep_vars=True).items():
                tensors[f"{_PREFIX}{path}.{key}"] = value
    return tensors


def _layers_by_key_path(model: nn.Module, name: str) -> list[tuple[str, LoraLayer]]:
    """(path its keys name, layer) for every layer holding adapter `name`. The weight layers of one module are
    named as PEFT names its nested ParamWrappers for this adapter's weights alone: the weight the module registered
    last is `<module>`, the one before `<module>.base_layer`, and so on inwards, whatever other adapters adapt."""
    found, nested = [], set()
    for path, layer in lora_layers(model):
        if id(layer) in nested:
            continue
        chain = layer_chain(layer)
        nested.update(id(inner) for inner in chain[1:])
        held = [inner for inner in chain if name in inner.adapters]
        if len(held) > 1:  # several weights of one module
            held.sort(key=lambda inner: -inner.weight_order.index(inner.kind.weight_name()))
        found.extend((path + ".base_layer" * depth, inner) for depth, inner in enumerate(held))
    return found


@dataclass(frozen=True)
class TensorRole:
    """What one tensor of an adapter file is, read from its key: tools describe files without knowing PEFT's keys."""

    key: str
    module: str  # the module path it belongs to
    role: str  # "lora_A", "lora_B", "saved" (a module trained in full), or "other" (biases, variant vectors)
    rank: int | None  # the LoRA rank for factors, else None


_FACTOR_ROLES = {
    suffix: role for keys in _FACTOR_KEYS.values() for role, suffix in keys.items() if role != "lora_B_bias"
}


def tensor_roles(
    config: LoraConfig | VeraConfig | TrainableTokensConfig, weights: dict[str, Tensor]
) -> list[TensorRole]:
    """The role of every tensor in `weights` (an adapter file's), in key order."""
    saved = set(modules_to_save(config))
    roles = []
    for key in sorted(weights):
        path = key.removeprefix(_PREFIX)
        role = next(((r, path.removesuffix("." + s)) for s, r in _FACTOR_ROLES.items() if path.endswith("." + s)), None)
        if role is not None:
            rank = weights[key].shape[0 if role[0] == "lora_A" else 1]
            roles.append(TensorRole(key, role[1], role[0], rank))
            continue
        parts = path.split(".")
        hit = next((i for i in range(len(parts)) if saved_name_matches(".".join(parts[: i + 1]), saved)), None)
        if hit is not None:
            roles.append(TensorRole(key, ".".join(parts[: hit + 1]), "saved", None))
        else:
            roles.append(TensorRole(key, path.rsplit(".", 1)[0], "other", None))
    return roles


def _whole(tensor: Tensor) -> Tensor:
    """A tensor sharded by FSDP (a DTensor) gathered from every rank; a collective call. Others as they are."""
    tensor = tensor.detach()
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def save_adapter(
    model: nn.Module,
    name: str,
    config: LoraConfig | VeraConfig,
    directory: str | Path,
    initial: str | Path | None = None,
    write: bool = True,
    save_embedding_layers: str | bool = "auto",
) -> None:
    """Writes the adapter folder as one change (lorakit.atomic): a kill leaves it wholly old or wholly new.

    initial: the folder of this adapter saved right after a PiSSA / OLoRA init; the file written is then a
    plain LoRA of rank 2r against the original base weight (PEFT's path_initial_model_for_weight_conversion).
    write: False on the other ranks of a sharded model, which only take part in gathering the tensors.
    save_embedding_layers: PEFT's; see embedding_base_tensors.
    """
    check_adapter_name(name)  # the last defence: a name never leads outside the save folder
    live = adapter_tensors(model, name, config) | embedding_base_tensors(model, config, save_embedding_layers)
    tensors = _unaliased({k: _whole(v).cpu().contiguous() for k, v in live.items()})
    if not write:
        return
    if initial is not None:
        tensors, config = converted_to_lora(tensors, read_weights(initial)), converted_config(config)
    peft_part, lorakit_part = _split_config(config.to_dict() | {"inference_mode": True})
    files = {WEIGHTS_NAME: save(tensors, metadata={"format": "pt"}), CONFIG_NAME: _json_bytes(peft_part)}
    if lorakit_part:
        files[LORAKIT_CONFIG_NAME] = _json_bytes(lorakit_part)
    atomic.replace_folder(directory, files, owned={CONFIG_NAME, WEIGHTS_NAME, LORAKIT_CONFIG_NAME})


def embedding_base_tensors(
    model: nn.Module, config: LoraConfig | VeraConfig, save_embedding_layers: str | bool = "auto"
) -> dict[str, Tensor]:
    """PEFT's save_embedding_layers: the input and output embeddings' own tensors, saved whole beside the adapter so
    that a resized vocabulary travels with it. An adapted one gives its base layer's (`<path>.base_layer.weight`);
    one without LoRA is saved itself (`<path>.weight`) only where target_modules does not name an embedding. "auto"
    is True where target_modules names embed_tokens or lm_head (not with trainable tokens, whose point is to save
    little); PEFT's other "auto" case, a vocabulary resized since the base checkpoint named in
    base_model_name_or_path, needs that checkpoint's config, which lorakit does not fetch."""
    if save_embedding_layers not in ("auto", True, False):
        raise ConfigError(f"save_embedding_layers must be 'auto', True or False, not {save_embedding_layers!r}")
    named = _names_an_embedding(model, config)
    tokens = getattr(config, "trainable_token_indices", None) is not None
    if save_embedding_layers is False or (save_embedding_layers == "auto" and (not named or tokens)):
        return {}
    tensors = {}
    for path, layer, adapted in _embedding_layers(model):
        if adapted or not named:
            tensors |= {f"{_PREFIX}{path}.{name}": t for name, t in _own_tensors(layer) if t is not None}
    return tensors


def _embedding_layers(model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """(key path, module, adapted) of the model's input and output embeddings that a file may carry whole: an adapted
    one by its base layer (`<path>.base_layer`), a plain one by itself; a module saved whole per adapter is not."""
    paths = {id(m): p for p, m in lora_layers(model)}
    plain = {id(m): p for p, m in model.named_modules()}
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:  # transformers raises for models without word embeddings (Wav2Vec2)
            layer = getattr(model, getter)()
        except (AttributeError, NotImplementedError, TypeError):
            continue
        if isinstance(layer, LoraLayer) and isinstance(layer.base_layer, (nn.Linear, nn.Embedding)):
            found.append((f"{paths[id(layer)]}.base_layer", layer, True))
        elif isinstance(layer, (nn.Linear, nn.Embedding)) and id(layer) in plain:
            found.append((plain[id(layer)], layer, False))
    return found


def _own_tensors(layer: nn.Module) -> list[tuple[str, Tensor | None]]:
    if isinstance(layer, LoraLayer):
        return [(layer.kind.weight_name(), layer.stored_weight), ("bias", layer.bias)]
    return [("weight", layer.weight), ("bias", getattr(layer, "bias", None))]


def _names_an_embedding(model: nn.Module, config: LoraConfig | VeraConfig) -> bool:
    """PEFT's test: a list that holds "embed_tokens" or "lm_head" itself, or a regex (not all-linear) that matches the
    path of a module so named."""
    targets = config.target_modules
    if isinstance(targets, str) and targets != "all-linear":
        paths = [p for p, _ in logical_modules(model) if p.rsplit(".", 1)[-1] in _EMBEDDING_NAMES]
        return any(re.fullmatch(targets, p) for p in paths)
    return not isinstance(targets, str) and any(name in (targets or []) for name in _EMBEDDING_NAMES)


def _unaliased(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """safetensors refuses two keys on one storage (tied input and output embeddings both saved): later ones copied."""
    seen: set[int] = set()
    out = {}
    for key, tensor in tensors.items():
        ptr = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out


def _split_config(data: dict) -> tuple[dict, dict]:
    """PEFT's keys for adapter_config.json, lorakit's own for lorakit_config.json (PEFT warns on unknown keys)."""
    lorakit_part = {k: data.pop(k) for k in LORAKIT_ONLY_FIELDS if k in data}
    return data, lorakit_part


def _json_bytes(data: dict) -> bytes:
    return json.dumps(data, indent=2, sort_keys=True).encode()


def read_config(directory: str | Path) -> LoraConfig | VeraConfig:
    """The adapter's config, of the class its peft_type names (LORA or VERA), with lorakit_config.json's settings."""
    directory = _adapter_dir(directory)
    data = read_json_object(directory / CONFIG_NAME)
    if (directory / LORAKIT_CONFIG_NAME).exists():
        extra = read_json_object(directory / LORAKIT_CONFIG_NAME)
        unknown = sorted(set(extra) - set(LORAKIT_ONLY_FIELDS))
        if unknown:
            raise ConfigError(f"{directory / LORAKIT_CONFIG_NAME} has unknown settings {unknown}")
        data |= extra
    peft_type = data.get("peft_type", "LORA")
    if not isinstance(peft_type, str):
        raise ConfigError(f"peft_type in {directory / CONFIG_NAME} must be a string such as 'LORA', got {peft_type!r}")
    try:
        return _CONFIG_CLASSES.get(peft_type, LoraConfig).from_dict(data)
    except ConfigError as err:  # which file says it: a user with several adapter folders needs to know
        raise type(err)(f"{directory / CONFIG_NAME}: {err}") from None


def as_config(config: object) -> LoraConfig | VeraConfig | TrainableTokensConfig:
    """lorakit's config for `config`: itself, or a PEFT config object (peft.LoraConfig, peft.VeraConfig, ...) read
    as its adapter_config.json would be, so code written for get_peft_model passes its config unchanged."""
    if isinstance(config, tuple(_CONFIG_CLASSES.values())):
        return config
    to_dict = getattr(config, "to_dict", None)
    if not callable(to_dict) or getattr(config, "peft_type", None) is None:
        raise ConfigError(f"expected a lorakit or PEFT LoraConfig, got {type(config).__name__}")
    data = json.loads(json.dumps(to_dict(), default=_json_value))  # enums -> their values, sets -> lists
    peft_type = data.get("peft_type")
    if peft_type not in _CONFIG_CLASSES:
        raise ConfigError(
            f"a PEFT {type(config).__name__} (peft_type {peft_type!r}): lorakit takes {sorted(_CONFIG_CLASSES)} configs"
        )
    return _CONFIG_CLASSES[peft_type].from_dict(data)


def _json_value(value: object) -> object:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return getattr(value, "value", str(value))


def read_weights(directory: str | Path) -> dict[str, Tensor]:
    directory = _adapter_dir(directory)
    path = directory / WEIGHTS_NAME
    if path.exists() and not path.is_file():
        raise AdapterFileError(f"{path} is a {'folder' if path.is_dir() else 'special file'}, not a safetensors file")
    if not path.exists():
        if (directory / "adapter_model.bin").exists():
            raise AdapterFileError(
                f"{directory} holds adapter_model.bin, a pickle file, which lorakit never loads (it can run "
                "code); convert it to adapter_model.safetensors with PEFT's save_pretrained"
            )
        raise AdapterFileError(f"no {WEIGHTS_NAME} in {directory}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(
            f"{path} is not a readable safetensors file ({err}); it is truncated or corrupt: save it again"
        ) from None


def load_weights(model: nn.Module, name: str, config: LoraConfig, weights: dict[str, Tensor]) -> None:
    """Copies file tensors into adapter `name`; checks every key and shape before changing anything."""
    weights = without_peft_wrapper_names(weights)
    expected = adapter_tensors(model, name, config) | base_weights_in_file(model, weights)
    problems = []
    missing = sorted(k for k in expected if k not in weights)
    unexpected = sorted(k for k in weights if k not in expected)
    if missing:
        problems.append(f"missing from the file: {few(missing)}")
    if unexpected:
        problems.append(f"not in the model: {few(unexpected)}")
    for key, target in expected.items():
        if key in weights and weights[key].shape != target.shape:
            problems.append(
                f"{key}: the file has shape {tuple(weights[key].shape)}, the model needs {tuple(target.shape)}"
            )
    if problems:
        raise AdapterFileError(
            "the adapter file does not fit this base model as adapter_config.json adapts it (trained on another "
            "base model, or a config whose r, target_modules, layers_to_transform or modules_to_save differ from "
            "the ones that saved these tensors?):\n  " + "\n  ".join(problems)
        )
    bad = [p for key, t in expected.items() if key in weights and (p := _value_problem(key, weights[key], t))]
    if bad:
        raise AdapterFileError(
            "the adapter file holds values no adapter has (corrupt or edited?):\n  " + "\n  ".join(bad)
        )
    with torch.no_grad():
        for key, target in expected.items():
            if key in weights:
                target.copy_(weights[key])


def base_weights_in_file(model: nn.Module, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """PEFT's key -> base tensor of an input / output embedding whose own tensors the file carries
    (embedding_base_tensors: PEFT and lorakit save them under save_embedding_layers), to be loaded into the base as
    PEFT's load does; an adapted layer's base layer, or the plain module."""
    found = {}
    for path, layer, adapted in _embedding_layers(model):
        if adapted and layer.merged_adapters:
            continue
        for name, tensor in _own_tensors(layer):
            key = f"{_PREFIX}{path}.{name}"
            if key in weights and tensor is not None:
                found[key] = tensor
    return found


def _value_problem(key: str, tensor: Tensor, target: Tensor) -> str | None:
    """Integer or bool data where the model holds floats would be converted without a word; NaN / inf spread."""
    if target.is_floating_point() and not tensor.is_floating_point():
        return f"{key} has dtype {str(tensor.dtype).removeprefix('torch.')}; adapter weights are floating point"
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor.float()).all()):
        return f"{key} holds NaN or infinite values"
    return None


def without_peft_wrapper_names(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    # With bias="all" PEFT also writes the biases inside its modules_to_save wrapper:
    # "<m>.modules_to_save.bias" (or "<m>.modules_to_save.<adapter>.<sub>.bias" for a module with submodules) is the
    # trained copy's bias, also under "<m>.bias" ("<m>.<sub>.bias"), and "<m>.original_module..." the frozen
    # base's, which an adapter does not carry.
    out = {}
    for key, value in weights.items():
        if ".original_module." in key:
            continue
        if ".modules_to_save." in key:
            head, tail = key.split(".modules_to_save.", 1)
            named = f"{head}.{tail.split('.', 1)[-1]}"  # the adapter's name dropped
            if named in weights:
                continue
            key = f"{head}.{tail}"
        out.setdefault(key, value)
    return out


def _adapter_dir(directory: str | Path) -> Path:
    directory = Path(directory)
    if directory.is_file():
        raise AdapterFileError(
            f"{directory} is a file; pass the adapter folder that holds {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    if not directory.is_dir():
        raise AdapterFileError(f"adapter folder {directory} does not exist")
    if not (directory / CONFIG_NAME).exists() and (directory / _WHOLE_MODEL_NAME).is_file():
        raise AdapterFileError(
            f"{directory} holds {_WHOLE_MODEL_NAME}, a whole model's state dict (transformers.Trainer's checkpoints "
            "and save_model() write one for a LoraModel: it writes adapter folders only for PEFT's own class), not "
            "an adapter folder; load it with get_lora_model(base, config).load_state_dict(safetensors.torch."
            "load_file(...)), then save the adapter with model.save_pretrained(folder)"
        )
    atomic.check_complete(directory)
    return directory


def few(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")
