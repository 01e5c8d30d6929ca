"""LoraConfig: PEFT's field names and meanings, validated where the values enter."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError

TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = (True, False, "gaussian", "pissa", "olora")  # and "pissa_niter_<K>"
VARIANTS = ("lora", "lora_fa", "delta_lora")  # DoRA is PEFT's use_dora; VeRA has its own VeraConfig

# Fields PEFT writes that carry bookkeeping, not behaviour; read and ignored whatever their value.
_PEFT_BOOKKEEPING = {
    "auto_mapping",
    "peft_version",
    "revision",
    "megatron_core",
    "qalora_group_size",
    "inference_mode",
    "base_model_name_or_path",
    "peft_type",
    "loftq_config",
}


@dataclass
class LoraConfig:
    """What to adapt and how; the same fields, defaults and JSON as PEFT's LoraConfig.

    target_modules: names matched as suffixes of module paths, a regex matched against the whole path, or
    "all-linear" (every linear layer but the output head). None takes the architecture's default.
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
    variant: str = "lora"
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None

    peft_type = "LORA"

    def __post_init__(self) -> None:
        _check_rank("r", self.r)
        for pattern, rank in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{pattern!r}]", rank)
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)):
            raise ConfigError(f"lora_alpha must be a number, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.init_lora_weights not in INIT_MODES and not _is_pissa_niter(self.init_lora_weights):
            raise ConfigError(
                f"init_lora_weights must be one of {INIT_MODES} or 'pissa_niter_<K>', got {self.init_lora_weights!r}"
            )
        _check_variant(self)
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ConfigError(f"task_type must be one of {TASK_TYPES} or None, got {self.task_type!r}")
        self.target_modules = _names_or_regex("target_modules", self.target_modules)
        self.exclude_modules = _names_or_regex("exclude_modules", self.exclude_modules)
        if self.target_parameters is not None:
            self.target_parameters = list(self.target_parameters)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            raise ConfigError(
                "layers_to_transform cannot be combined with a regex target_modules; "
                "put the layer indices into the regex instead"
            )
        for name in ("rank_pattern", "alpha_pattern"):
            for pattern in getattr(self, name):
                _check_regex(f"{name} key", pattern)

    def rank_and_alpha(self, module_path: str) -> tuple[int, float]:
        """The rank and alpha for one module: rank_pattern / alpha_pattern win over r / lora_alpha."""
        return (
            _pattern_value(self.rank_pattern, module_path, self.r),
            _pattern_value(self.alpha_pattern, module_path, self.lora_alpha),
        )

    def scale(self, r: int, alpha: float) -> float:
        """alpha/r, or alpha/sqrt(r) with rsLoRA so the update size does not shrink as r grows."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_dict(self) -> dict[str, Any]:
        """The adapter_config.json content; readable by PEFT's LoraConfig."""
        out = dataclasses.asdict(self)
        out["peft_type"] = self.peft_type
        out["lora_bias"] = False
        if self.variant == "lora":
            del out["variant"]  # plain LoRA files stay byte-for-byte PEFT's; PEFT ignores the field otherwise
        for key in ("target_modules", "exclude_modules"):
            if isinstance(out[key], list):
                out[key] = sorted(out[key])
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
        kwargs, unsupported = {}, []
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key not in _PEFT_BOOKKEEPING and value not in (None, False, {}, []):
                unsupported.append(f"{key}={value!r}")
        if unsupported:
            raise ConfigError(
                "adapter_config.json uses settings lorakit does not support: "
                + ", ".join(unsupported)
                + "; remove them or retrain the adapter without them"
            )
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | Path) -> LoraConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"no {path.name} at {path.parent}: is it an adapter folder written by save_pretrained?"
            ) from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON ({err}); the file is corrupt") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object, found {type(data).__name__}")
        return cls.from_dict(data)


def _is_pissa_niter(mode: Any) -> bool:
    return isinstance(mode, str) and re.fullmatch(r"pissa_niter_[1-9]\d*", mode) is not None


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
    if config.variant == "delta_lora" and config.target_parameters:
        raise ConfigError(
            "variant='delta_lora' updates a layer's weight in place; use target_modules, not target_parameters"
        )


def _check_rank(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer (the LoRA rank), got {value!r}")


def _check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"{name} {pattern!r} is not a valid regular expression: {err}") from None


def _names_or_regex(name: str, value: Any) -> list[str] | str | None:
    if value is None:
        return None
    if isinstance(value, str):
        if value != "all-linear":
            _check_regex(name, value)
        return value
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"{name} must be a list of module names, a regex string or None, got {value!r}")


def _pattern_value(patterns: dict[str, Any], module_path: str, default: Any) -> Any:
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?(?:{pattern})$", module_path):
            return value
    return default
