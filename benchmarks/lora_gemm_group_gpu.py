"""Projections that read the same few rows (q, k, v; gate, up) in one launch (lora_gemm_group) against one
lora_gemm launch each and against cuBLAS's base GEMVs alone, Llama-3.2-1B's shapes, a decode step of 4 rows, bf16,
r16, no bias.

  base      F.linear per projection (cuBLAS), no adapter: what the base model runs
  each      lora_gemm per projection (what a compiled decode step ran before groups)
  group     lora_gemm_group: all the group's projections with their LoRA terms in one kernel

Timing: triton.testing.do_bench_cudagraph (the calls replayed in a CUDA graph, as in a compiled decode step), over
copies of the weights so they come from memory, not L2. Every result is checked against float64 math.

Run (CUDA): PYTHONPATH=. python benchmarks/lora_gemm_group_gpu.py [--rows 4] [--sweep] [--json PATH]
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
    sys.exit("benchmarks/lora_gemm_group_gpu.py needs triton and a CUDA GPU")

from lorakit.ops.triton.lora_gemm import Tiles, lora_gemm, lora_gemm_group, tiles_for

GROUPS = {"q,k,v": (2048, (2048, 512, 512)), "gate,up": (2048, (8192, 8192))}


def _reference(x, w, a, b, scale):
    x, w, a, b = (t.double() for t in (x, w, a, b))
    return x @ w.T + scale * (x @ a.T) @ b.T


def measure(name: str, n_in: int, outs: tuple[int, ...], args) -> dict:
    dtype, rank, scale = torch.bfloat16, args.rank, 2.0
    copies = max(1, (256 << 20) // (n_in * sum(outs) * 2))
    ws = [[torch.randn(n, n_in, device="cuda", dtype=dtype) / n_in**0.5 for n in outs] for _ in range(copies)]
    a_s = [(torch.randn(rank, n_in, device="cuda") / n_in**0.5).to(dtype) for _ in outs]
    b_s = [(torch.randn(n, rank, device="cuda") * 0.1).to(dtype) for n in outs]
    x = torch.randn(args.rows, n_in, device="cuda", dtype=dtype)
    scales = [scale] * len(outs)
    got = lora_gemm_group(x, ws[0], [None] * len(outs), a_s, b_s, scales)
    for y, w, a, b in zip(got, ws[0], a_s, b_s, strict=True):
        expected = _reference(x, w, a, b, scale)
        err = (y.double() - expected).abs().max().item()
        if err > 2e-2 * expected.abs().max().item():
            raise AssertionError(f"{name}: group kernel off by {err}")

    def base(i):
        return [F.linear(x, w) for w in ws[i]]

    def each(i):
        return [lora_gemm(x, w, None, a, b, scale) for w, a, b in zip(ws[i], a_s, b_s, strict=True)]

    def group(i):
        return lora_gemm_group(x, ws[i], [None] * len(outs), a_s, b_s, scales)

    result = {}
    for label, call in (("base", base), ("each", each), ("group", group)):
        replays = do_bench_cudagraph(lambda c=call: [c(i) for i in range(copies)], rep=200)
        result[f"{label}_us"] = 1000 * replays / copies
    if args.sweep:
        best = None
        for bn, bk, st, wp in itertools.product((16, 32, 64), (128, 256), (3, 4, 5), (2, 4)):
            tiles = Tiles(16, bn, bk, st, wp, 1)
            try:
                us = 1000 * do_bench_cudagraph(
                    lambda t=tiles: [lora_gemm_group(x, ws[i], [None] * len(outs), a_s, b_s, scales, t)
                                     for i in range(copies)], rep=50) / copies  # fmt: skip
            except Exception as err:  # out of shared memory or registers: not a candidate
                print(f"  {tiles}: {type(err).__name__}", flush=True)
                continue
            if best is None or us < best[0]:
                best = (us, tiles)
        result["sweep_best_us"], result["sweep_best"] = best[0], str(best[1])
        result["shipped_tiles"] = str(tiles_for(args.rows, sum(outs), n_in, rank))
    result["group_vs_base"] = result["group_us"] / result["base_us"]
    result["each_vs_base"] = result["each_us"] / result["base_us"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--json", default=None)
    parser.add_argument("--sweep", action="store_true", help="the group kernel over tile configurations too")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": args.rows}
    for name, (n_in, outs) in GROUPS.items():
        results[name] = measure(name, n_in, outs, args)
        print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in results[name].items()}, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
