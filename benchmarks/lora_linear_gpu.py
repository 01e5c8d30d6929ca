"""One adapted linear layer on the GPU, Llama-3.2-1B's shapes: the fused op against the reference and the bare base.

For each projection shape (tokens x in -> out), bf16 base, r16: median time of forward + backward (x needs its
gradient, W frozen) and of forward alone, for
  base            F.linear, the frozen layer alone (the floor)
  reference       lorakit.ops.reference.lora_linear: base + s * B(A(drop(x))) as PEFT computes it
  fused           lorakit.ops.triton lora_linear (bf16 factors)
  fused-fp32      the same with fp32 master factors (the default user)
  fused-drop      fused with dropout 0.1
  reference-drop  the reference with dropout 0.1
Times are CUDA-event medians (triton.testing.do_bench). Run: python benchmarks/lora_linear_gpu.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from lorakit.ops import reference
from lorakit.ops.reference import LoraFactors
from lorakit.ops.triton import fused_linear

SHAPES = {"q/o_proj": (2048, 2048), "k/v_proj": (2048, 512), "gate/up_proj": (2048, 8192), "down_proj": (8192, 2048)}


def _variants(weight: torch.Tensor, rank: int) -> dict[str, tuple]:
    out_f, in_f = weight.shape

    def factors(dtype, p):
        a = (torch.randn(rank, in_f, device="cuda") / in_f**0.5).to(dtype).requires_grad_()
        b = (torch.randn(out_f, rank, device="cuda") * 0.01).to(dtype).requires_grad_()
        return [LoraFactors(a, b, 2.0, p)]

    bf16 = torch.bfloat16
    return {
        "base": (None, []),
        "reference": (reference.lora_linear, factors(bf16, 0.0)),
        "fused": (fused_linear.lora_linear, factors(bf16, 0.0)),
        "fused-fp32": (fused_linear.lora_linear, factors(torch.float32, 0.0)),
        "reference-drop": (reference.lora_linear, factors(bf16, 0.1)),
        "fused-drop": (fused_linear.lora_linear, factors(bf16, 0.1)),
    }


def _time(fn, adapters, x, weight, grad, backward: bool) -> float:
    params = [x] + [t for a in adapters for t in (a.lora_A, a.lora_B)]

    def step():
        y = F.linear(x, weight) if fn is None else fn(x, weight, None, adapters, True)
        if backward:
            torch.autograd.grad(y, params, grad)

    with torch.set_grad_enabled(backward):
        return do_bench(step, warmup=50, rep=300, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {}
    for name, (in_f, out_f) in SHAPES.items():
        x = torch.randn(args.tokens, in_f, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        weight = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) / in_f**0.5
        grad = torch.randn(args.tokens, out_f, device="cuda", dtype=torch.bfloat16)
        for variant, (fn, adapters) in _variants(weight, args.rank).items():
            results[f"{name} {variant}"] = {
                "fwd_bwd_ms": _time(fn, adapters, x, weight, grad, True),
                "fwd_ms": _time(fn, adapters, x, weight, grad, False),
            }
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.tokens} tokens, r{args.rank}, bf16 base")
    print(f"{'layer / op':<30}{'fwd+bwd ms':>11}{'/ base':>8}{'fwd ms':>9}{'/ base':>8}")
    for key, r in results.items():
        base = results[key.split(" ")[0] + " base"]
        tb, fb = r["fwd_bwd_ms"] / base["fwd_bwd_ms"], r["fwd_ms"] / base["fwd_ms"]
        print(f"{key:<30}{r['fwd_bwd_ms']:>11.3f}{tb:>8.3f}{r['fwd_ms']:>9.3f}{fb:>8.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args),
                       "results": results}, f, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
