"""The one-kernel form of the gathered decode term (gathered_gpu_h100_2026-11-27_fused.patch applied) against float64
math: 1-3 adapters a row, ranks 1-128, fp32/bf16/fp16, aligned and element loads, rows on no adapter untouched.

Run (CUDA, the patch applied): PYTHONPATH=. python benchmarks/results/gathered_gpu_h100_2026-11-27_fused_check.py
"""

import torch

from lorakit.ops import gather_table, reference
from lorakit.ops.reference import LoraFactors
from lorakit.ops.triton import gathered

CASES = [
    (1, 2048, 512, torch.bfloat16, [16] * 8),
    (3, 100, 33, torch.float32, [1, 7, 16, 3, 40]),
    (2, 2048, 520, torch.bfloat16, [8, 16, 64, 128]),
    (1, 8192, 2048, torch.float16, [16] * 4),
]


def _wide(factors):
    return [None if f is None else LoraFactors(f.lora_A.double(), f.lora_B.double(), f.scale, 0.0) for f in factors]


for paths, n_in, n_out, dtype, ranks in CASES:
    torch.manual_seed(0)
    factors = []
    for g, r in enumerate(ranks):
        a = (torch.randn(r, n_in, device="cuda") / n_in**0.5).to(dtype)
        b = (torch.randn(n_out, r, device="cuda") / r**0.5).to(dtype)
        factors.append(None if g == 2 else LoraFactors(a, b, 0.5 + g, 0.0))
    table = gather_table(factors)
    x = torch.randn(37, n_in, device="cuda").to(dtype)
    out = torch.randn(37, n_out, device="cuda").to(dtype)
    slots = torch.randint(-1, len(ranks), (37, paths), dtype=torch.int32, device="cuda")
    want = reference.add_gathered_lora(out.double(), x.double(), slots, _wide(factors))
    for per_row in [None, 1, 3]:
        got = out.clone()
        gathered.launch_fused(got, x, slots, table.entries, table.block_r, table.code, table.aligned, per_row)
        base = ((slots == 2) | (slots < 0)).all(-1)
        error = ((got.double() - want).abs().max() / want.abs().max()).item()
        untouched = torch.equal(got[base], out[base])
        print(paths, n_in, n_out, dtype, per_row, table.aligned, f"rel err {error:.2e}", untouched)
