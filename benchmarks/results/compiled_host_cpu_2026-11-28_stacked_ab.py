"""The host's call of a compiled decode-64 step on the project's CPU, the layers' tables stacked in one tensor or
each its own (ops.gathered.STACKED), interleaved with the base model in rounds, as benchmarks/compiled_host_cpu.py
measures it but through AOT's runtime wrappers (its graph stubbed by aot_autograd with a compiler that returns the
first outputs again), since a graph's inputs cost there too.

Run: PYTHONPATH=. python benchmarks/results/compiled_host_cpu_2026-11-28_stacked_ab.py
"""

import argparse
import statistics
import sys

from torch._dynamo.backends.common import aot_autograd

sys.path.insert(0, "benchmarks")
import compiled_host_cpu as c  # noqa: E402

import lorakit.layer  # noqa: E402
from lorakit import packed  # noqa: E402
from lorakit.ops import gathered  # noqa: E402


def stub(gm, example_inputs):
    kept = {}

    def run(inputs):
        if "out" not in kept:
            kept["out"] = gm(*inputs)
        return kept["out"]

    run._boxed_call = True
    return run


def main() -> None:
    args = argparse.Namespace(layers=8, adapters=64, steps=300, case="decode-64")
    lorakit.layer.GATHER_DEVICES = ("cuda", "cpu")
    lorakit.layer.ops.add_gathered_lora = c._gathered_stand_in
    lorakit.layer.ops.gathered_linear_group = c._linear_group_stand_in
    packed.PACK_DEVICES = ("cuda", "cpu")
    c.stubbed = aot_autograd(fw_compiler=stub)
    results = {}
    for _ in range(4):
        for mode in ("stacked", "unstacked", "base"):
            gathered.STACKED = mode == "stacked"
            m = c.measure("base" if mode == "base" else "ours", args)
            results.setdefault(mode, []).append((round(m["step_us"]), round(m["guards_us"], 1)))
    for mode, rounds in results.items():
        step, guards = statistics.median(s for s, _ in rounds), statistics.median(g for _, g in rounds)
        print(f"{mode}: (call us, guards us) by round {rounds}; medians {step} and {guards}", flush=True)


if __name__ == "__main__":
    main()
