"""Routed inference in a model compiled with CUDA graphs (mode reduce-overhead): the routed layers' op runs outside
the recorded graphs, so every step computes the routing and factors of the moment, and new adapter_names lists
compile nothing. Compared with the same model run eagerly."""

from __future__ import annotations

import pytest
import torch

from lorakit import LoraConfig, get_lora_model
from tests.gpu.models import tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
NAMES = [f"a{i}" for i in range(4)]


def _model():
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = get_lora_model(tiny_llama(), lora, adapter_name=NAMES[0])
    for name in NAMES[1:]:
        model.add_adapter(name, lora)
    return model.eval()


def test_compiled_routed_steps_follow_each_routing_and_factor_change():
    model = _model()
    ids = torch.randint(0, 256, (8, 5), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    routings = [NAMES * 2, NAMES[::-1] * 2, ["a1"] * 8, ["a0", "__base__"] * 4]
    with torch.no_grad():
        eager = [model(input_ids=ids, adapter_names=names, use_cache=False).logits for names in routings]
        eager_forward = model.model.forward
        model.model.forward = torch.compile(eager_forward, mode="reduce-overhead")
        compiled = []
        for _ in range(3):  # the later rounds replay recorded graphs
            compiled = [model(input_ids=ids, adapter_names=names, use_cache=False).logits.clone() for names in routings]
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        for got, want in zip(compiled, eager, strict=True):
            torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
        assert not torch.allclose(compiled[0], compiled[1])  # the routings differ in what they compute

        for layer_adapter in (m for n, m in model.named_modules() if n.endswith("adapters.a1")):
            layer_adapter.lora_B.mul_(-2)  # in place: a replayed recording would not see it
        after = model(input_ids=ids, adapter_names=routings[2], use_cache=False).logits
        model.model.forward = eager_forward  # eager again, for the reference
        torch.testing.assert_close(after, model(input_ids=ids, adapter_names=routings[2], use_cache=False).logits,
                                   atol=2e-4, rtol=2e-4)  # fmt: skip
        assert not torch.allclose(after, compiled[2])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # nothing compiled after the first round
