"""Variant strategies: how an adapter initialises, contributes to the forward pass and to the delta.

Plain LoRA is the default strategy, so no call site branches on whether a variant is present.
Grouped by where they act: the delta (DoRA, VeRA; rsLoRA is the config's scale), the init (PiSSA,
OLoRA: variants/init.py), the optimizer (LoRA-FA; LoRA+ in lorakit/optim.py), after the step
(Delta-LoRA), the base storage (QLoRA: lorakit/quant.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lorakit.errors import TargetError
from lorakit.kinds import Kind
from lorakit.variants import delta_lora, dora, lora_fa
from lorakit.variants.delta_lora import DeltaLora
from lorakit.variants.dora import Dora
from lorakit.variants.lora import Lora, Variant
from lorakit.variants.lora_fa import LoraFA
from lorakit.variants.trainable_tokens import TrainableTokens, TrainableTokensConfig
from lorakit.variants.vera import Vera, VeraConfig

Targets = list[tuple[str, Kind, nn.Module]]
Builder = Callable[[Any, Targets], Variant]


def _shared(variant: Variant, check: Callable[[Targets], None] = lambda _: None) -> Builder:
    """A stateless strategy: one instance serves every adapter, after checking the targets."""

    def build(config: Any, targets: Targets) -> Variant:
        check(targets)
        return variant

    return build


# The one registry: a config's variant name -> how to build its strategy for a set of targets.
_REGISTRY: dict[str, Builder] = {
    "lora": _shared(Lora()),
    "dora": _shared(Dora(), dora.check_targets),
    "lora_fa": _shared(LoraFA(), lora_fa.check_targets),
    "delta_lora": _shared(DeltaLora(), delta_lora.check_targets),
    "vera": Vera.for_targets,  # holds the pair shared by its targets, so one instance per adapter
}


def get_variant(name: str) -> Variant:
    """The strategy of a variant that needs no config (all but VeRA), for building adapters by hand."""
    try:
        return _REGISTRY[name](None, [])
    except KeyError:
        raise ValueError(f"unknown LoRA variant {name!r}; known: {sorted(_REGISTRY)}") from None


def variant_for(config: Any, targets: Targets) -> Variant:
    """The strategy `config` asks for, checked against the targets before anything is changed."""
    _check_weight_init(config, targets)
    variant = _REGISTRY["dora" if config.use_dora else config.variant](config, targets)
    if variant.needs_delta_weight:
        _check_mergeable(variant.name, targets)
    return variant


def _check_mergeable(name: str, targets: Targets) -> None:
    bad = [path for path, kind, _ in targets if not kind.mergeable]
    if bad:
        raise TargetError(
            f"{name} needs each layer's dW, which {bad} cannot form (convolutions with groups > 1): "
            "exclude them with exclude_modules, or use plain LoRA"
        )


def _check_weight_init(config: Any, targets: Targets) -> None:
    mode = config.init_lora_weights
    if isinstance(mode, str) and mode != "gaussian":
        bad = [path for path, kind, _ in targets if not kind.supports_weight_init]
        if bad:
            what = "draws 2-D factors (PEFT: linear layers only)" if mode == "orthogonal" else "factorises a 2-D weight"
            raise TargetError(
                f"init_lora_weights={mode!r} {what}; {bad} are embeddings or convolutions: "
                "exclude them, or use the default init"
            )


__all__ = [
    "DeltaLora",
    "Dora",
    "Lora",
    "LoraFA",
    "TrainableTokens",
    "TrainableTokensConfig",
    "Variant",
    "Vera",
    "VeraConfig",
    "get_variant",
    "variant_for",
]
