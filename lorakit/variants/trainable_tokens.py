"""Trainable tokens (PEFT's TrainableTokens): chosen rows of an embedding table train in full, the rest stays frozen.

    W' = W with rows[idx] replaced by delta        delta (n_tokens x dim) starts as W[idx]

It acts on the weight, like target_parameters: as dW = scatter(idx, delta - W[idx]) through the same
parametrization, so merging writes the rows and unmerging restores them. Used alone (TrainableTokensConfig,
PEFT's peft_type "TRAINABLE_TOKENS") or next to LoRA (LoraConfig.trainable_token_indices).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lorakit.config import TASK_TYPES, read_json_object, token_ids
from lorakit.errors import ConfigError

if TYPE_CHECKING:
    from lorakit.adapter import Adapter

_BOOKKEEPING = {"auto_mapping", "peft_version", "revision", "peft_type", "inference_mode", "base_model_name_or_path"}


@dataclass
class TrainableTokensConfig:
    """PEFT's TrainableTokensConfig: the same fields, defaults and adapter_config.json."""

    target_modules: list[str] | str | None = None
    token_indices: list[int] = dataclasses.field(default_factory=list)
    init_weights: bool = True
    task_type: str | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None

    peft_type = "TRAINABLE_TOKENS"
    adapts_layers = False  # no LoRA factors anywhere: only token rows
    bias = "none"
    modules_to_save = None
    target_parameters = None
    use_dora = False

    def __post_init__(self) -> None:
        self.token_indices = token_ids("token_indices", self.token_indices)
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if not self.target_modules or not all(isinstance(t, str) for t in self.target_modules):
            raise ConfigError(
                f"target_modules must name the embedding(s) to train rows of, got {self.target_modules!r}"
            )
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ConfigError(f"task_type must be one of {TASK_TYPES} or None, got {self.task_type!r}")

    @property
    def trainable_token_indices(self) -> dict[str, list[int]]:
        """The rows to train per embedding, as LoraConfig.trainable_token_indices spells it."""
        return {name: self.token_indices for name in self.target_modules}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"peft_type": self.peft_type}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainableTokensConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [f"{k}={v!r}" for k, v in data.items() if k not in known | _BOOKKEEPING and v is not None]
        if unknown:
            raise ConfigError(f"trainable-tokens adapter_config.json has settings lorakit does not know: {unknown}")
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json_file(cls, path: str | Path) -> TrainableTokensConfig:
        return cls.from_dict(read_json_object(path))


class TrainableTokens:
    name = "trainable_tokens"
    changes_base_weight = False
    needs_delta_weight = True  # the rows reach the model as dW
    factors: dict[str, bool] = {}

    def __init__(self, indices: list[int], init_weights: bool = True) -> None:
        self.indices, self.init_weights_ = indices, init_weights

    def init_weights(self, adapter: Adapter, weight: Tensor, mode: bool | str, factory: dict) -> TokenState:
        """delta starts as the rows it replaces (the identity); init_weights=False draws it at random, as PEFT."""
        index = torch.tensor(self.indices, device=weight.device)
        original = weight.detach()[index].clone()
        delta = original.clone() if self.init_weights_ else torch.randn_like(original)
        return TokenState(index, original, delta, weight.shape[0])

    def dtype(self, adapter: Adapter) -> torch.dtype:
        return adapter.variant_state.trainable_tokens_delta.dtype

    def contribution(self, adapter: Adapter, module: nn.Module, x: Tensor, base_out: Tensor | None = None) -> Tensor:
        raise NotImplementedError("trainable tokens act on the weight (parametrization), never on the output")

    def delta_weight(self, adapter: Adapter) -> Tensor:
        """dW: zero but for the trained rows, where it is delta - W[idx]."""
        state = adapter.variant_state
        rows = state.trainable_tokens_delta - state.original
        shape = (state.table_rows, rows.shape[1])
        return torch.zeros(shape, dtype=rows.dtype, device=rows.device).index_copy(0, state.index, rows)

    def weight_scale(self, adapter: Adapter, weight: Tensor) -> float:
        return 1.0

    def shared_tensors(self) -> dict[str, Tensor]:
        return {}


class TokenState(nn.Module):
    """The trained rows (PEFT's trainable_tokens_delta), their ids and the rows they replace (not saved)."""

    def __init__(self, index: Tensor, original: Tensor, delta: Tensor, table_rows: int) -> None:
        super().__init__()
        self.table_rows = table_rows
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("original", original, persistent=False)
        self.trainable_tokens_delta = nn.Parameter(delta)
