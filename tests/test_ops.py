"""The reference ops against float64 math written out by hand, and against merged weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit import LoraConfig, get_lora_model, ops


def _factors(r: int, n_in: int, n_out: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(r, n_in, generator=gen, dtype=dtype), torch.randn(n_out, r, generator=gen, dtype=dtype)


def test_linear_contribution_matches_float64_math():
    A, B = _factors(4, 16, 8)
    x = torch.randn(3, 5, 16)
    expected = 0.5 * torch.einsum("or,ri,bti->bto", B.double(), A.double(), x.double())
    torch.testing.assert_close(ops.linear_contribution(x, A, B, 0.5).double(), expected, atol=1e-5, rtol=1e-5)


def test_embedding_contribution_is_a_lookup_of_the_delta():
    A, B = _factors(4, 10, 6)  # A (r x num_embeddings), B (dim x r)
    ids = torch.tensor([[0, 3, 9], [2, 2, 1]])
    delta_table = (B.double() @ A.double()).T * 2.0  # (num x dim)
    torch.testing.assert_close(
        ops.embedding_contribution(ids, A, B, 2.0).double(), delta_table[ids], atol=1e-5, rtol=1e-5
    )


def test_low_rank_delta_keeps_kernel_dims():
    A = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    B = torch.randn(5, 3, 1, 1, dtype=torch.float64)
    expected = torch.einsum("or,rikl->oikl", B[:, :, 0, 0], A) * 0.25
    torch.testing.assert_close(ops.low_rank_delta(A, B, 0.25), expected)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(3, 5, 3, stride=2, padding=2, dilation=2),
        nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=1, padding_mode="circular"),
        nn.Conv3d(2, 4, 3, padding="same"),
        nn.Conv2d(3, 5, 1),
    ],
    ids=["1d-dilated", "2d-circular", "3d-same", "2d-1x1"],
)
def test_conv_contribution_equals_the_merged_conv(conv):
    torch.manual_seed(0)
    model = get_lora_model(nn.Sequential(conv), LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    x = torch.randn(2, conv.in_channels, *([7] * (conv.weight.dim() - 2)), dtype=torch.float64)
    model.double()
    unmerged = model(x)
    model.merge_adapter()
    torch.testing.assert_close(model(x), unmerged, atol=1e-10, rtol=0)


def test_transposed_conv1d_delta_layout_matches_linear_math():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(6, 4)  # weight (in=4, out=6)
    model = get_lora_model(nn.Sequential(layer), LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    adapter = model.model[0].adapters["default"]
    x = torch.randn(3, 4)
    expected = x @ layer.weight + layer.bias + adapter.scale * x @ adapter.lora_A.T @ adapter.lora_B.T
    torch.testing.assert_close(model(x), expected)
    assert F.linear(x, model.model[0].adapters["default"].delta_weight().T).shape == (3, 6)
