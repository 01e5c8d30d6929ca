"""One forward pass with each batch row on its own adapter (a tree node brings its whole path; "__base__": none)."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def forward_rows(model: Any, adapter_names: list[str], **inputs: Any) -> Tensor:
    """The last position's logits, [rows, vocab], of `model` (a LoraModel) with row i routed to adapter_names[i]."""
    return model(**inputs, adapter_names=adapter_names, logits_to_keep=1).logits[:, -1]
