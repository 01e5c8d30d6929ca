"""DoRA and rsLoRA against PEFT: same weights, same outputs (fp32, 1e-5), files both ways, exact merge."""

from __future__ import annotations

import peft
import pytest
import torch

from lorakit import LoraConfig, LoraModel, get_lora_model
from lorakit.io import adapter_tensors
from tests.cases import CASES, Case, output

ATOL = 1e-5
# compared with PEFT: cases PEFT computes as lorakit does, without raw weights or lora_bias (PEFT has no DoRA there),
# mergeable (DoRA's norm needs dW, which a grouped conv cannot form)
DORA_CASES = [
    c
    for c in CASES
    if c.peft_outputs and c.mergeable and not (c.config.get("target_parameters") or c.config.get("lora_bias"))
]
RSLORA_CASES = [c for c in CASES if c.name in ("convmlp", "gpt2", "llama-layer1")]


def _run(model, case: Case) -> torch.Tensor:
    with torch.no_grad():
        return output(model(**case.inputs()))


def _ours(case: Case, **extra) -> LoraModel:
    torch.manual_seed(2)
    model = get_lora_model(case.build(), LoraConfig(init_lora_weights=False, **case.config, **extra))
    with torch.no_grad():  # magnitudes away from their init value, so the test sees m/||W + dW|| used
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(torch.rand_like(param) + 0.5)
    return model.eval()


