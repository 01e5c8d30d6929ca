"""LoraConfig: PEFT's field names and meanings, validated where the values enter."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit import checks
from lorakit.errors import ConfigError

TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = (True, False, "gaussian", "orthogonal", "pissa", "olora")  # and "pissa_niter_<K>"
VARIANTS = ("lora", "lora_fa", "delta_lora")  # DoRA is PEFT's use_dora; VeRA has its own VeraConfig
LORAKIT_ONLY_FIELDS = ("variant",)  # not PEFT's: saved in lorakit_config.json, so PEFT reads its file silently
_MAX_CONFIG_BYTES = 16 * 2**20

# How each key PEFT 0.21 writes into adapter_config.json is read, beyond LoraConfig's own fields.
# Bookkeeping, or settings that only steer how PEFT initialises the factors (a saved adapter is a plain LoRA):
# read past, their value checked only for its type (null allowed).
_PEFT_IGNORED: dict[str, type] = {
    "auto_mapping": dict, "peft_version": str, "revision": str, "peft_type": str, "runtime_config": dict,
    "megatron_core": str, "megatron_config": dict,  # used only on Megatron's parallel layers, never adapted here
    "qalora_group_size": int,  # used only with use_qalora
    "eva_config": dict, "corda_config": dict, "loftq_config": dict, "lora_ga_config": dict,  # init-time settings
}  # fmt: skip
_MERGE_IN_PEFT = "load it with PEFT and merge it into the base (merge_and_unload()), then use the merged model"
# Settings that change the forward pass, refused unless at PEFT's default: key -> why, and what PEFT offers.
PEFT_UNSUPPORTED = {
    "use_qalora": f"QA-LoRA pools the layer input in groups (PEFT: GPTQ models only); {_MERGE_IN_PEFT}",
    "alora_invocation_tokens": "Activated LoRA applies the adapter only from the invocation tokens on, which lorakit "
    "does not implement (PEFT cannot merge it either); use it with PEFT",
    "layer_replication": f"PEFT stacks copies of the base's layers, which lorakit does not; {_MERGE_IN_PEFT}",
    "use_bdlora": f"BD-LoRA's block-diagonal factors are not implemented in lorakit; {_MERGE_IN_PEFT}",
    "arrow_config": "Arrow routes each token among LoRA experts, which lorakit does not implement; use it with PEFT",
    "kasa_config": f"KaSA's singular-value diagonal (lora_diag) is not implemented in lorakit; {_MERGE_IN_PEFT}",
    "monteclora_config": f"MonteCLoRA samples the factors, which lorakit does not; {_MERGE_IN_PEFT}",
    "velora_config": f"VeLoRA's extra buffers (lora_velora_embed) are not implemented in lorakit; {_MERGE_IN_PEFT}",
    "ensure_weight_tying": f"lorakit keeps the adapters of tied layers apart; {_MERGE_IN_PEFT}",
}
# init_lora_weights values of PEFT that lorakit cannot compute. At load, those that leave the base weight alone
# give a plain LoRA (PEFT's update_layer draws factors that the file then overwrites): read as True.
_INIT_PLAIN_AT_LOAD = {
    "eva": "EVA initialises A from the SVD of layer inputs over a dataset; initialise it with PEFT (get_peft_model "
    "with LoraConfig(init_lora_weights='eva', eva_config=...), then initialize_lora_eva_weights(model, dataloader)), "
    "save it, and load that folder here (it is a plain LoRA)",
    "mica": "MiCA trains A only, with B frozen from W's smallest singular vectors; train it with PEFT and load the "
    "saved folder here for inference (it is a plain LoRA)",
}
_CONVERT_IN_PEFT = (
    "PEFT loads it only onto the base its init changed; convert it to a plain LoRA of the original base with PEFT: "
    "save_pretrained(out, path_initial_model_for_weight_conversion=<folder saved right after init>)"
)
_INIT_REFUSED = {
    "corda": _CONVERT_IN_PEFT,
    "lora_ga": _CONVERT_IN_PEFT,
    "loftq": "the adapter belongs to the LoftQ-quantized base that PEFT recomputes at load; save that base with "
    "PEFT (unload().save_pretrained(...)), set init_lora_weights to true in adapter_config.json and load onto it",
}


@dataclass
class LoraConfig:
    """What to adapt and how; the same fields, defaults and JSON as PEFT's LoraConfig.

    target_modules: names matched as suffixes of module paths, a regex matched against the whole path, or
    "all-linear" (every linear layer but the output head). None takes the architecture's default.
    modules_to_save: modules trained in full, every one whose path ends with a name as text, as PEFT matches them
    ("classifier" is also DistilBERT's pre_classifier; "norm" is also every input_layernorm).
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    target_parameters: list[str] | None = None
    lora_dropout: float = 0.0
    bias: str = "none"
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    fan_in_fan_out: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    variant: str = "lora"
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None

    peft_type = "LORA"

    def __post_init__(self) -> None:
        checks.check_fields(self, _FIELD_CHECKS)
        _check_variant(self)
        if isinstance(self.target_modules, str) and self.target_modules.lower() == "all-linear":
            self.target_modules = "all-linear"  # PEFT reads the shorthand in any case
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            raise ConfigError(
                "layers_to_transform cannot be combined with a regex target_modules; "
                "put the layer indices into the regex instead"
            )
        if self.layers_pattern and (self.layers_to_transform is None or isinstance(self.target_modules, str)):
            raise ConfigError(
                "layers_pattern only names where layers_to_transform's indices are read; give layers_to_transform "
                "too, with target_modules as a list of names (as PEFT requires), or drop layers_pattern"
            )

    def rank_and_alpha(self, module_path: str) -> tuple[int, float]:
        """The rank and alpha for one module: rank_pattern / alpha_pattern win over r / lora_alpha."""
        return (
            _pattern_value("rank_pattern", self.rank_pattern, module_path, self.r),
            _pattern_value("alpha_pattern", self.alpha_pattern, module_path, self.lora_alpha),
        )

    def scale(self, r: int, alpha: float) -> float:
        """alpha/r, or alpha/sqrt(r) with rsLoRA so the update size does not shrink as r grows."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_dict(self) -> dict[str, Any]:
        """The adapter_config.json content; readable by PEFT's LoraConfig."""
        out = dataclasses.asdict(self)
        out["peft_type"] = self.peft_type
        if self.variant == "lora":
            del out["variant"]  # plain LoRA files stay byte-for-byte PEFT's; PEFT ignores the field otherwise
        for key in ("target_modules", "exclude_modules"):
            if isinstance(out[key], list):
                out[key] = sorted(out[key])
        if out["target_modules"] is None and self.target_parameters:
            out["target_modules"] = []  # PEFT reads null as its default modules, which this adapter has not
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Reads a PEFT or lorakit adapter_config.json dict; refuses settings it would silently ignore."""
        peft_type = data.get("peft_type", cls.peft_type)
        if peft_type != cls.peft_type:
            raise ConfigError(
                f"adapter_config.json has peft_type {peft_type!r}, but LoraConfig reads only {cls.peft_type!r} adapters"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        wrong = [
            f"{key}={data[key]!r} (expected a {kind.__name__} or null)"
            for key, kind in _PEFT_IGNORED.items()
            if data.get(key) is not None and not isinstance(data[key], kind)
        ]
        if wrong:
            raise ConfigError("adapter_config.json has settings of the wrong type: " + "; ".join(wrong))
        unsupported = [_unsupported(k, v) for k, v in data.items() if k not in known and k not in _PEFT_IGNORED]
        unsupported = [problem for problem in unsupported if problem]
        if unsupported:
            raise ConfigError("adapter_config.json uses settings lorakit does not support: " + "; ".join(unsupported))
        init = kwargs.get("init_lora_weights")
        if isinstance(init, str) and init in _INIT_PLAIN_AT_LOAD:
            kwargs["init_lora_weights"] = True
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | Path) -> LoraConfig:
        return cls.from_dict(read_json_object(path))


def _unsupported(key: str, value: Any) -> str | None:
    """Why a key that is not a LoraConfig field cannot be ignored; None where it is at PEFT's default."""
    if value is None or value is False or (isinstance(value, (dict, list)) and not value):  # not 0, which == False
        return None
    return f"{key}={value!r}: " + PEFT_UNSUPPORTED.get(key, "not a LoRA setting lorakit knows; remove it")


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A config file's JSON object; each way a file can be wrong gives one ConfigError (a FIFO never blocks)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ConfigError(
            f"no {path.name} at {path.parent}: is it an adapter folder written by save_pretrained?"
        ) from None
    except OSError as err:
        raise ConfigError(f"cannot open {path}: {err.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            what = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device)"
            raise ConfigError(f"{path} is {what}; expected a JSON file")
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read(_MAX_CONFIG_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > _MAX_CONFIG_BYTES:
        raise ConfigError(f"{path} is larger than {_MAX_CONFIG_BYTES >> 20} MiB; not an adapter config")
    return _parse_object(path, raw)


def _parse_object(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start}); save it as UTF-8 JSON") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err}); the file is corrupt") from None
    except RecursionError:
        raise ConfigError(f"{path} nests JSON too deeply to be an adapter config; the file is corrupt") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _init_mode(name: str, mode: Any) -> bool | str:
    """init_lora_weights: lorakit's modes; PEFT's others are refused naming what PEFT offers instead."""
    if mode in INIT_MODES and type(mode) in (bool, str) or _is_pissa_niter(mode):
        return mode
    if isinstance(mode, str) and mode in _INIT_REFUSED:
        raise ConfigError(f"init_lora_weights={mode!r} is not supported: {_INIT_REFUSED[mode]}")
    if isinstance(mode, str) and mode in _INIT_PLAIN_AT_LOAD:
        raise ConfigError(
            f"init_lora_weights={mode!r} cannot be computed by lorakit: {_INIT_PLAIN_AT_LOAD[mode]}; or choose one of "
            + repr(INIT_MODES)
        )
    raise ConfigError(f"init_lora_weights must be one of {INIT_MODES} or 'pissa_niter_<K>', got {mode!r}")


