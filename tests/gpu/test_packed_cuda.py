"""A compiled one-adapter inference step under CUDA graphs reads the live adapter as views of one buffer
(lorakit.packed): each replay computes the factors of the moment (changed in place, switched, rescaled), as the
eager model does."""

from __future__ import annotations

import pytest
import torch

from lorakit import LoraConfig, get_lora_model, packed
from lorakit.layer import LoraLayer
from tests.gpu.models import tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def _model(dtype):
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    model = get_lora_model(tiny_llama(dtype), lora, "a0", adapter_dtype=dtype)
    model.add_adapter("a1", lora, adapter_dtype=dtype)
    return model.eval()


@pytest.mark.parametrize("dtype,rows", [(torch.bfloat16, 4), (torch.bfloat16, 40), (torch.float32, 4)])
def test_compiled_steps_under_cuda_graphs_follow_every_change(dtype, rows):
    torch._dynamo.reset()  # each case compiles afresh (a change of adapter or scale compiles once more)
    model = _model(dtype)
    ids = torch.randint(0, 256, (rows, 1), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))

    def step():
        return model(input_ids=ids, use_cache=False).logits.float()

    changes = [
        lambda: None,
        lambda: layer.adapters["a0"].lora_B.mul_(-3.0),  # in place, as a hot swap's copy_
        lambda: model.set_adapter("a1"),
        lambda: setattr(model.model.model.layers[1].mlp.up_proj.adapters["a1"], "scale", 4.0),
    ]
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    with torch.no_grad():
        eager_forward = model.model.forward
        model.model.forward = torch.compile(eager_forward, mode="reduce-overhead")
        for change in changes:
            change()
            for _ in range(3):  # recorded, then replayed
                compiled = step().clone()
            with torch.compiler.set_stance("force_eager"):
                eager = step()
            assert (compiled - eager).abs().max().item() < tolerance * eager.abs().max().item()
    numbers = {m._fast[0] for m in model.modules() if isinstance(m, LoraLayer)}  # every layer reads a buffer
    buffer = packed.BUFFERS[numbers.pop()]
    assert not numbers
    assert layer.adapters["a1"].lora_A.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
