"""The kind table: each layer kind's flags decide how the rest of lorakit treats it, never its name."""

from __future__ import annotations

import pathlib
import re

import peft
import pytest
import torch
from torch import nn

from lorakit.kinds import kind_of, parameter_kind
from tests.cases import tiny_gpt2

LORAKIT = pathlib.Path(__file__).parents[1] / "lorakit"


def test_no_module_outside_the_table_asks_a_kind_for_its_name():
    # a new kind must be one table entry: code that branches on kind.name would need an edit elsewhere too
    pattern = re.compile(r"kind\.name\s*(==|!=|in|not in)\b|LINEAR_KINDS")
    offenders = [
        f"{path.relative_to(LORAKIT.parent)}:{number}"
        for path in LORAKIT.rglob("*.py")
        if path.name != "kinds.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


@pytest.mark.parametrize(
    ("module", "plain_matmul", "embedding", "weight_init", "mergeable"),
    [
        (nn.Linear(4, 3), True, False, True, True),
        (nn.Embedding(5, 3), False, True, False, True),
        (nn.Conv2d(4, 6, 3), False, False, False, True),
        (nn.Conv2d(4, 6, 3, groups=2), False, False, False, False),
    ],
    ids=["linear", "embedding", "conv", "grouped-conv"],
)
def test_each_kind_says_how_it_is_treated(module, plain_matmul, embedding, weight_init, mergeable):
    kind = kind_of(module)
    assert (kind.is_plain_matmul, kind.is_embedding, kind.supports_weight_init, kind.mergeable) == (
        plain_matmul,
        embedding,
        weight_init,
        mergeable,
    )
    assert kind.takes_dropout is not embedding and (kind.zero_factor == "lora_A") is embedding


def test_gpt2_conv1d_is_one_row_a_transposed_plain_matmul():
    conv1d = tiny_gpt2().transformer.h[0].attn.c_attn
    kind = kind_of(conv1d)
    assert kind.transposed and kind.is_plain_matmul and kind.fan_in_fan_out
    assert kind.in_out(conv1d.weight) == (32, 96)


def test_a_raw_weight_acts_on_the_weight_and_is_no_plain_matmul():
    kind = parameter_kind(nn.MultiheadAttention(8, 2), "in_proj_weight")
    assert kind.acts_on_weight and not kind.is_plain_matmul


@pytest.mark.parametrize("groups", [2, 6])
def test_grouped_conv_factor_shapes_are_peft_ones(groups):
    conv = nn.Conv2d(6, 12, 3, groups=groups)
    peft_model = peft.get_peft_model(nn.Sequential(conv), peft.LoraConfig(r=6, target_modules=["0"]))
    layer = peft_model.base_model.model[0]
    a_shape, b_shape = kind_of(conv).factor_shapes(conv.weight, 6)
    assert a_shape == tuple(layer.lora_A["default"].weight.shape)
    assert b_shape == tuple(layer.lora_B["default"].weight.shape)
    x = torch.randn(1, 6, 5, 5)
    assert kind_of(conv).contribution(conv, x, torch.randn(a_shape), torch.randn(b_shape), 1.0).shape == conv(x).shape


class _WeightNormed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(8, 8, 3, padding=1), dim=2)  # g, v: no original
        self.head = nn.Linear(40, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).flatten(1))


def _weight_normed_net() -> nn.Module:
    torch.manual_seed(0)
    return _WeightNormed().eval()


def test_a_weight_normed_conv_is_adapted_on_its_output_and_merges_through_g_and_v(tmp_path):
    """torch's weight_norm stores g and v: the LoRA acts on the output, the same as PEFT's, and merging stores
    W + dW back through the parametrization (PEFT's merge leaves the weight as it was), so merged == unmerged."""
    from lorakit import LoraConfig, LoraModel, TargetError

    x = torch.randn(2, 8, 5, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(1)
    theirs = peft.get_peft_model(
        _weight_normed_net(), peft.LoraConfig(target_modules=["conv"], init_lora_weights=False)
    )
    theirs.eval().save_pretrained(tmp_path)
    ours = LoraModel.from_pretrained(_weight_normed_net(), tmp_path).eval()
    with torch.no_grad():
        expected = theirs(x)
        assert not torch.allclose(expected, _weight_normed_net()(x), atol=1e-4)
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=0)
        merged = ours.merge_and_unload()
        assert nn.utils.parametrize.is_parametrized(merged.conv, "weight")
        torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=0)
    with pytest.raises(TargetError, match="target_parameters cannot adapt it.*target_modules instead"):
        LoraModel(_weight_normed_net()).add_adapter("p", LoraConfig(target_parameters=["conv.weight"]))
