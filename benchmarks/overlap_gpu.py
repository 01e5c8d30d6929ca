"""A routed decode step's LoRA kernels beside the base's GEMV on a second stream, per projection of Llama-3.2-1B's
shape: does the card read the adapters while cuBLAS reads W, or do the two just queue for its memory?

64 token rows, each on its own adapter of 64 (r16, bf16 factors), as benchmarks/gathered_gpu.py; every form
replayed in a CUDA graph (the streams' fork and join recorded in it) over --copies copies of W and the adapters:
  base         y = x W^T (cuBLAS) alone
  serial       y = x W^T, then the shrink and the expand adding into y (what a compiled step runs today)
  fork-shrink  the shrink on a second stream while x W^T runs; the expand after both, adding into y
  fork-both    shrink and expand (into a buffer z of y's size) on a second stream while x W^T runs; then y += z
Each form's y is checked against float64 math. The kernels load the factors element by element, with the tiles
they had then (as measured in results/overlap_gpu_h100_2026-11-27*.json); --aligned: 16-byte loads and their tiles.

Run (CUDA): PYTHONPATH=.:benchmarks python benchmarks/overlap_gpu.py [--aligned] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

try:
    import triton
    from triton.testing import do_bench_cudagraph
except ImportError:
    sys.exit("benchmarks/overlap_gpu.py needs triton and a CUDA GPU")

from gathered_gpu import SHAPES, _tables, case_arguments

from lorakit.ops import reference
from lorakit.ops.reference import LoraFactors
from lorakit.ops.triton.gathered import TILE, _expand_kernel, _shrink_kernel

FORMS = ("base", "serial", "fork-shrink", "fork-both")


class Kernels:
    """The two gathered kernels launched apart (ops/triton/gathered.launch's tiles), over a kept partial buffer."""

    def __init__(self, x: torch.Tensor, n_out: int, block_r: int, aligned: bool) -> None:
        n_tokens, n_in = x.shape
        self.block_k = max(16, min(128, TILE // block_r))
        self.aligned, self.shrink_warps = aligned, 8 if aligned else 1
        self.chunk = triton.cdiv(min(n_in, 512 if aligned else 128), self.block_k) * self.block_k
        self.chunks = triton.cdiv(n_in, self.chunk)
        self.block_n = max(16, min(256, TILE // block_r))
        self.part = torch.empty((self.chunks, 1, n_tokens, 1, block_r), dtype=torch.float32, device=x.device)
        self.block_r, self.n_out = block_r, n_out

    def shrink(self, x, slots, table) -> None:
        n_tokens, n_in = x.shape
        entries = table.entries
        _shrink_kernel[(n_tokens, 1, self.chunks)](
            x, slots, entries, entries, entries, self.part, n_tokens, n_in, self.chunk, self.chunks,
            PARTS=1, PATHS=1, BLOCK_R=self.block_r, BLOCK_K=self.block_k, CODE=table.code, ALIGNED=self.aligned,
            num_warps=self.shrink_warps,
        )  # fmt: skip

    def expand(self, out, slots, table) -> None:
        n_tokens = out.shape[0]
        _expand_kernel[(n_tokens, triton.cdiv(self.n_out, self.block_n))](
            self.part, slots, *[table.entries] * 3, *[out] * 3, self.n_out, 0, 0, n_tokens,
            CHUNKS=self.chunks, PARTS=1, PATHS=1, BLOCK_R=self.block_r, BLOCK_N=self.block_n, CODE=table.code,
            ALIGNED=self.aligned, num_warps=4,
        )  # fmt: skip


def _projection(n_in: int, n_out: int, args, side: torch.cuda.Stream) -> dict:
    tables = _tables(n_in, n_out, args)
    weights = [torch.randn(n_out, n_in, device="cuda").bfloat16() for _ in range(args.copies)]
    x = torch.randn(args.rows, n_in, device="cuda").bfloat16()
    slots = (torch.arange(args.rows, device="cuda", dtype=torch.int32) % args.adapters)[:, None]
    kernels = Kernels(x, n_out, tables[0].block_r, args.aligned and tables[0].aligned)
    y = torch.empty(args.rows, n_out, device="cuda", dtype=torch.bfloat16)
    z = torch.zeros_like(y)

    def base(i):
        torch.mm(x, weights[i].T, out=y)

    def serial(i):
        torch.mm(x, weights[i].T, out=y)
        kernels.shrink(x, slots, tables[i])
        kernels.expand(y, slots, tables[i])

    def fork_shrink(i):
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            kernels.shrink(x, slots, tables[i])
        torch.mm(x, weights[i].T, out=y)
        main.wait_stream(side)
        kernels.expand(y, slots, tables[i])

    def fork_both(i):
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            z.zero_()
            kernels.shrink(x, slots, tables[i])
            kernels.expand(z, slots, tables[i])
        torch.mm(x, weights[i].T, out=y)
        main.wait_stream(side)
        y.add_(z)

    calls = dict(zip(FORMS, (base, serial, fork_shrink, fork_both), strict=True))
    wide = [LoraFactors(f.lora_A.double(), f.lora_B.double(), f.scale, 0.0) for f in tables[0].factors]
    want = reference.add_gathered_lora(x.double() @ weights[0].double().T, x.double(), slots, wide)
    row = {}
    for form, call in calls.items():
        call(0)
        torch.cuda.synchronize()
        if form != "base":
            row[f"{form}_max_rel_error"] = ((y.double() - want).abs().max() / want.abs().max()).item()
        row[f"{form}_us"] = 1000 * do_bench_cudagraph(lambda c=call: [c(i) for i in range(args.copies)], rep=100)
        row[f"{form}_us"] /= args.copies
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    case_arguments(parser)
    parser.add_argument("--aligned", action="store_true", help="16-byte loads (GatherTable.aligned) and their tiles")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    side = torch.cuda.Stream()
    results = {}
    for name, (n_in, n_out) in SHAPES.items():
        results[name] = row = _projection(n_in, n_out, args, side)
        print(name, {k: round(v, 4) for k, v in row.items()}, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
