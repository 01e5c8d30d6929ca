"""Mixed-adapter inference on the GPU: every row of a batch through its own adapter, against the base model alone
and against PEFT's adapter_names, on a Llama-3.2-1B-shaped model (random bf16 weights from config), in one run.

Cases: 8 adapters over batch 16 x 512 tokens, 64 adapters over batch 64 x 128 (r16 all-linear, bf16 factors,
random non-zero B so the adapters do work; rows assigned round-robin). Modes, each on a fresh model:
  base            the model alone
  ours            lorakit, model(input_ids, adapter_names=[...]) (the segmented kernels on CUDA)
  ours-reference  the same with LORAKIT_KERNELS=0 (the pure-torch reference op)
  peft            PEFT, model(input_ids, adapter_names=[...])
Median forward time (torch.no_grad, use_cache=False) over --steps after --warmup; ratios to the base's time.

Run (on a CUDA machine): PYTHONPATH=. python benchmarks/mixed_batch_gpu.py [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import torch
from train_step_gpu import add_model_arguments, build_model

CASES = {"8 adapters, 16x512": (8, 16, 512), "64 adapters, 64x128": (64, 64, 128)}


def adapt(mode: str, model, names: list[str], rank: int):
    if mode == "base":
        return model
    if mode == "peft":
        import peft

        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False)
        wrapped = peft.get_peft_model(model, config, adapter_name=names[0], autocast_adapter_dtype=False)
        for name in names[1:]:
            wrapped.add_adapter(name, config)
        return wrapped.to(torch.bfloat16)
    from lorakit import LoraConfig, get_lora_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False)
    wrapped = get_lora_model(model, config, adapter_name=names[0], adapter_dtype=torch.bfloat16)
    for name in names[1:]:
        wrapped.add_adapter(name, config, adapter_dtype=torch.bfloat16)
    return wrapped


def measure(mode: str, case: tuple[int, int, int], args: argparse.Namespace) -> float:
    n_adapters, batch, seq = case
    args.seq = seq  # build_model sizes positions from it
    os.environ["LORAKIT_KERNELS"] = "0" if mode == "ours-reference" else "1"
    names = [f"a{i}" for i in range(n_adapters)]
    model = adapt(mode, build_model(args), names, args.rank).eval()
    ids = torch.randint(0, args.vocab, (batch, seq), device="cuda")
    routing = {} if mode == "base" else {"adapter_names": [names[i % n_adapters] for i in range(batch)]}

    def forward() -> None:
        model(input_ids=ids, use_cache=False, **routing)

    with torch.no_grad():
        for _ in range(args.warmup):
            forward()
        times = []
        for _ in range(args.steps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            forward()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        if mode in (args.profile or "").split(","):
            _profile(forward, f"{n_adapters} adapters {mode}")
    return 1000 * statistics.median(times)


def _profile(forward, label: str) -> None:
    """The top CUDA ops of three forwards, and their total CUDA time against the wall time: where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            forward()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / 3 * 1000
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events) / 3 / 1000
    print(f"profile {label}: GPU busy {busy:.1f} ms of {wall:.1f} ms a forward (under the profiler)")
    print(events.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=70))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--modes", default="base,ours,ours-reference,peft")
    parser.add_argument("--json")
    parser.add_argument("--profile", help="modes whose top CUDA ops are printed per case (comma-separated)")
    args = parser.parse_args()
    results = {}
    for case_name, case in CASES.items():
        for mode in args.modes.split(","):
            results[f"{case_name} {mode}"] = ms = measure(mode, case, args)
            gc.collect()
            torch.cuda.empty_cache()
            print(f"{case_name} {mode}: {ms:.1f} ms", flush=True)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, r{args.rank}, bf16, forward only")
    print(f"{'case':<22}{'mode':<16}{'ms':>9}{'/ base':>9}")
    for key, ms in results.items():
        case_name, mode = key.rsplit(" ", 1)
        print(f"{case_name:<22}{mode:<16}{ms:>9.1f}{ms / results[case_name + ' base']:>9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "args": vars(args), "results_ms": results}, f, indent=2)


if __name__ == "__main__":
    main()
