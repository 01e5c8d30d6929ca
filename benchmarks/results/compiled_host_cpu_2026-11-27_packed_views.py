"""The host's share of a compiled one-adapter step on the CPU, with lorakit.packed's views (the patch
decode_step_gpu_h100_2026-11-27_packed_views.patch applied) against the factors themselves: a 16-layer tiny Llama,
r4 all-linear, 4 rows, the graph stubbed (its first outputs returned again), called through the LoraModel.
Best of 15 rounds of 100 calls.

Run, on a tree with the patch applied: PYTHONPATH=.:benchmarks python <this file> base|ours|views
"""

import sys
import time

import torch
from compiled_host_cpu import stubbed
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit import LoraConfig, get_lora_model, packed

mode = sys.argv[1]


torch.manual_seed(0)
cfg = LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=16,
    num_attention_heads=4,
    num_key_value_heads=2,
)
model = LlamaForCausalLM(cfg).eval()
call = model
if mode != "base":
    packed.PACK_DEVICES = ("cpu",) if mode == "views" else ()
    lora = get_lora_model(model, LoraConfig(r=4, init_lora_weights=False, target_modules="all-linear"), "a0").eval()
    call = lora
model.forward = torch.compile(model.forward, backend=stubbed, fullgraph=True)
ids = torch.randint(0, 64, (4, 1))
with torch.no_grad():
    for _ in range(5):
        call(input_ids=ids, use_cache=False)
    best = 1e9
    for _ in range(15):
        s = time.perf_counter()
        for _ in range(100):
            call(input_ids=ids, use_cache=False)
        best = min(best, (time.perf_counter() - s) / 100)
print(mode, f"{1e6 * best:.0f} us")
