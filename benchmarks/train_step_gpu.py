"""GPU training step: lorakit vs PEFT on a Llama-3.2-1B-shaped model (random weights from config), in one run.

Modes (each on a fresh model, same seed, bf16 base; "-drop" = lora_dropout 0.1, else 0):
  hf-frozen            the base model, frozen, forward + backward to the input embeddings (the eager floor)
  hf-frozen-compiled   the same under torch.compile (the compiled floor)
  peft-default         PEFT as a user gets it: fp32 adapters (autocast_adapter_dtype), eager
  peft-compiled        PEFT with bf16 adapters + torch.compile (PEFT-best)
  ours-default         lorakit with no flags: fp32 factors, eager (the fused op on CUDA)
  ours-eager           lorakit with bf16 adapters, eager
  ours-compiled        lorakit with bf16 adapters + torch.compile (our best)
  ours-compiled-fp32   lorakit with fp32 factors + torch.compile
  ours-compiled-drop   our best with dropout 0.1
  ours-reference-...   any ours-* mode with LORAKIT_KERNELS=0 (the pure-torch reference ops)
layer0_grad_norm in the results is the first layer's gradient norm: nonzero proves the backward reaches it.
Reports the median step time (forward, backward, AdamW step), peak GPU memory, and ratios against PEFT-best
(and, for *-default, against peft-default). --profile MODE prints that mode's top CUDA ops.

Run (on a CUDA machine): python benchmarks/train_step_gpu.py [--quick] [--modes a,b] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import torch


def build_model(args: argparse.Namespace, device: str = "cuda"):
    """The Llama-shaped model of `args`, seeded random bf16 weights (device "cpu": other scripts' smoke runs)."""
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
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model


def adapt(mode: str, model, args: argparse.Namespace):
    if mode.startswith("hf-frozen"):
        model.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)  # gradients flow through every layer
        return model
    dropout = 0.1 if mode.endswith("-drop") else 0.0
    fp32 = "default" in mode or "fp32" in mode
    if mode.startswith("peft"):
        import peft

        config = peft.LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, lora_dropout=dropout, target_modules="all-linear"
        )
        return peft.get_peft_model(model, config, autocast_adapter_dtype=fp32)
    from lorakit import LoraConfig, get_lora_model

    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=dropout, target_modules="all-linear")
    return get_lora_model(model, config, adapter_dtype=None if fp32 else torch.bfloat16)


def measure(mode: str, args: argparse.Namespace) -> dict[str, float]:
    os.environ["LORAKIT_KERNELS"] = "0" if "-reference" in mode else "1"
    model = adapt(mode, build_model(args), args).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    step_fn = torch.compile(model) if "compiled" in mode else model
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
    result["layer0_grad_norm"] = _first_layer_grad_norm(model, step_fn, ids)
    if mode in (args.profile or "").split(","):
        _profile(step)
    return result


def _first_layer_grad_norm(model, step_fn, ids) -> float:
    """The gradient norm of the first decoder layer's trainable tensors after one more backward: 0 would mean
    the backward stopped before reaching it (a broken input gradient), which no step time may hide."""
    step_fn(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if ".layers.0." in n and p.grad is not None]
    if not grads:  # the frozen base: its embeddings carry the gradient instead
        grads = [model.get_input_embeddings().weight.grad]
    norm = torch.stack([g.float().norm() for g in grads]).norm().item()
    model.zero_grad(set_to_none=True)
    return norm


def _profile(step) -> None:
    """The top CUDA ops of three steps: where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))


def measure_fresh(mode: str, args: argparse.Namespace) -> dict[str, float]:
    """One mode, then everything it allocated or compiled is released before the next."""
    result = measure(mode, args)
    print(f"{mode}: {result}", flush=True)
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
    parser.add_argument(
        "--modes",
        default="hf-frozen,hf-frozen-compiled,peft-default,ours-default,peft-compiled,ours-compiled,ours-compiled-drop",
    )
    parser.add_argument("--profile", help="print the top CUDA ops of these modes (comma-separated)")
    parser.add_argument("--quick", action="store_true", help="2 layers, short sequences: a smoke run")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.seq, args.steps, args.warmup = 2, 256, 5, 2
    torch.backends.cuda.matmul.allow_tf32 = True

    results = {mode: measure_fresh(mode, args) for mode in args.modes.split(",")}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}x{args.seq}, r{args.rank}")
    print(f"{'mode':<26}{'step ms':>9}{'peak GiB':>10}{'PEFT-best/ours':>15}{'PEFT-default/ours':>18}")
    for mode, r in results.items():
        print(f"{mode:<26}{r['median_ms']:>9.1f}{r['peak_gib']:>10.2f}", end="")
        for baseline, width in (("peft-compiled", 15), ("peft-default", 18)):
            ms = results.get(baseline, {}).get("median_ms")
            print(f"{ms / r['median_ms']:>{width}.3f}" if ms else f"{'-':>{width}}", end="")
        print()
    if args.json:
        import peft
        import transformers
        import triton

        versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                    "triton": triton.__version__}  # fmt: skip
        with open(args.json, "w") as f:
            record = {"device": torch.cuda.get_device_name(), "versions": versions, "args": vars(args)}
            json.dump({**record, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
