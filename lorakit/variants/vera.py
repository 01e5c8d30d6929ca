"""VeRA (Kopiczko et al. 2024), acting on the delta: one frozen random pair shared by every target.

    y = W x + b * B_shared[:out] (d * A_shared[:, :in] x)       only d (r) and b (out) train per layer

A_shared (r x max_in) and B_shared (max_out x r) come from a seeded generator (projection_prng_key), so a file
needs only d, b and the seed; PEFT's VeraConfig fields and peft_type "VERA" files, both ways.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lorakit import checks, ops
from lorakit.config import TASK_TYPES, read_json_object
from lorakit.errors import ConfigError, TargetError

if TYPE_CHECKING:
    from lorakit.adapter import Adapter

_BOOKKEEPING = {"auto_mapping", "peft_version", "revision", "peft_type", "inference_mode", "base_model_name_or_path"}


@dataclass
class VeraConfig:
    """PEFT's VeraConfig: the same fields, defaults and adapter_config.json."""

    r: int = 256
    target_modules: list[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    task_type: str | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    exclude_modules: list[str] | str | None = field(default=None, metadata={"lorakit_only": True})

    peft_type = "VERA"
    variant = "vera"
    use_dora = False
    lora_bias = False
    target_parameters = None
    init_lora_weights = True  # VeRA's own init_weights decides; the shared LoRA init path is not used

    def __post_init__(self) -> None:
        checks.check_fields(self, _VERA_CHECKS)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("layers_pattern needs layers_to_transform: say which layer indices to adapt")

    # the interface injection reads from any adapter config
    @property
    def lora_dropout(self) -> float:
        return self.vera_dropout

    def rank_and_alpha(self, module_path: str) -> tuple[int, float]:
        return self.r, 1.0

    def scale(self, r: int, alpha: float) -> float:
        return 1.0

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("lorakit_only")}
        if self.exclude_modules is not None:
            out["exclude_modules"] = self.exclude_modules
        if isinstance(out["target_modules"], list):
            out["target_modules"] = sorted(out["target_modules"])
        return out | {"peft_type": self.peft_type}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VeraConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unsupported = [
            f"{k}={v!r}" for k, v in data.items() if k not in known | _BOOKKEEPING and v not in (None, False, {}, [])
        ]
        if unsupported:
            raise ConfigError(
                f"VeRA adapter_config.json uses settings lorakit does not support: {', '.join(unsupported)}"
            )
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json_file(cls, path: str | Path) -> VeraConfig:
        return cls.from_dict(read_json_object(path))


_VERA_CHECKS: dict[str, checks.Check] = {
    "r": checks.rank,
    "target_modules": checks.names_or_regex,
    "projection_prng_key": lambda name, value: _seed(name, checks.integer(name, value)),
    "save_projection": checks.boolean,
    "vera_dropout": checks.probability,
    "d_initial": checks.finite_number,
    "fan_in_fan_out": checks.boolean,
    "bias": checks.one_of("none", "all"),  # lora_only has no meaning without lora_B's own bias
    "modules_to_save": checks.optional(checks.text_list),
    "init_weights": checks.boolean,
    "layers_to_transform": checks.layer_indices,
    "layers_pattern": checks.optional(checks.text_or_text_list),
    "task_type": checks.optional(checks.one_of(*TASK_TYPES)),
    "inference_mode": checks.boolean,
    "base_model_name_or_path": checks.optional(checks.text),
    "exclude_modules": checks.names_or_regex,
}
checks.strict_init(VeraConfig, {})


def _seed(name: str, value: int) -> int:
    """A seed torch.Generator takes: anything else fails only when the model is adapted."""
    if not -(2**63) <= value < 2**64:
        raise ConfigError(f"{name} seeds torch.Generator, which takes -2**63 <= seed < 2**64, got {value}")
    return value