def _token_indices(name: str, value: Any) -> list[int] | dict[str, list[int]]:
    """Token ids for the input embedding, or embedding name -> token ids (PEFT's two spellings)."""
    if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
        return {key: token_ids(f"{name}[{key!r}]", ids) for key, ids in value.items()}
    return token_ids(name, value)


def token_ids(name: str, value: Any) -> list[int]:
    """Checks a list of token ids (PEFT's trainable tokens): non-empty, distinct, >= 0."""
    ok = isinstance(value, list) and value and all(type(i) is int and i >= 0 for i in value)
    if not ok or len(set(value)) != len(value):
        raise ConfigError(f"{name} must be a non-empty list of distinct token ids (integers >= 0), got {value!r}")
    return value


def _is_pissa_niter(mode: Any) -> bool:
    return isinstance(mode, str) and re.fullmatch(r"pissa_niter_\d+", mode) is not None  # PEFT: K >= 0


def _check_variant(config: LoraConfig) -> None:
    """Refuses variant combinations that make no sense, where they are chosen."""
    if config.variant == "vera":
        raise ConfigError(
            "VeRA has its own config with PEFT's fields: use lorakit.VeraConfig(r=..., target_modules=...)"
        )
    if config.variant not in VARIANTS:
        raise ConfigError(f"variant must be one of {VARIANTS}, got {config.variant!r} (DoRA is use_dora=True)")
    if config.use_dora and config.variant != "lora":
        raise ConfigError(
            f"use_dora=True cannot be combined with variant={config.variant!r}: DoRA rescales W + dW by a trained "
            "magnitude, which the other variant's update rule does not account for; choose one"
        )
    if config.use_dora and config.target_parameters:
        raise ConfigError(
            "use_dora=True does not work with target_parameters (as in PEFT): DoRA needs a layer's output, "
            "target_parameters adapts a raw weight; target the module with target_modules instead"
        )
    if config.lora_bias and (config.use_dora or config.variant != "lora" or config.target_parameters):
        raise ConfigError(
            "lora_bias=True works with plain LoRA on target_modules only (as in PEFT): not with use_dora, "
            "another variant or target_parameters"
        )
    if config.lora_bias and config.init_lora_weights not in (True, False):
        raise ConfigError(
            f"lora_bias=True needs init_lora_weights True or False (as in PEFT), got {config.init_lora_weights!r}"
        )
    if config.init_lora_weights == "orthogonal":
        odd = sorted(r for r in {config.r, *config.rank_pattern.values()} if r % 2)
        if odd:
            raise ConfigError(
                f"init_lora_weights='orthogonal' splits each rank into two orthogonal halves, so r and rank_pattern "
                f"values must be even (as in PEFT); got {odd}"
            )
    if config.variant == "delta_lora" and config.target_parameters:
        raise ConfigError(
            "variant='delta_lora' updates a layer's weight in place; use target_modules, not target_parameters"
        )


