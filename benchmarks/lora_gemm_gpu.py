"""The inference GEMM with LoRA inside (lorakit/ops/triton/lora_gemm.py) against cuBLAS, Llama-3.2-1B's shapes.

For each projection (in -> out) and row count (4: a decode step of 4 sequences; 2048: a 4 x 512 prefill), bf16,
r16, a bias-free layer:
  base        F.linear alone (cuBLAS): the floor
  composite   lorakit's cuBLAS composite (fused_linear._inference): t = x A^T, then s t B^T and x W^T into one y
  fused       lora_gemm with the shipped tile table (tiles_for)
  sweep       lora_gemm over --sweep's tile configurations; the best is printed (how tiles_for was chosen)
Timing: triton.testing.do_bench_cudagraph (the calls replayed in a CUDA graph, so the host's launches are out of
it, as in a compiled decode step), over --copies copies of the weights in turn so they come from memory, not L2,
as in a model whose layers do not fit in L2. Each result is checked against float64 math.

Run (CUDA): PYTHONPATH=. python benchmarks/lora_gemm_gpu.py [--sweep] [--json PATH]
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
    sys.exit("benchmarks/lora_gemm_gpu.py needs triton and a CUDA GPU (the kernel it measures is a triton kernel)")

from lorakit.ops.reference import LoraFactors
from lorakit.ops.triton import fused_linear
from lorakit.ops.triton.lora_gemm import Tiles, lora_gemm, tiles_for

SHAPES = {"q/o_proj": (2048, 2048), "k/v_proj": (2048, 512), "gate/up_proj": (2048, 8192), "down_proj": (8192, 2048)}
ROWS = (4, 2048)
PREFILL_SWEEP = [
    Tiles(*c)
    for c in [(128, 256, 64, 3, 8), (128, 256, 64, 4, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8),
              (128, 128, 64, 5, 4), (64, 256, 64, 4, 4)]
]  # fmt: skip
DECODE_SWEEP = [
    Tiles(16, bn, bk, st, w, 1)
    for bn, bk, st, w in itertools.product((16, 32), (128, 256, 512), (3, 5), (1, 2, 4))
    if bn * bk <= 32 * 256
]


def _reference(x, w, a, b, scale):
    x, w, a, b = (t.double() for t in (x, w, a, b))
    return x @ w.T + scale * (x @ a.T) @ b.T


def _time(call, copies: int) -> float:
    return do_bench_cudagraph(lambda: [call(i) for i in range(copies)], rep=200) / copies


def run(args) -> dict:
    torch.manual_seed(0)
    results = {}
    for (name, (n_in, n_out)), rows in itertools.product(SHAPES.items(), args.rows):
        row = _shape(args, n_in, n_out, rows)
        results[f"{name} rows={rows}"] = row
        print(f"{name} rows={rows}: {row}", flush=True)
        torch.cuda.empty_cache()
    return results


def _shape(args, n_in: int, n_out: int, rows: int) -> dict:
    dtype, rank, scale = torch.bfloat16, args.rank, 2.0
    copies = max(1, (256 << 20) // (n_in * n_out * 2 * 2))  # 256 MB of weights: not in L2
    ws = [torch.randn(n_out, n_in, device="cuda", dtype=dtype) / n_in**0.5 for _ in range(copies)]
    a = (torch.randn(rank, n_in, device="cuda") / n_in**0.5).to(dtype)
    b = (torch.randn(n_out, rank, device="cuda") * 0.1).to(dtype)
    x = torch.randn(rows, n_in, device="cuda", dtype=dtype)
    adapters = [LoraFactors(a, b, scale, 0.0)]
    expected = _reference(x, ws[0], a, b, scale)
    tol = 2e-2 * expected.abs().max().item()

    def check(y, what):
        err = (y.double() - expected).abs().max().item()
        if err > tol:
            raise AssertionError(f"{n_in}->{n_out} rows={rows} {what}: max error {err:.3g} > {tol:.3g}")

    def fused(tiles=None, shrink=None, lora=True):
        return lambda i: lora_gemm(x, ws[i], None, a if lora else None, b, scale, tiles, shrink)

    with torch.no_grad():
        check(fused()(0), "fused")
        row = {
            "base_us": 1e3 * _time(lambda i: F.linear(x, ws[i]), copies),
            "composite_us": 1e3 * _time(lambda i: fused_linear._inference(x, ws[i], None, None, adapters), copies),
            "fused_us": 1e3 * _time(fused(), copies),
            "shrink_us": 1e3 * _time(lambda i: torch.mm(x, a.T), copies),
            "tiles": str(tiles_for(rows, n_out, n_in)),
        }
        if args.sweep and rows in (4, 2048):
            timings = {}
            for tiles, shrink, lora in _sweep(rows):
                what = f"{tiles} shrink={shrink} lora={lora}"
                try:
                    if lora:
                        check(fused(tiles, shrink)(0), what)
                    timings[what] = round(1e3 * _time(fused(tiles, shrink, lora), copies), 2)
                except Exception as error:  # a configuration the GPU cannot hold (shared memory)
                    print(f"  skip {what}: {type(error).__name__}: {str(error)[:120]}")
            print("  " + json.dumps(timings))
            best = min((us, what) for what, us in timings.items() if "lora=True" in what)
            row["sweep_best_us"], row["sweep_best"] = best
            row["sweep"] = timings
    row = {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}
    row["composite/base"] = round(row["composite_us"] / row["base_us"], 3)
    row["fused/base"] = round(row["fused_us"] / row["base_us"], 3)
    if "sweep_best_us" in row:
        row["best/base"] = round(row["sweep_best_us"] / row["base_us"], 3)
    return row


def _sweep(rows: int):
    """(tiles, shrink, lora): few rows, the decode tiles with t in the loop; many rows, the pointer kernel's tiles,
    each also without the LoRA term (the bare GEMM against cuBLAS; the TMA kernel: persistent_gemm_gpu.py)."""
    if rows <= 16:
        return [(t, True, True) for t in DECODE_SWEEP] + [(t, True, False) for t in DECODE_SWEEP[:6]]
    return [(t, False, lora) for t in PREFILL_SWEEP for lora in (True, False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=lambda s: tuple(int(v) for v in s.split(",")), default=ROWS)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: the kernel it measures runs only there")
    out = {
        "device": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__},
        "args": vars(args),
        "results": run(args),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
