"""The op boundary: layers and variants call these names; faster kernels replace them here only."""

from lorakit.ops.reference import (
    conv_contribution,
    embedding_contribution,
    linear_contribution,
    low_rank_delta,
    merge_delta_,
)

__all__ = [
    "conv_contribution",
    "embedding_contribution",
    "linear_contribution",
    "low_rank_delta",
    "merge_delta_",
]
