"""The host's share of a compiled one-adapter step on the CPU, with lorakit.packed's views (the patch
decode_step_gpu_h100_2026-11-27_packed_views.patch applied) against the factors themselves: a 16-layer tiny Llama,
r4 all-linear, 4 rows, the graph stubbed (its first outputs returned again), called through the LoraModel.
Best of 15 rounds of 100 calls.

Run, on a tree with the patch applied: PYTHONPATH=.:benchmarks python <this file> base|ours|views
"""

import argparse
import sys
import time

import torch
from compiled_host_cpu import build, stubbed

from lorakit import packed

mode = sys.argv[1]
packed.PACK_DEVICES = ("cpu",) if mode == "views" else ()
call, model, _ = build("base" if mode == "base" else "ours", argparse.Namespace(layers=16, adapters=1))
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
