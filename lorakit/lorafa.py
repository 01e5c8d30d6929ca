"""LoRA-FA's optimizer (Zhang et al. 2023, PEFT's create_lorafa_optimizer): A frozen, B stepped by AdamW on a
projected gradient, so that the low-rank step follows the full fine-tuning step as closely as a fixed A allows.

    dW = s B A,   g_B <- (1 / s^2) g_B (A A^T + 1e-8 I)^+    (A: r x in, B: out x r, s the layer's scale)

then transformers' adamw-hf on every trained tensor (weight decay applied after the step, as PEFT's does). Pairs
come from the adapters themselves, not from parameter names, so convolutions (A flattened to r x in*k*k), second
adapters and frozen adapters beside them work; A A^T is inverted once per A, not at every step, since A does not
change. The projection is computed in float32 at least (PEFT's runs under bf16 autocast where bf16 exists, which
rounds it, and refuses bf16 factors).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.errors import ConfigError
from lorakit.inject import lora_layers
from lorakit.variants.delta_lora import register_delta_lora

_RIDGE = 1e-8  # PEFT's: keeps A A^T invertible where A has dependent rows
_PROJECTED = ("lora", "lora_fa", "delta_lora")  # variants whose dW is s B A with A fixed once frozen
_AS_THEY_ARE = ("trainable_tokens",)  # trained rows, no factors: adamw-hf on them, as PEFT's optimizer does


class LoraFAOptimizer(torch.optim.Optimizer):
    """AdamW (adamw-hf: decay after the step) whose B factors step on LoRA-FA's projected gradient. `frozen_a` maps
    each B to the adapter that owns it; the adapter's A and scale are read at every step, so a rescale is seen."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        frozen_a: dict[Tensor, nn.Module],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
    ) -> None:
        _check_hyper(lr, betas, eps, weight_decay)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "correct_bias": correct_bias}
        super().__init__(params, defaults)
        self._frozen_a = frozen_a
        self._inverses: dict[int, tuple[tuple, Tensor]] = {}  # id(B) -> (A's identity and version, (A A^T + dI)^+)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                adapter = self._frozen_a.get(p)
                grad = p.grad if adapter is None else self._projected(p, adapter)
                self._adamw_hf(p, grad, group)
        return loss

    def _projected(self, b: Tensor, adapter: nn.Module) -> Tensor:
        """(1 / s^2) g_B (A A^T + 1e-8 I)^+, in B's gradient's shape and dtype."""
        grad = b.grad.reshape(b.shape[0], -1)  # out x r (a convolution's B is out x r x 1 x 1)
        inverse = self._inverse(b, adapter.lora_A)
        projected = (1 / adapter.scale**2) * (grad.to(inverse.dtype) @ inverse)
        return projected.to(b.grad.dtype).reshape(b.grad.shape)

    def _inverse(self, b: Tensor, a: Tensor) -> Tensor:
        key = (a.data_ptr(), a._version, a.dtype, a.device, tuple(a.shape))
        kept = self._inverses.get(id(b))
        if kept is None or kept[0] != key:
            flat = a.reshape(a.shape[0], -1).to(torch.promote_types(a.dtype, torch.float32))  # r x in
            eye = torch.eye(flat.shape[0], dtype=flat.dtype, device=flat.device)
            kept = self._inverses[id(b)] = (key, torch.linalg.pinv(flat @ flat.T + _RIDGE * eye))
        return kept[1]

    def _adamw_hf(self, p: Tensor, grad: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        state["exp_avg"].mul_(beta1).add_(grad, alpha=1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = state["exp_avg_sq"].sqrt().add_(group["eps"])
        step_size = group["lr"]
        if group["correct_bias"]:
            step_size *= math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
        p.addcdiv_(state["exp_avg"], denom, value=-step_size)
        if group["weight_decay"] > 0.0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])


