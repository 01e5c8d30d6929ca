"""Where a `lorakit serve` decode step's time goes: the engine's own batch (lorakit.serve.batch.DecodeBatch) and
forward (lorakit.serve.routing.forward_rows) without HTTP, on the model shape of benchmarks/serve_throughput.py.

Rows are prefilled one by one as the engine does, then --steps decode steps run for three routings of the same rows:
base (every row "__base__"), one adapter (every row on style0) and mixed (rows over the 8 adapters, grouped by
adapter as the engine keeps them). Reports the median step in ms, the GPU's busy time per step (torch.profiler,
CUDA), so wall - busy is the host's share, and the top Python functions of a mixed step (cProfile, by own time).

Run (CUDA): PYTHONPATH=. python benchmarks/serve_step_gpu.py [--rows 32] [--json PATH]
Smoke run (CPU, seconds): PYTHONPATH=. python benchmarks/serve_step_gpu.py --device cpu --layers 2 --hidden 64
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import platform
import pstats
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache

from lorakit import LoraConfig, get_lora_model
from lorakit.serve.batch import DecodeBatch
from lorakit.serve.engine import _cache_keyword
from lorakit.serve.routing import forward_rows

ADAPTERS = [f"style{i}" for i in range(8)]


def build(args: argparse.Namespace):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 43 // 16,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024)  # fmt: skip
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = LlamaForCausalLM(config).to(args.device, dtype).eval()
    lora = LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    wrapped = get_lora_model(model, lora, ADAPTERS[0], adapter_dtype=dtype)
    for name in ADAPTERS[1:]:
        wrapped.add_adapter(name, lora, adapter_dtype=dtype)
    return wrapped.eval()  # as the server has it (the adapted layers are new modules, in training mode)


def filled_batch(model, names: list[str], args: argparse.Namespace) -> DecodeBatch:
    """Rows prefilled alone and joined as the engine joins them (next to their adapter's rows)."""
    batch = DecodeBatch(args.device)
    key = _cache_keyword(model)
    generator = torch.Generator().manual_seed(1)
    for name in names:
        cache = DynamicCache()
        ids = torch.randint(0, args.vocab, (1, args.prompt), generator=generator).to(args.device)
        forward_rows(model, [name], input_ids=ids, use_cache=True, **{key: cache})
        batch.add(object(), cache, group=name)
    return batch


def step_fn(model, batch: DecodeBatch):
    key = _cache_keyword(model)
    names = list(batch.groups)
    tokens = [1] * len(names)

    def step() -> None:
        inputs = batch.step_inputs(tokens)
        inputs[key] = inputs.pop("cache")
        logits = forward_rows(model, names, **inputs)
        tokens[:] = logits.argmax(-1).tolist()

    return step


def measure(model, routing: str, args: argparse.Namespace) -> dict:
    rows = args.rows
    if routing == "base":
        names = ["__base__"] * rows
    elif routing == "one":
        names = [ADAPTERS[0]] * rows
    else:
        names = [ADAPTERS[i % len(ADAPTERS)] for i in range(rows)]
    with torch.inference_mode():
        step = step_fn(model, filled_batch(model, names, args))
        for _ in range(3):
            step()
        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        times = []
        for _ in range(args.steps):
            sync()
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
        result = {"step_ms": 1000 * statistics.median(times)}
        if args.device == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    step()
                sync()
            events = prof.key_averages()
            result["gpu_busy_ms"] = sum(e.self_device_time_total for e in events) / 1000 / 5
            result["kernels_per_step"] = sum(e.count for e in events if e.self_device_time_total > 0) / 5
        if routing == "mixed":
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(5):
                step()
            sync()
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
            result["python_profile"] = text.getvalue()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    start = time.perf_counter()
    loop = sum(i * i for i in range(2_000_000))  # the host's Python speed, for comparing machines
    host_loop_ms = 1000 * (time.perf_counter() - start)
    model = build(args)
    results = {}
    for routing in ("base", "one", "mixed"):
        results[routing] = measure(model, routing, args)
        print(routing, {k: v for k, v in results[routing].items() if k != "python_profile"}, flush=True)
    print(results["mixed"]["python_profile"])
    out = {"device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
           "torch": torch.__version__, "args": vars(args), "host_loop_ms": host_loop_ms, "loop": loop % 7,
           "results": results}  # fmt: skip
    print(f"host python loop: {host_loop_ms:.0f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
