"""One forward pass with each batch row on its own adapter (a tree node brings its whole path; "__base__": none)."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

# Every attention kernel but cuDNN's, which torch tries first on Hopper GPUs: it builds an execution plan for each
# new key length, and a decode step's keys grow by one every step, so each step of each layer built a plan (2 ms
# a layer on an H100: 60 of a 30-layer model's 90 ms step, benchmarks/serve_step_gpu.py). CPUs never use it.
SERVING_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def forward_rows(model: Any, adapter_names: list[str], every_position: bool = False, **inputs: Any) -> Tensor:
    """The last position's logits, [rows, vocab], of `model` (a LoraModel) with row i routed to adapter_names[i];
    every position's, [rows, length, vocab], when asked (a prompt's own logprobs)."""
    with sdpa_kernel(SERVING_ATTENTION):
        logits = model(**inputs, adapter_names=adapter_names, logits_to_keep=0 if every_position else 1).logits
    return logits if every_position else logits[:, -1]
