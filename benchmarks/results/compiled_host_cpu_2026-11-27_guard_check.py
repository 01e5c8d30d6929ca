"""Dynamo's guard check alone, the whole call, and the call with guards skipped, of a compiled one-adapter
inference step on the CPU, in this process: a 16-layer tiny Llama (benchmarks/compiled_host_cpu.build), r4
all-linear, 4 rows, the graph stubbed (its first outputs returned again). Best of 15 rounds of 200 calls each.

Modes: `base` (no adapters), `views` (lorakit, its factors as views of lorakit.packed's buffer, as a compiled CUDA
step reads them), `wrapper` (every LoraLayer's forward replaced by F.linear on its base weight times one integer
from its own __dict__: what the wrapper module alone costs the guards, with almost nothing read).

Run from a tree: PYTHONPATH=.:benchmarks python <this file> base|views|wrapper
"""

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from compiled_host_cpu import build, stubbed
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

from lorakit import packed
from lorakit.layer import LoraLayer

mode = sys.argv[1]
packed.PACK_DEVICES = ("cpu",) if mode != "base" else ()
if mode == "wrapper":
    LoraLayer.forward = lambda self, x: (
        F.linear(x, self._modules["base_layer"]._parameters["weight"]) * self.__dict__["_k"]
    )
call, model, _ = build("base" if mode == "base" else "ours", argparse.Namespace(layers=16, adapters=1))
for layer in model.modules():
    layer.__dict__["_k"] = 2
inner = model.forward
ids = torch.randint(0, 64, (4, 1))


def best(f, n=200, rounds=15):
    out = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(n):
            f()
        out = min(out, (time.perf_counter() - start) / n)
    return 1e6 * out


with torch.no_grad():
    model.forward = torch.compile(inner, backend=stubbed, fullgraph=True)
    for _ in range(3):
        call(input_ids=ids, use_cache=False)
    torch._dynamo.reset()  # the views exist now: one compiled entry, made after them
    model.forward = torch.compile(inner, backend=stubbed, fullgraph=True)
    for _ in range(3):
        call(input_ids=ids, use_cache=False)
    code, frame_locals = inner.__func__.__code__, {}

    def catch(frame, event, arg):
        if event == "call" and frame.f_code is code and not frame_locals:
            frame_locals.update(frame.f_locals)

    sys.setprofile(catch)
    inner(input_ids=ids, use_cache=False)
    sys.setprofile(None)
    (entry,) = _debug_get_cache_entry_list(code)
    assert entry.guard_manager.check(frame_locals)
    guards = best(lambda: entry.guard_manager.check(frame_locals))
    whole = best(lambda: call(input_ids=ids, use_cache=False))
    with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
        unguarded = best(lambda: call(input_ids=ids, use_cache=False))
print(f"{mode}: guards {guards:.0f} us, call {whole:.0f} us, call without guards {unguarded:.0f} us")