def create_lorafa_optimizer(
    model: nn.Module,
    r: int,
    lora_alpha: float,
    lr: float,
    weight_decay: float = 0.0,
    use_rslora: bool | None = None,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    correct_bias: bool = True,
) -> LoraFAOptimizer:
    """PEFT's create_lorafa_optimizer: the trained adapters' A frozen, their B on the projected gradient,
    every other trained tensor by adamw-hf. As in PEFT, each layer's own scale is used (rank and alpha patterns,
    rsLoRA); `r` and `lora_alpha` are taken for PEFT's signature, and `use_rslora`, when given, must match the
    trained adapters' configs."""
    _check_positive("r", r, integer=True)
    _check_positive("lora_alpha", lora_alpha)
    frozen_a = _pairs(model, use_rslora)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(
            "create_lorafa_optimizer found nothing to train: every adapter is frozen (loaded with "
            "is_trainable=False?); make one trainable (set_adapter(name), or load it with is_trainable=True)"
        )
    optimizer = LoraFAOptimizer(
        params, frozen_a, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias
    )
    register_delta_lora(optimizer, model)
    return optimizer


def _pairs(model: nn.Module, use_rslora: bool | None) -> dict[Tensor, nn.Module]:
    """B -> its adapter, for every adapter that trains now, whose A is frozen here; adapters whose dW is not s B A
    are refused."""
    configs = getattr(model, "peft_config", {})
    pairs: dict[Tensor, nn.Module] = {}
    for path, layer in lora_layers(model):
        for name, adapter in layer.adapters.items():
            a, b = getattr(adapter, "lora_A", None), getattr(adapter, "lora_B", None)
            trained = any(p.requires_grad for p in adapter.parameters())
            if not trained or adapter.variant.name in _AS_THEY_ARE:
                continue  # adapters trained later (another job's) keep their A as it is
            if any(type(t).__name__ == "DTensor" for t in (a, b)):  # FSDP2 shards A, whose A A^T needs it whole
                raise ConfigError(
                    f"adapter {name!r} on {path} is sharded (FSDP): LoRA-FA's projection needs each A whole; train "
                    "it with DDP (run.distributed = 'ddp') or one process"
                )
            if isinstance(a, nn.Parameter):
                a.requires_grad_(False)
            _check_projectable(path, name, layer, adapter)
            rslora = getattr(configs.get(name), "use_rslora", None)
            if use_rslora is not None and rslora is not None and bool(rslora) != use_rslora:
                raise ConfigError(
                    f"create_lorafa_optimizer got use_rslora={use_rslora}, but adapter {name!r} is configured with "
                    f"use_rslora={rslora}; drop the argument (each layer's own scale is used) or fix the config"
                )
            pairs[b] = adapter
    return pairs


def _check_projectable(path: str, name: str, layer: nn.Module, adapter: nn.Module) -> None:
    where = f"adapter {name!r} on {path}"
    if adapter.variant.name not in _PROJECTED:
        raise ConfigError(
            f"{where} is {adapter.variant.name}: LoRA-FA's projected gradient is for dW = s B A with A frozen; train "
            "it with create_optimizer / create_loraplus_optimizer, or freeze it first"
        )
    if layer.kind.zero_factor == "lora_A":
        raise ConfigError(
            f"{where}: on a {layer.kind.name} A is the factor that starts at zero, so with A frozen nothing would "
            "train; exclude it from target_modules or freeze the adapter first"
        )
    r = adapter.lora_A.shape[0]
    if not (isinstance(adapter.lora_B, nn.Parameter) and adapter.lora_B.requires_grad):
        raise ConfigError(f"{where}: trains tensors other than B, which LoRA-FA does not step; freeze them first")
    if adapter.lora_B.reshape(adapter.lora_B.shape[0], -1).shape[1] != r:
        raise ConfigError(f"{where}: its B is not out x r (shape {tuple(adapter.lora_B.shape)}), which LoRA-FA needs")


def _check_hyper(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    _check_positive("lr", lr, allow_zero=True)
    _check_positive("eps", eps, allow_zero=True)
    _check_positive("weight_decay", weight_decay, allow_zero=True)
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
        raise ConfigError(f"betas must be two numbers in [0, 1), got {betas!r}")


def _check_positive(name: str, value: Any, integer: bool = False, allow_zero: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be a finite {'integer' if integer else 'number'} {bound}, got {value!r}")
