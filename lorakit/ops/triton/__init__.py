"""CUDA kernels behind the op boundary (lorakit.ops picks them for CUDA tensors, the reference elsewhere).

KERNELS is empty where triton does not import (CPU-only installs), so the dispatcher keeps the reference.
"""

from __future__ import annotations

from collections.abc import Callable

try:
    import triton  # noqa: F401
except ImportError:
    KERNELS: dict[str, Callable] = {}
else:
    from lorakit.ops.triton.fused_linear import add_lora, lora_linear, lora_linear_group
    from lorakit.ops.triton.gathered import add_gathered_lora, add_gathered_lora_group, gathered_linear_group
    from lorakit.ops.triton.routed import add_routed_lora, prepare_routed_lora

    KERNELS = {
        "lora_linear": lora_linear,
        "lora_linear_group": lora_linear_group,
        "add_lora": add_lora,
        "add_routed_lora": add_routed_lora,
        "add_gathered_lora": add_gathered_lora,
        "add_gathered_lora_group": add_gathered_lora_group,
        "gathered_linear_group": gathered_linear_group,
        "prepare_routed_lora": prepare_routed_lora,
    }
