"""The op boundary: layers and variants call these names; faster kernels replace them here only."""

from lorakit.ops.lora_fa import frozen_a_linear_contribution
from lorakit.ops.reference import (
    conv_contribution,
    embedding_contribution,
    linear_contribution,
    low_rank_delta,
    merge_delta_,
    rescaled_merge,
    rescaled_unmerge,
)

__all__ = [
    "conv_contribution",
    "embedding_contribution",
    "frozen_a_linear_contribution",
    "linear_contribution",
    "low_rank_delta",
    "merge_delta_",
    "rescaled_merge",
    "rescaled_unmerge",
]
