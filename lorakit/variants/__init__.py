"""Variant strategies: how an adapter initialises, contributes to the forward pass and to the delta.

Plain LoRA is the default strategy, so no call site branches on whether a variant is present.
"""

from lorakit.variants.lora import Lora, Variant

_REGISTRY: dict[str, Variant] = {"lora": Lora()}


def get_variant(name: str) -> Variant:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown LoRA variant {name!r}; known: {sorted(_REGISTRY)}") from None


__all__ = ["Lora", "Variant", "get_variant"]
