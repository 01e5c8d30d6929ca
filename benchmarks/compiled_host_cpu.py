"""The host's share of a compiled routed decode step, measured on the CPU: dynamo's guard evaluation and the whole
call with the compiled graph's own work stubbed out (its first outputs returned again), so what is left is what
the host does around a graph that CUDA graphs would replay: the entry hooks, the guards, gathering the graph's
inputs; and the call with the compiled forward itself replaced by a no-op ("around the forward": the wrapper's
Python, lorakit's routed block). The gathered path runs on the CPU here (lorakit.layer.GATHER_DEVICES), its op a
no-op stand-in.

A tiny Llama (hidden 32) of --layers layers, --adapters r4 all-linear adapters, 64 rows each on adapter i mod
--adapters (--case one-adapter: one adapter set active, 4 rows, no routing: the packed path), eval mode, no
gradient; `base` is the same model without adapters. Medians of --steps calls; guard
times the best of 7 rounds of --steps checks (this 2-core machine's other work moves single rounds).

Run: PYTHONPATH=. python benchmarks/compiled_host_cpu.py [--layers 8] [--adapters 64] [--case decode-64|one-adapter]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit.layer
from lorakit import LoraConfig, get_lora_model, packed
from lorakit.ops import gathered

ROWS = 64


@torch.library.custom_op("lorakit_bench::gathered_stand_in", mutates_args={"out"})
def _stand_in(out: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, entries: torch.Tensor) -> None:
    """What the graph calls in place of the gathered kernels: the same inputs, no work."""


def _gathered_stand_in(out, x, slots, table, *rest):
    _stand_in(out, x, slots, rest[0] if rest else gathered.entries_of(table))
    return out


def _linear_group_stand_in(x, weights, biases, slots, tables):
    outs = [torch.nn.functional.linear(x, w, b) for w, b in zip(weights, biases, strict=True)]
    terms = [x.new_zeros(x.shape[0], w.shape[0]) for w in weights]
    for term, table in zip(terms, tables, strict=True):
        _stand_in(term, x, slots, gathered.entries_of(table))
    return outs, terms


def build(mode: str, args: argparse.Namespace):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=args.layers, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    if mode == "base":
        return model, model, {}
    lora = get_lora_model(model, LoraConfig(r=4, init_lora_weights=False, target_modules="all-linear"), "a0")
    if args.case == "one-adapter":
        return lora.eval(), lora.model, {}
    for i in range(1, args.adapters):
        lora.add_adapter(f"a{i}", LoraConfig(r=4, init_lora_weights=False, target_modules="all-linear"))
    return lora.eval(), lora.model, {"adapter_names": [f"a{i % args.adapters}" for i in range(ROWS)]}


def stubbed(gm, example_inputs):
    """A backend whose graph runs once, then returns the same outputs: the host's work around it is what is left."""
    kept = {}

    def run(*inputs):
        if "out" not in kept:
            kept["out"] = gm.forward(*inputs)
        return kept["out"]

    return run


def measure(mode: str, args: argparse.Namespace) -> dict[str, float]:
    torch._dynamo.reset()  # both modes compile the same transformers code: each its own cache entries
    model, inner, routing = build(mode, args)
    original = type(inner).forward
    inner.forward = torch.compile(inner.forward, backend=stubbed, fullgraph=True)
    rows = ROWS if args.case == "decode-64" else 4
    ids = torch.randint(0, 64, (rows, 1), generator=torch.Generator().manual_seed(1))

    def step():
        return model(input_ids=ids, use_cache=False, **routing)

    with torch.no_grad():
        for _ in range(3):
            step()
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        entries = _debug_get_cache_entry_list(original.__code__)
        local = {"args": (inner,), "kwargs": {"input_ids": ids, "use_cache": False}}
        for name, cell in zip(original.__code__.co_freevars, original.__closure__ or (), strict=True):
            local[name] = cell.cell_contents
        block = model.routed(routing["adapter_names"]) if routing else torch.no_grad()
        with block:
            guards = entries[0].guard_manager
            if not guards.check(local):
                raise RuntimeError("the guards fail on the frame rebuilt here; the measurement would be wrong")
            best = float("inf")
            for _ in range(7):
                start = time.perf_counter()
                for _ in range(args.steps):
                    guards.check(local)
                best = min(best, (time.perf_counter() - start) / args.steps)
        inner.forward = _nothing  # what is left is the Python around the compiled forward (lorakit's routed block)
        around = []
        for _ in range(10 * args.steps):
            start = time.perf_counter()
            step()
            around.append(time.perf_counter() - start)
    return {
        "step_us": 1e6 * statistics.median(times), "guards_us": 1e6 * best, "graphs": len(entries),
        "around_us": 1e6 * statistics.median(around),
    }  # fmt: skip


def _nothing(*args, **kwargs) -> None:
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--case", choices=("decode-64", "one-adapter"), default="decode-64")
    args = parser.parse_args()
    lorakit.layer.GATHER_DEVICES = ("cuda", "cpu")
    lorakit.layer.ops.add_gathered_lora = _gathered_stand_in
    lorakit.layer.ops.gathered_linear_group = _linear_group_stand_in
    packed.PACK_DEVICES = ("cuda", "cpu")
    for mode in ("base", "ours"):
        result = measure(mode, args)
        print(f"{args.case} {mode}: {args.layers} layers, step {result['step_us']:.0f} us (graph stubbed), guards "
              f"{result['guards_us']:.1f} us, {result['graphs']} graph(s), around the forward "
              f"{result['around_us']:.1f} us", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
