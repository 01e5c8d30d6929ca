"""The LoRA family on GPU, lorakit vs PEFT: step time and peak memory of DoRA, VeRA, rsLoRA and QLoRA (and plain
LoRA as the reference row), each side on the same seeded model, one run.

Model: 4 decoder layers of Llama-3.2-1B's shape (hidden 2048, MLP 8192, 32/8 heads, vocab 32000), bf16 base,
SDPA. Both sides: r=16, alpha=32, every linear layer of the decoder (q k v o gate up down), adapters in each
library's default dtype (fp32), bf16 autocast, AdamW(lr=1e-4) over the trainable parameters, batch 2 x 1024.
QLoRA: the base's decoder linears in bitsandbytes' Linear4bit (NF4, double quantization), then each library's
LoRA on top (PEFT dispatches its bnb 4-bit layer; lorakit its linear4bit kind).
Each (variant, side) runs alone: warm-up steps, then the median of timed steps (forward, backward, optimizer
step, CUDA-synchronized) and the peak of torch.cuda.max_memory_allocated. The script stops if the two sides
train a different number of parameters or start from a different loss.

Run (CUDA): python benchmarks/variants_gpu.py [--json out.json]
Smoke run anywhere: python benchmarks/variants_gpu.py --quick   (tiny model; QLoRA only with CUDA + bitsandbytes)
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import time
from datetime import date

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {  # name: (LoraConfig / VeraConfig keyword arguments, 4-bit base)
    "lora": ({}, False),
    "rslora": ({"use_rslora": True}, False),
    "dora": ({"use_dora": True}, False),
    "vera": ({"vera": True}, False),
    "qlora": ({}, True),
}


def build(args: argparse.Namespace, quantized: bool) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.quick:
        config = LlamaConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=1000, attn_implementation="sdpa")  # fmt: skip
    else:
        config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=4, num_attention_heads=32,
                             num_key_value_heads=8, vocab_size=32000, attn_implementation="sdpa")  # fmt: skip
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    if quantized:
        from lorakit.quant import quantize_model

        quantize_model(model, skip=("lm_head",), backend="bitsandbytes")
    return model.to(args.device)


def adapt(side: str, model: torch.nn.Module, options: dict, rank: int) -> torch.nn.Module:
    options = dict(options)
    vera = options.pop("vera", False)
    if side == "peft":
        import peft

        if vera:
            return peft.get_peft_model(model, peft.VeraConfig(r=rank, target_modules=TARGETS))
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, **options)
        return peft.get_peft_model(model, config)
    from lorakit import LoraConfig, VeraConfig, get_lora_model

    if vera:
        return get_lora_model(model, VeraConfig(r=rank, target_modules=TARGETS))
    return get_lora_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, **options))


def measure(side: str, variant: str, args: argparse.Namespace) -> dict[str, float]:
    options, quantized = VARIANTS[variant]
    model = adapt(side, build(args, quantized), options, args.rank).train()
    result = run_steps(model, args)
    del model
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


def profile(side: str, variant: str, args: argparse.Namespace) -> None:
    options, quantized = VARIANTS[variant]
    model = adapt(side, build(args, quantized), options, args.rank).train()
    run_steps(model, argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 2}))
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if args.device == "cuda" else []
    )
    with torch.profiler.profile(activities=activities) as prof:
        run_steps(model, argparse.Namespace(**{**vars(args), "steps": 3, "warmup": 1}))
    key = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
    print(f"--- {side} {variant}\n" + prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))


def run_steps(model: torch.nn.Module, args: argparse.Namespace) -> dict[str, float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)).to(args.device)
    cuda = args.device == "cuda"

    def step() -> float:
        with torch.autocast(args.device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    first_loss = step()
    for _ in range(args.warmup - 1):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {
        "median_ms": round(1000 * statistics.median(times), 2),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "trainable": sum(p.numel() for p in params),
        "first_loss": first_loss,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="a tiny model and a few steps: a smoke run")
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", default=None, help="a variant: print both sides' top ops over 3 steps")
    args = parser.parse_args()
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        args.seq, args.steps, args.warmup = 64, 3, 2
    has_bnb = args.device == "cuda" and importlib.util.find_spec("bitsandbytes") is not None
    variants = [v for v in args.variants.split(",") if has_bnb or not VARIANTS[v][1]]

    import peft

    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    result = {"date": str(date.today()), "device": device, "torch": torch.__version__, "peft": peft.__version__,
              "args": {k: v for k, v in vars(args).items() if k != "json"}, "variants": {}}  # fmt: skip
    print(f"{device}, torch {torch.__version__}, peft {peft.__version__}, batch {args.batch}x{args.seq}, r{args.rank}")
    print(
        f"{'variant':8s} {'ours ms':>8s} {'PEFT ms':>8s} {'time':>6s} {'ours GiB':>9s} {'PEFT GiB':>9s} {'memory':>7s}"
    )
    for variant in variants:
        ours, theirs = measure("ours", variant, args), measure("peft", variant, args)
        if ours["trainable"] != theirs["trainable"]:
            raise SystemExit(f"{variant}: trainable {ours['trainable']:,} vs PEFT's {theirs['trainable']:,}")
        if abs(ours["first_loss"] - theirs["first_loss"]) > 1e-2 * abs(theirs["first_loss"]):
            raise SystemExit(f"{variant}: first loss {ours['first_loss']:.4f} vs PEFT's {theirs['first_loss']:.4f}")
        row = {"ours": ours, "peft": theirs, "time_ratio": round(ours["median_ms"] / theirs["median_ms"], 3)}
        if ours["peak_gib"] is not None:
            row["memory_ratio"] = round(ours["peak_gib"] / theirs["peak_gib"], 3)
        result["variants"][variant] = row
        memory = (
            f"{ours['peak_gib']:9.3f} {theirs['peak_gib']:9.3f} {row['memory_ratio']:7.3f}"
            if "memory_ratio" in row
            else ""
        )
        print(f"{variant:8s} {ours['median_ms']:8.1f} {theirs['median_ms']:8.1f} {row['time_ratio']:6.3f} {memory}")
    if args.profile:
        for side in ("ours", "peft"):
            profile(side, args.profile, args)
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
