"""CPU: a DoRA training step against a plain LoRA step of lorakit, same seeded Llama-shaped model, one run.

Issue 11's target is DoRA step / LoRA step <= 1.15x. Model: 2 decoder layers, hidden 512, MLP 2048, 8/4 heads,
vocab 4000; r=16, alpha=32 on q k v o gate up down, no dropout, AdamW. --dtype bf16 puts the base in bf16 and
runs the step under bf16 autocast with fp32 factors (the GPU benchmark's setting); fp32 (default) is fp32 throughout.
One torch thread; the two sides alternate step by step (ABAB...), so drift and noise fall on both alike; the time is
the median over the timed steps of the process's CPU time (time.process_time), which a machine shared with other
work disturbs far less than wall time (one thread: CPU time is the step's time when it is not waiting for a core).

Run: python benchmarks/dora_step_cpu.py [--dtype bf16] [--steps 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import date

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(use_dora: bool, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit import LoraConfig, get_lora_model

    config = LlamaConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=4000, attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, use_dora=use_dora)
    return get_lora_model(model, lora).train()


def stepper(model: torch.nn.Module, ids: torch.Tensor, autocast: bool):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        start = time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.process_time() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    ids = torch.randint(0, 4000, (1, args.seq), generator=torch.Generator().manual_seed(1))
    steps = {name: stepper(build(name == "dora", dtype), ids, dtype == torch.bfloat16) for name in ("lora", "dora")}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.warmup + args.steps):
        for name, step in steps.items():
            elapsed = step()
            if i >= args.warmup:
                times[name].append(elapsed)
    medians = {name: round(1000 * statistics.median(t), 2) for name, t in times.items()}
    ratio = round(medians["dora"] / medians["lora"], 3)
    lora, dora = medians["lora"], medians["dora"]
    print(f"CPU 1 thread (CPU time), {args.dtype}, 1x{args.seq}: LoRA {lora} ms, DoRA {dora} ms, {ratio}x")
    if args.json:
        result = {"date": str(date.today()), "torch": torch.__version__, "args": vars(args), "median_ms": medians,
                  "dora_over_lora": ratio}  # fmt: skip
        with open(args.json, "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
