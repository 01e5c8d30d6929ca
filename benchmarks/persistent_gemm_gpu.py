"""The prefill kernel (lorakit/ops/triton/lora_gemm.py: persistent programs, tiles moved by the TMA unit, the LoRA
term added inside the base GEMM's tiles) against cuBLAS and the cuBLAS composite, per projection of Llama-3.2-1B.

    y = x W^T + s t B^T        t = x A^T: by one cuBLAS GEMM first (wide layers) or in the kernel's K loop (narrow)

Forms per projection and row count (bf16, r16, CUDA-graph replays over 256 MB of weight copies, so W comes from
memory; 2048 rows = a 4 x 512 prefill):
  cublas      F.linear alone: the floor
  composite   the cuBLAS composite (fused_linear._inference without the kernel): t, s t B^T, then x W^T onto it
  shipped     lora_gemm_prefill with prefill_tiles' choice, as the inference path runs it
  bare        the same kernel and tiles without the term (the persistent GEMM against cuBLAS)
  --sweep     every configuration of CONFIGS, t by cuBLAS ("cublas-t") and in the K loop ("shrink")
Each form with the term is checked against float64 math first.

Run (CUDA, sm90+): PYTHONPATH=.:benchmarks python benchmarks/persistent_gemm_gpu.py [--rows 512,2048] [--sweep]
    [--json PATH]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F
import triton
from splitk_gemv_gpu import SHAPES, projection, timed

from lorakit.ops.reference import LoraFactors
from lorakit.ops.triton import fused_linear
from lorakit.ops.triton.lora_gemm import Tiles, lora_gemm_prefill, prefill_tiles

CONFIGS = [
    Tiles(bm, bn, bk, stages, warps, 8, specialize)
    for (bm, bn, bk, stages, warps), specialize in itertools.product(
        [(128, 256, 64, 3, 8), (128, 128, 64, 4, 8), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)], (False, True)
    )
]


def _shape(n_in: int, n_out: int, rows: int, sweep: bool) -> dict:
    p = projection(n_in, n_out, rows)
    ws, a, b, x, scale, copies = p.ws, p.a, p.b, p.x, p.scale, len(p.ws)
    adapters = [LoraFactors(a, b, scale, 0.0)]
    if (err := p.error(lora_gemm_prefill(x, ws[0], None, a, b, scale))) is not None:
        raise AssertionError(f"{n_in}->{n_out} rows={rows} shipped: max error {err:.3g}")
    tiles, _ = prefill_tiles(n_out, a.shape[0])
    row = {
        "cublas_us": timed(lambda i: F.linear(x, ws[i]), copies),
        "composite_us": timed(lambda i: _composite(x, ws[i], adapters), copies),
        "shipped_us": timed(lambda i: lora_gemm_prefill(x, ws[i], None, a, b, scale), copies),
        "bare_us": timed(lambda i: lora_gemm_prefill(x, ws[i], None, None, None, scale, tiles), copies),
    }
    if sweep:
        row["sweep"] = {}
        for config, shrink in itertools.product(CONFIGS, (False, True)):
            what = f"{config} {'shrink' if shrink else 'cublas-t'}"
            try:
                if (err := p.error(lora_gemm_prefill(x, ws[0], None, a, b, scale, config, shrink))) is not None:
                    raise AssertionError(f"max error {err:.3g}")
                us = timed(lambda i, c=config, s=shrink: lora_gemm_prefill(x, ws[i], None, a, b, scale, c, s), copies)
                row["sweep"][what] = round(us, 2)
            except Exception as error:  # shared memory or registers the GPU cannot hold
                print(f"  skip {n_in}->{n_out} {what}: {type(error).__name__}: {str(error)[:160]}", flush=True)
        row["sweep_best_us"], row["sweep_best"] = min((us, what) for what, us in row["sweep"].items())
    row = {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}
    for key in ("composite_us", "shipped_us", "bare_us", "sweep_best_us"):
        if key in row:
            row[key.replace("_us", " / cublas")] = round(row[key] / row["cublas_us"], 3)
    return row


def _composite(x, w, adapters):
    """The inference path with the kernel turned away: what the layer ran before it."""
    kernel_for = fused_linear._kernel_for
    fused_linear._kernel_for = lambda *args: None
    try:
        return fused_linear._inference(x, w, None, None, adapters)
    finally:
        fused_linear._kernel_for = kernel_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=lambda s: [int(v) for v in s.split(",")], default=[2048])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    for rows, (name, (n_in, n_out)) in itertools.product(args.rows, SHAPES.items()):
        results[f"{name} rows={rows}"] = row = _shape(n_in, n_out, rows, args.sweep)
        print(f"{name} rows={rows}", {k: v for k, v in row.items() if k != "sweep"}, flush=True)
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
