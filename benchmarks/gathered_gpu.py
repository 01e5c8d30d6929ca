"""The gathered decode kernels (lorakit/ops/triton/gathered.py) per projection of Llama-3.2-1B's shape.

64 token rows, each on its own adapter of 64 (r16, bf16 factors), one decode step's routed term of one layer:
  base       the layer's own GEMV, x W^T (cuBLAS), for scale
  gathered   the two kernels with the shipped tiles (ops/triton/gathered.launch's defaults), element loads
  aligned    the same with ALIGNED (the table's addresses declared 16-byte aligned: 16-byte loads)
  floor      the bytes the step must read (the 64 adapters' factors once) at --bandwidth GB/s
  sweep      both forms over --sweep's tile choices; the best of each is printed (how the defaults were chosen)
Timing: triton.testing.do_bench_cudagraph (replayed in a CUDA graph, as in a compiled decode step), over --copies
copies of the adapters in turn, so their factors come from memory, not L2. Each result is checked against float64.

Run (CUDA): PYTHONPATH=. python benchmarks/gathered_gpu.py [--sweep] [--json PATH]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import torch.nn.functional as F

try:
    from triton.testing import do_bench_cudagraph
except ImportError:
    sys.exit("benchmarks/gathered_gpu.py needs triton and a CUDA GPU (the kernels it measures are triton kernels)")

from lorakit.ops import gather_table, reference
from lorakit.ops.reference import LoraFactors
from lorakit.ops.triton.gathered import launch

SHAPES = {"q/o_proj": (2048, 2048), "k/v_proj": (2048, 512), "gate/up_proj": (2048, 8192), "down_proj": (8192, 2048)}
SWEEP = [  # the shrink's tiles with the expand's defaults, then the other way round
    *((c, w, 256, 4) for c, w in itertools.product((64, 128, 256, 512, 1024, 2048), (1, 2, 4, 8))),
    *((128, 1, n, w) for n, w in itertools.product((32, 64, 128, 256), (1, 2, 4, 8))),
]


def _tables(n_in: int, n_out: int, args) -> list:
    tables = []
    for _ in range(args.copies):
        factors = [
            LoraFactors(
                (torch.randn(args.rank, n_in, device="cuda") / n_in**0.5).bfloat16(),
                (torch.randn(n_out, args.rank, device="cuda") / args.rank**0.5).bfloat16(),
                2.0,
                0.0,
            )
            for _ in range(args.adapters)
        ]
        tables.append(gather_table(factors))
    return tables


def _time(call, copies: int) -> float:
    return 1000 * do_bench_cudagraph(lambda: [call(i) for i in range(copies)], rep=100) / copies  # us


TILE_NAMES = ("chunk_cols", "shrink_warps", "expand_cols", "expand_warps")


def run(args) -> dict:
    torch.manual_seed(0)
    results = {}
    for name, (n_in, n_out) in SHAPES.items():
        results[name] = row = _projection(n_in, n_out, args)
        print(name, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return results


def _projection(n_in: int, n_out: int, args) -> dict:
    tables = _tables(n_in, n_out, args)
    x = torch.randn(args.rows, n_in, device="cuda").bfloat16()
    out = torch.randn(args.rows, n_out, device="cuda").bfloat16()
    slots = (torch.arange(args.rows, device="cuda", dtype=torch.int32) % args.adapters)[:, None]
    weights = [torch.randn(n_out, n_in, device="cuda").bfloat16() for _ in range(args.copies)]

    def gathered(i, tiles=(), aligned=False):
        t = tables[i]
        launch(out, x, slots, t.entries, t.block_r, t.code, aligned, **dict(zip(TILE_NAMES, tiles, strict=False)))

    assert all(t.aligned for t in tables)  # fresh tensors: the aligned form reads them correctly
    wide = [LoraFactors(f.lora_A.double(), f.lora_B.double(), f.scale, 0.0) for f in tables[0].factors]
    want = reference.add_gathered_lora(out.double(), x.double(), slots, wide)  # before any timed call
    moved = args.adapters * args.rank * (n_in + n_out) * 2 + args.rows * (n_in + 2 * n_out) * 2
    row = {"base_us": _time(lambda i: F.linear(x, weights[i]), args.copies), "floor_us": moved / args.bandwidth / 1e3}
    start = out.clone()  # the timed calls add into `out`
    for form, aligned in (("gathered", False), ("aligned", True)):
        check = start.clone()
        launch(check, x, slots, tables[0].entries, tables[0].block_r, tables[0].code, aligned)
        row[f"{form}_us"] = _time(lambda i, a=aligned: gathered(i, aligned=a), args.copies)
        row[f"{form}_max_rel_error"] = ((check.double() - want).abs().max() / want.abs().max()).item()
        if args.sweep:
            timed = {tiles: _time(lambda i, t=tiles, a=aligned: gathered(i, t, a), args.copies) for tiles in SWEEP}
            best = min(timed, key=timed.get)
            row[f"{form}_sweep_best"] = dict(zip(TILE_NAMES, best, strict=True))
            row[f"{form}_sweep_best_us"] = timed[best]
    return row


def case_arguments(parser: argparse.ArgumentParser) -> None:
    """The decode step's shape: rows, each on its own adapter of --adapters, over --copies copies (not from L2)."""
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--copies", type=int, default=4, help="copies of the adapters (and W), used in turn")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    case_arguments(parser)
    parser.add_argument("--bandwidth", type=float, default=3350.0, help="GB/s for the floor (H100 SXM: 3350)")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "args": vars(args), "results": run(args)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
