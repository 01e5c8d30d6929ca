"""Mixed-adapter batch forward on CPU: ours / base and ours / PEFT `adapter_names`, in one process.

A 4-layer Llama-shaped model (transformers' LlamaConfig, hidden 512, seeded random fp32 weights) carries N
adapters (r=16 on q/k/v/o and the MLP, random factors so every term is real work); one batch of `--rows` rows
routes row i to adapter i mod N. Three forwards are timed in rounds, their order rotated each round so drift
falls on all alike: the base model alone, lorakit `model(ids, adapter_names=...)` and PEFT's. Reported: the median
time of each and the ratios of the medians. Both sides hold the same factors (copied), and their outputs are
checked equal (1e-4) before timing.

    .venv/bin/python benchmarks/mixed_batch.py                  # 8 and 64 adapters, seq 16 and 1
    .venv/bin/python benchmarks/mixed_batch.py --adapters 8 --seq 1 --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import time
from datetime import date
from pathlib import Path

import peft
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit import LoraConfig, get_lora_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_model(args) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=args.vocab,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def both_sides(base: LlamaForCausalLM, n: int, r: int):
    """lorakit and PEFT models over copies of `base`, with the same n adapters (PEFT's factors copied into ours)."""
    names = [f"a{i}" for i in range(n)]
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), _peft_config(r), adapter_name=names[0])
    ours = get_lora_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS), names[0])
    for name in names[1:]:
        theirs.add_adapter(name, _peft_config(r))
        ours.add_adapter(name, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    mine = dict(ours.model.named_modules())
    with torch.no_grad():
        for path, module in theirs.base_model.model.named_modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                for name in names:
                    adapter = mine[path].adapters[name]
                    adapter.lora_A.copy_(module.lora_A[name].weight)
                    adapter.lora_B.copy_(module.lora_B[name].weight)
    return ours.eval(), theirs.eval(), names


def _peft_config(r: int) -> peft.LoraConfig:
    return peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False)


def timed(fn, rounds_out: list[float]) -> None:
    start = time.perf_counter()
    fn()
    rounds_out.append(time.perf_counter() - start)


def measure(args, base, n: int, seq: int) -> dict:
    ours, theirs, names = both_sides(base, n, args.r)
    ids = torch.randint(0, args.vocab, (args.rows, seq), generator=torch.Generator().manual_seed(2))
    routed = [names[i % n] for i in range(args.rows)]
    calls = {
        "base": lambda: base(input_ids=ids),
        "ours": lambda: ours(input_ids=ids, adapter_names=routed),
        "peft": lambda: theirs(input_ids=ids, adapter_names=routed),
    }
    with torch.inference_mode():
        diff = (calls["ours"]().logits - calls["peft"]().logits).abs().max().item()
        assert diff < 1e-4, f"ours and PEFT disagree by {diff}"
        for fn in calls.values():
            fn()  # warm-up
        times: dict[str, list[float]] = {k: [] for k in calls}
        order = list(calls)
        for i in range(args.rounds):
            for key in order[i % 3 :] + order[: i % 3]:
                timed(calls[key], times[key])
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "adapters": n,
        "rows": args.rows,
        "seq": seq,
        "median_s": med,
        "ours_over_base": med["ours"] / med["base"],
        "ours_over_peft": med["ours"] / med["peft"],
        "peft_over_base": med["peft"] / med["base"],
        "max_abs_diff_vs_peft": diff,
    }


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _commit() -> str:
    run = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    return run.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--seq", type=int, nargs="+", default=[16, 1])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    base = base_model(args)
    results = []
    for n in args.adapters:
        for seq in args.seq:
            row = measure(args, base, n, seq)
            results.append(row)
            print(
                f"{n:3d} adapters, {args.rows} rows x {seq:3d} tokens: base {row['median_s']['base'] * 1e3:7.1f} ms  "
                f"ours {row['median_s']['ours'] * 1e3:7.1f} ms  PEFT {row['median_s']['peft'] * 1e3:7.1f} ms  "
                f"ours/base {row['ours_over_base']:.2f}  ours/PEFT {row['ours_over_peft']:.2f}",
                flush=True,
            )
    record = {
        "date": date.today().isoformat(),
        "machine": f"{_cpu_model()}, {os.cpu_count()} cores, {args.threads} torch threads",
        "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]},
        "commit": _commit(),
        "versions": {"torch": torch.__version__, "peft": peft.__version__, "lorakit": lorakit.__version__},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": results,
    }
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
