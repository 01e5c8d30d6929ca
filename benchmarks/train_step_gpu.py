"""GPU training step: lorakit vs PEFT on a Llama-3.2-1B-shaped model (random weights from config), in one run.

Modes (each on a fresh model, same seed, bf16 base):
  hf-frozen       the base model, frozen, forward + backward to the input embeddings (the floor)
  peft-compiled   PEFT LoRA with bf16 adapters + torch.compile (the strongest PEFT setting)
  ours-eager      lorakit with bf16 adapters, eager
  ours-compiled   lorakit with bf16 adapters + torch.compile
Reports the median step time (forward, backward, AdamW step) and peak GPU memory, and ratios against PEFT.

Run (on a CUDA machine): python benchmarks/train_step_gpu.py [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch


def build_model(args: argparse.Namespace):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=args.vocab,
        tie_word_embeddings=True,
        max_position_embeddings=max(args.seq, 2048),
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model


def adapt(mode: str, model, args: argparse.Namespace):
    if mode == "hf-frozen":
        model.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)  # gradients flow through every layer
        return model
    if mode.startswith("peft"):
        import peft

        config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear")
        return peft.get_peft_model(model, config, autocast_adapter_dtype=False)
    from lorakit import LoraConfig, get_lora_model

    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear")
    return get_lora_model(model, config, adapter_dtype=torch.bfloat16)


def measure(mode: str, args: argparse.Namespace) -> dict[str, float]:
    model = adapt(mode, build_model(args), args).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    step_fn = torch.compile(model) if mode.endswith("compiled") else model
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device="cuda", generator=None)

    def step() -> None:
        loss = step_fn(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    result = {
        "median_ms": 1000 * statistics.median(times),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "trainable": sum(p.numel() for p in params),
    }
    return result


def measure_fresh(mode: str, args: argparse.Namespace) -> dict[str, float]:
    """One mode, then everything it allocated or compiled is released before the next."""
    result = measure(mode, args)
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--modes", default="hf-frozen,peft-compiled,ours-eager,ours-compiled")
    parser.add_argument("--quick", action="store_true", help="2 layers, short sequences: a smoke run")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.seq, args.steps, args.warmup = 2, 256, 5, 2
    torch.backends.cuda.matmul.allow_tf32 = True

    results = {mode: measure_fresh(mode, args) for mode in args.modes.split(",")}
    peft_ms = results.get("peft-compiled", {}).get("median_ms")
    peft_gib = results.get("peft-compiled", {}).get("peak_gib")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}x{args.seq}, r{args.rank}")
    print(f"{'mode':<16}{'step ms':>10}{'peak GiB':>10}{'time/PEFT':>11}{'mem/PEFT':>10}")
    for mode, r in results.items():
        t = f"{r['median_ms'] / peft_ms:.3f}" if peft_ms else "-"
        m = f"{r['peak_gib'] / peft_gib:.3f}" if peft_gib else "-"
        print(f"{mode:<16}{r['median_ms']:>10.1f}{r['peak_gib']:>10.2f}{t:>11}{m:>10}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
