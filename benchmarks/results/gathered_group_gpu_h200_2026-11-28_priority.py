"""gathered_group_gpu.py's terms-unadded form (lorakit's op under CUDA-graph replays) with its side stream at each
priority, two rounds in one process: whether a decode step's LoRA branch, ahead of the base products' GEMVs on the
card, shortens a group.

Run (CUDA): PYTHONPATH=.:benchmarks python benchmarks/results/gathered_group_gpu_h200_2026-11-28_priority.py
"""

import argparse

import gathered_group_gpu as g
import torch

from lorakit.ops.triton import gathered


def main() -> None:
    print("priority range", torch.cuda.Stream.priority_range(), flush=True)
    args = argparse.Namespace(rows=64, adapters=64, rank=16, copies=4, sweep=False, json=None)
    torch.manual_seed(0)
    for round_ in range(2):
        for priority in (0, -1, -5):  # -5 is clamped to the highest the card has
            gathered._SIDE.clear()
            gathered._SIDE[torch.device("cuda", 0)] = torch.cuda.Stream(priority=priority)
            total = {}
            for name, (n_in, sizes) in g.GROUPS.items():
                row = g._group(n_in, sizes, args)
                total[name] = (round(row["base_us"], 2), round(row["terms-unadded_us"], 2))
            layer = round(sum(v[1] for v in total.values()), 2)
            print(round_, "priority", priority, total, "layer", layer, flush=True)


if __name__ == "__main__":
    main()
