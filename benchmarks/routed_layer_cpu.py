"""The host's cost of one routed LoRA layer call on a kept plan: what each layer of a mixed-adapter decode step
spends in Python (checking its adapters for changes, the three ops of the dense form, the base layer), with the
arithmetic made negligible: an 8 x 8 nn.Linear, one token for each of --rows rows, adapters of rank 2.

On a GPU these calls only launch kernels, so this time is most of a routed decode step's (benchmarks/README.md,
"Routed decode steps, eager and compiled"). The dense form is CUDA's (routed_dense); here it runs on the CPU.

It also prints what calling an op costs before its body runs, defined through torch.library.custom_op or through
torch.library's low-level API (the routed op of a compiled model, lorakit.layer, uses the latter).

Run: PYTHONPATH=. python benchmarks/routed_layer_cpu.py [--adapters 8,64] [--rows 64]
"""

from __future__ import annotations

import argparse
import platform
import timeit

import torch
from torch import nn

from lorakit import LoraConfig, get_lora_model
from lorakit.ops import routed_dense


def call_us(adapters: int, rows: int, repeat: int) -> float:
    """Best of `repeat` means over 500 calls, in microseconds."""
    torch.manual_seed(0)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights=False)
    model = get_lora_model(nn.Sequential(nn.Linear(8, 8)), config, adapter_name="a0")
    for i in range(1, adapters):
        model.add_adapter(f"a{i}", config)
    model.eval()
    names = [f"a{i % adapters}" for i in range(rows)]
    x, layer = torch.randn(rows, 1, 8), model.model[0]
    with torch.no_grad(), model.routed(names):
        layer(x)  # builds the plan the timed calls keep
        return min(timeit.repeat(lambda: layer(x), number=500, repeat=repeat)) / 500 * 1e6


def dispatch_us() -> dict[str, float]:
    """What calling an op costs before its body runs, for a no-op with the routed op's schema defined both ways
    torch offers (lorakit.layer defines add_routed_terms_ through the low-level one): best mean over 2000 calls."""
    schema = "(Tensor x, Tensor(a!) out, int layer) -> ()"
    library = torch.library.Library("routed_layer_cpu", "DEF")
    library.define("low_level_" + schema)
    library.impl("low_level_", lambda x, out, layer: None, "CompositeExplicitAutograd")

    @torch.library.custom_op("routed_layer_cpu::custom_op_", mutates_args=("out",))
    def _custom(x: torch.Tensor, out: torch.Tensor, layer: int) -> None:
        return None

    x, out, ops = torch.randn(4, 8), torch.randn(4, 8), torch.ops.routed_layer_cpu
    calls = {"low-level": lambda: ops.low_level_(x, out, 0), "custom_op": lambda: ops.custom_op_(x, out, 0)}
    return {name: min(timeit.repeat(call, number=2000, repeat=5)) / 2000 * 1e6 for name, call in calls.items()}


def _counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected positive whole numbers separated by commas, got {text!r}")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=_counts, default="8,64", help="comma-separated adapter counts")
    parser.add_argument("--rows", type=int, default=64, help="token rows, one per routed row (at least 1)")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    if args.rows < 1 or args.repeat < 1:
        parser.error("--rows and --repeat take at least 1")
    torch.set_num_threads(1)
    routed_dense.DEVICES = (*routed_dense.DEVICES, "cpu")
    machine = platform.processor() or platform.machine()
    print(f"routed_layer_cpu: {machine}, torch {torch.__version__}, {args.rows} rows")
    for n in args.adapters:
        print(f"{n:3d} adapters: {call_us(n, args.rows, args.repeat):6.1f} us a routed layer call")
    for name, us in dispatch_us().items():
        print(f"an op through {name}: {us:.1f} us a call before its body")


if __name__ == "__main__":
    main()