class Vera:
    name = "vera"
    changes_base_weight = False
    needs_delta_weight = False
    factors: dict[str, bool] = {}  # no per-layer A, B: slices of the shared pair instead

    def __init__(self, shared_A: Tensor, shared_B: Tensor, d_initial: float, init_weights: bool) -> None:
        self.pair = SharedPair(shared_A, shared_B)
        self.d_initial, self.init_weights_ = d_initial, init_weights

    @classmethod
    def for_targets(cls, config: VeraConfig, targets) -> Vera:
        """The shared pair sized to the largest in/out over the targets, drawn as PEFT draws it."""
        shapes = []
        for path, kind, module in targets:
            if not kind.is_plain_matmul:
                raise TargetError(f"VeRA adapts linear layers only (as in PEFT); {path} is {kind.name}: exclude it")
            shapes.append(kind.in_out(kind.weight_of(module)))
        if not shapes:
            raise TargetError("VeRA found no linear layer among target_modules")
        max_in, max_out = max(s[0] for s in shapes), max(s[1] for s in shapes)
        generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
        shared_A = _kaiming_uniform((config.r, max_in), generator)
        shared_B = _kaiming_uniform((max_out, config.r), generator)
        return cls(shared_A, shared_B, config.d_initial, config.init_weights)

    def init_weights(self, adapter: Adapter, weight: Tensor, mode: bool | str, factory: dict) -> VeraState:
        """This layer's d (r) and b (out), and its corner of the shared pair."""
        in_f, out_f = adapter.kind.in_out(weight)
        state = VeraState(self.pair.to(factory["device"]), in_f, out_f, adapter.r, factory)
        if self.init_weights_:
            with torch.no_grad():
                state.vera_lambda_d.fill_(self.d_initial)
                state.vera_lambda_b.zero_()
        return state

    def dtype(self, adapter: Adapter) -> torch.dtype:
        return adapter.variant_state.vera_lambda_b.dtype

    def contribution(self, adapter: Adapter, module: nn.Module, x: Tensor, base_out: Tensor | None = None) -> Tensor:
        state = adapter.variant_state
        lora_A, lora_B = state.slices()
        x = adapter.dropout(x)
        lambda_d, lambda_b = state.vera_lambda_d, state.vera_lambda_b
        return ops.vera_contribution(x, lora_A.to(x.dtype), lora_B.to(x.dtype), lambda_d, lambda_b)

    def delta_weight(self, adapter: Adapter) -> Tensor:
        state = adapter.variant_state
        lora_A, lora_B = state.slices()
        delta = (state.vera_lambda_b[:, None] * lora_B) @ (state.vera_lambda_d[:, None] * lora_A)
        return delta.T if adapter.kind.transposed else delta

    def weight_scale(self, adapter: Adapter, weight: Tensor) -> float:
        return 1.0

    def shared_tensors(self) -> dict[str, Tensor]:
        return {"vera_A": self.pair.vera_A, "vera_B": self.pair.vera_B}


class SharedPair(nn.Module):
    """VeRA's frozen pair, one module held by every adapted layer (a shared tensor would be copied per layer by
    model.to(); a shared module is converted once). Non-persistent: files carry it only with save_projection."""

    def __init__(self, shared_A: Tensor, shared_B: Tensor) -> None:
        super().__init__()
        self.register_buffer("vera_A", shared_A, persistent=False)  # (r x max_in)
        self.register_buffer("vera_B", shared_B, persistent=False)  # (max_out x r)


class VeraState(nn.Module):
    """One layer's VeRA tensors: the trained vectors d (r) and b (out), and the shared pair it slices."""

    def __init__(self, pair: SharedPair, in_f: int, out_f: int, r: int, factory: dict) -> None:
        super().__init__()
        self.vera_shared = pair  # the same module in every layer, so .to() moves it once
        self.vera_in, self.vera_out = in_f, out_f
        self.vera_lambda_b = nn.Parameter(torch.ones(out_f, **factory))
        self.vera_lambda_d = nn.Parameter(torch.randn(r, **factory))

    def slices(self) -> tuple[Tensor, Tensor]:
        """This layer's corner of the shared pair: A[:, :in], B[:out]."""
        return self.vera_shared.vera_A[:, : self.vera_in], self.vera_shared.vera_B[: self.vera_out]


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    # He-uniform with gain sqrt(2) over fan_in = shape[1], drawn from `generator` so the seed fixes the pair
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)