@pytest.mark.parametrize("case", DORA_CASES, ids=str)
def test_dora_same_weights_same_outputs_as_peft(case: Case):
    ours = _ours(case, use_dora=True)
    theirs = peft.get_peft_model(case.build(), peft.LoraConfig(use_dora=True, **case.config)).eval()
    state = {k: v.detach() for k, v in adapter_tensors(ours.model, "default", ours.peft_config["default"]).items()}
    assert any("lora_magnitude_vector" in k for k in state)
    result = peft.set_peft_model_state_dict(theirs, state)
    assert not [k for k in result.unexpected_keys if "lora" in k]
    expected = _run(theirs, case)
    assert not torch.equal(expected, _run(case.build().eval(), case))
    torch.testing.assert_close(_run(ours, case), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", DORA_CASES[:3], ids=str)
def test_dora_files_both_ways(case: Case, tmp_path):
    ours = _ours(case, use_dora=True)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(case.build(), tmp_path / "ours").eval()
    torch.testing.assert_close(_run(theirs, case), _run(ours, case), atol=ATOL, rtol=0)

    torch.manual_seed(3)
    peft_model = peft.get_peft_model(
        case.build(), peft.LoraConfig(use_dora=True, init_lora_weights=False, **case.config)
    )
    peft_model.eval().save_pretrained(tmp_path / "theirs")
    loaded = LoraModel.from_pretrained(case.build(), tmp_path / "theirs").eval()
    assert loaded.peft_config["default"].use_dora
    torch.testing.assert_close(_run(loaded, case), _run(peft_model, case), atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", DORA_CASES[:2], ids=str)
def test_dora_merge_is_exact_and_unmerge_restores(case: Case):
    model = _ours(case, use_dora=True)
    for _, p in model.named_parameters():
        p.data = p.data.double()
    model.model.double()
    base = {k: v.clone() for k, v in case.build().double().state_dict().items()}
    inputs = {k: v for k, v in case.inputs().items()}
    with torch.no_grad():
        unmerged = output(model(**inputs))
        model.merge_adapter()
        torch.testing.assert_close(output(model(**inputs)), unmerged, atol=1e-10, rtol=0)
        model.unmerge_adapter()
        torch.testing.assert_close(output(model(**inputs)), unmerged, atol=1e-10, rtol=0)
    restored = model.unload().state_dict()
    for key, want in base.items():
        torch.testing.assert_close(restored[key], want, atol=1e-12, rtol=0, msg=key)


def test_dora_merged_weight_is_magnitude_times_direction():
    """W' = m * (W + s B A) / ||W + s B A||, row by row, in float64."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(7, 5).double()
    w0 = lin.weight.detach().clone()
    model = get_lora_model(
        torch.nn.Sequential(lin),
        LoraConfig(r=2, lora_alpha=3, target_modules=["0"], use_dora=True, init_lora_weights=False),
    )
    adapter = model.model[0].adapters["default"]
    with torch.no_grad():
        adapter.variant_state.lora_magnitude_vector.mul_(1.7)
    combined = w0 + 1.5 * adapter.lora_B.detach() @ adapter.lora_A.detach()
    magnitude = adapter.variant_state.lora_magnitude_vector.detach()
    expected = magnitude[:, None] * combined / combined.norm(dim=1, keepdim=True)
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged[0].weight.detach(), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("case", [c for c in DORA_CASES if c.name in ("convmlp", "gpt2")], ids=str)
def test_dora_gradients_equal_peft_which_detaches_the_norm(case: Case):
    # the norm ||W + dW|| takes no gradient (DoRA paper, 4.3; PEFT detaches it): with it, the gradients of A, B
    # and the magnitude would differ from PEFT's
    ours = _ours(case, use_dora=True)  # eval: the base models' own dropout off; gradients flow all the same
    theirs = peft.get_peft_model(case.build(), peft.LoraConfig(use_dora=True, **case.config)).eval()
    state = {k: v.detach() for k, v in adapter_tensors(ours.model, "default", ours.peft_config["default"]).items()}
    peft.set_peft_model_state_dict(theirs, state)
    for model in (ours, theirs):
        output(model(**case.inputs())).square().sum().backward()
    ours_grads = {k: v.grad for k, v in adapter_tensors(ours.model, "default", ours.peft_config["default"]).items()}
    theirs_grads = {_peft_key(k): p.grad for k, p in theirs.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in k for k in ours_grads)
    for key, grad in ours_grads.items():
        torch.testing.assert_close(grad, theirs_grads[key], atol=1e-5, rtol=1e-4, msg=key)


def _peft_key(name: str) -> str:
    """PEFT's parameter name as its file names it: no adapter name or modules_to_save wrapper; the magnitude's
    module is saved bare."""
    name = name.replace(".default", "").replace(".modules_to_save.", ".")
    return name.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


@pytest.mark.parametrize("case", RSLORA_CASES, ids=str)
def test_rslora_same_weights_same_outputs_as_peft(case: Case, tmp_path):
    config = {**case.config, "use_rslora": True, "r": 4, "lora_alpha": 6}
    torch.manual_seed(2)
    ours = get_lora_model(case.build(), LoraConfig(init_lora_weights=False, **config)).eval()
    adapter = next(m for m in ours.modules() if hasattr(m, "lora_A") and hasattr(m, "scale"))
    assert adapter.scale == pytest.approx(6 / 2)  # alpha / sqrt(r), not alpha / r
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(case.build(), tmp_path).eval()
    torch.testing.assert_close(_run(theirs, case), _run(ours, case), atol=ATOL, rtol=0)
    back = LoraModel.from_pretrained(case.build(), tmp_path).eval()
    torch.testing.assert_close(_run(back, case), _run(theirs, case), atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", DORA_CASES, ids=str)
def test_dora_reusing_the_layers_output_equals_recomputing_w_x(case: Case, monkeypatch):
    # without dropout, W x is the base layer's output less its bias (each kind knows its bias layout): the layer
    # hands it over instead of DoRA multiplying by W a second time; outputs and gradients must not change
    from lorakit.adapter import Adapter

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = _ours(case, use_dora=True).train()  # train mode: dropout is 0, so the reuse path is taken
        out = output(model(**case.inputs()))
        out.float().square().sum().backward()
        return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    reused, reused_grads = run()
    full = Adapter.contribution
    monkeypatch.setattr(Adapter, "contribution", lambda self, module, x, base_out=None: full(self, module, x))
    recomputed, recomputed_grads = run()
    torch.testing.assert_close(reused, recomputed, atol=ATOL, rtol=1e-5)
    for name, grad in recomputed_grads.items():
        torch.testing.assert_close(reused_grads[name], grad, atol=1e-4, rtol=1e-4)