def _pattern_value(field_name: str, patterns: dict[str, Any], module_path: str, default: Any) -> Any:
    """The first matching key's value, as PEFT takes it. Two keys that match one module with different values
    are warned about: adapter_config.json stores keys sorted (as PEFT writes it), so a reload may take the other."""
    found = [(p, v) for p, v in patterns.items() if re.match(rf"(.*\.)?(?:{p})$", module_path)]
    clashing = [p for p, v in found[1:] if v != found[0][1]]
    if clashing:
        warnings.warn(
            f"{field_name} keys {found[0][0]!r} and {clashing[0]!r} both match some modules with different values; "
            "the first in the dict is used now, but adapter_config.json stores its keys sorted (as PEFT does), so "
            "the adapter loaded back may use the other: make the patterns match disjoint modules",
            UserWarning,
            stacklevel=3,
        )
    return found[0][1] if found else default


_FIELD_CHECKS: dict[str, checks.Check] = {
    "r": checks.rank,
    "lora_alpha": checks.finite_number,
    "target_modules": checks.names_or_regex,
    "exclude_modules": checks.names_or_regex,
    "target_parameters": checks.optional(checks.text_list),
    "lora_dropout": checks.probability,
    "bias": checks.one_of(*BIAS_MODES),
    "modules_to_save": checks.optional(checks.text_list),
    "task_type": checks.optional(checks.one_of(*TASK_TYPES)),
    "fan_in_fan_out": checks.boolean,
    "init_lora_weights": _init_mode,
    "rank_pattern": checks.pattern_dict(checks.rank),
    "alpha_pattern": checks.pattern_dict(checks.finite_number),
    "use_rslora": checks.boolean,
    "use_dora": checks.boolean,
    "lora_bias": checks.boolean,
    "trainable_token_indices": checks.optional(_token_indices),
    "variant": checks.text,  # _check_variant names the choices
    "layers_to_transform": checks.layer_indices,
    "layers_pattern": checks.optional(checks.text_or_text_list),
    "inference_mode": checks.boolean,
    "base_model_name_or_path": checks.optional(checks.text),
}
checks.strict_init(LoraConfig, PEFT_UNSUPPORTED)
