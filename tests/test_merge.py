"""Merging: merged == unmerged outputs, no LoRA module left after merge_and_unload, bf16 rounds once."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, LorakitError, LoraLayer, get_lora_model
from lorakit.saved import SavedModule
from tests.cases import CASES, Case, output

MERGEABLE = [case for case in CASES if case.mergeable]


def _run(model, case: Case) -> torch.Tensor:
    with torch.no_grad():
        return output(model(**case.inputs()))


def _random_model(case: Case):
    torch.manual_seed(5)
    return get_lora_model(case.build(), LoraConfig(init_lora_weights=False, **case.config)).eval()


@pytest.mark.parametrize("case", MERGEABLE, ids=str)
def test_merged_equals_unmerged_and_unmerge_restores(case: Case):
    model = _random_model(case)
    unmerged = _run(model, case)
    model.merge_adapter()
    torch.testing.assert_close(_run(model, case), unmerged, atol=1e-5, rtol=0)
    model.merge_adapter()  # idempotent: merging twice adds the delta once
    torch.testing.assert_close(_run(model, case), unmerged, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(_run(model, case), unmerged, atol=1e-5, rtol=0)
    with model.disable_adapter():
        torch.testing.assert_close(_run(model, case), _run(case.build().eval(), case), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", MERGEABLE, ids=str)
def test_merge_and_unload_returns_the_base_class(case: Case):
    model = _random_model(case)
    expected = _run(model, case)
    merged = model.merge_and_unload()
    assert type(merged) is type(case.build())
    assert not any(isinstance(m, (LoraLayer, SavedModule)) for m in merged.modules())
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in merged.modules())
    torch.testing.assert_close(_run(merged, case), expected, atol=1e-5, rtol=0)
    assert set(merged.state_dict()) == set(case.build().state_dict())


@pytest.mark.parametrize("case", MERGEABLE, ids=str)
def test_unload_returns_the_untouched_base(case: Case):
    model = _random_model(case)
    model.merge_adapter()
    base = model.unload()
    reference = case.build().state_dict()
    got = base.state_dict()
    assert set(got) == set(reference)
    for name, want in reference.items():
        torch.testing.assert_close(got[name], want, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_merge_rounds_once_and_unmerge_is_within_one_step(dtype):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(256, 256)).to(dtype)
    original = base[0].weight.detach().clone()
    model = get_lora_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["0"], init_lora_weights=False))
    layer = model.model[0]
    with torch.no_grad():
        layer.adapters["default"].lora_B.mul_(0.01)
    delta = layer.adapters["default"].delta_weight().detach()  # fp32 factors -> fp32 delta
    model.merge_adapter()
    assert torch.equal(layer.weight, (original.float() + delta).to(dtype))  # one rounding, from fp32
    model.unmerge_adapter()
    # one rounding step of the larger of W and W + dW (each of merge and unmerge rounds by half of it)
    magnitude = torch.maximum(original.float().abs(), (original.float() + delta).abs())
    step = torch.finfo(dtype).eps * magnitude + torch.finfo(dtype).tiny
    assert ((layer.weight.float() - original.float()).abs() <= step).all()
    for _ in range(20):  # repeated cycles stay within a couple of steps, they do not random-walk away
        model.merge_adapter()
        model.unmerge_adapter()
    assert ((layer.weight.float() - original.float()).abs() <= 2 * step).all()


def test_safe_merge_refuses_broken_weights_and_changes_nothing():
    case = CASES[0]
    model = _random_model(case)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.model.lin2.adapters["default"].lora_A[0, 0] = float("nan")
    with pytest.raises(LorakitError, match="NaN"):
        model.merge_and_unload(safe_merge=True)
    for name, param in model.named_parameters():
        if "lin2.adapters" not in name:
            assert torch.equal(param, before[name]), name
    assert all(not m.merged_adapters for m in model.modules() if isinstance(m, LoraLayer))


@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv1d(2, 3, 3, padding=1, padding_mode="reflect"),
        lambda: nn.Conv1d(2, 3, 3, padding=2, dilation=2),
        lambda: nn.Conv2d(2, 3, (2, 3), stride=(2, 1), padding=1, padding_mode="circular"),
    ],
    ids=["reflect", "dilated", "circular-strided"],
)
def test_a_conv_adapter_follows_the_base_conv_s_geometry(conv):
    """A(x) is the base conv's own geometry (padding mode, dilation, stride), so the unmerged output is the conv
    with W + dW, as merged (PEFT 0.21 builds A without padding_mode and dilation, and there differs from its merge)."""
    torch.manual_seed(0)
    model = nn.Sequential(conv())
    x = torch.randn(2, 2, 7) if isinstance(model[0], nn.Conv1d) else torch.randn(2, 2, 6, 5)
    lora = get_lora_model(model, LoraConfig(r=2, target_modules=["0"], init_lora_weights=False)).eval()
    with torch.no_grad():
        unmerged = lora(x)
        layer = lora.model[0]
        delta = layer.adapters["default"].delta_weight()
        direct = layer.base_layer._conv_forward(x, layer.base_layer.weight + delta, layer.base_layer.bias)
        lora.merge_adapter()
        merged = lora(x)
    torch.testing.assert_close(unmerged, direct, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)


def test_two_adapted_layers_on_one_tied_table_each_merge_their_own_delta(tmp_path):
    """BART's encoder and decoder embed_tokens share one table: adapting both and merging put both deltas into it,
    so each side read the other's (merged outputs off by 0.47). Each now merges into a copy of its own; the
    outputs are PEFT's, unmerged, merged and after unmerging."""
    import peft
    import transformers

    from lorakit import LoraModel

    config = transformers.BartConfig(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=32,
        decoder_start_token_id=2,
    )  # fmt: skip

    def build():
        torch.manual_seed(0)
        return transformers.BartForConditionalGeneration(config).eval()

    targets = ["encoder.embed_tokens", "decoder.embed_tokens"]
    theirs = peft.get_peft_model(build(), peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    theirs.save_pretrained(tmp_path)
    ours = LoraModel.from_pretrained(build(), tmp_path).eval()
    encoder, decoder = (ours.model.get_submodule(f"model.{t}") for t in targets)
    assert encoder.stored_weight is decoder.stored_weight
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        with pytest.warns(UserWarning, match="its own copy"):
            ours.merge_adapter()
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        ours.unmerge_adapter()
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.merge_and_unload()(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
