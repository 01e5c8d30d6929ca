"""One causal-LM training step with the full logits (regular) vs the chunked head + loss (fused), on CPU.

Model: transformers' LlamaForCausalLM from a LlamaConfig with seeded random fp32 weights (4 layers, hidden 256,
intermediate 688, 4 heads, 2 KV heads, vocabulary `--vocab`, untied head), LoRA r16 on q_proj, v_proj and lm_head
(so the head's own LoRA trains too), `--batch` x `--seq` random token ids, AdamW. A step is lorakit train's:
`tasks.score` (regular: the model's logits and fp32 cross-entropy; fused: `tasks.FusedHead`), backward, optimizer
step. Each mode runs in its own fresh interpreter (spawn), `--rounds` times, alternating; reported are the median
step time (after one warm-up step), the process's RSS before the steps and its peak RSS during them (VmHWM, reset
to the current RSS just before, with glibc's mmap threshold fixed at 128 KiB so RSS follows live memory), and the
final loss of each mode (the same adapters on the same data: equal up to fp32).

Run: python benchmarks/head_loss_cpu.py [--vocab 32000] [--batch 4] [--seq 512] [--steps 3] [--rounds 2]
         [--json benchmarks/results/head_loss_cpu.json]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch

MODES = ("regular", "fused")
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit import LoraConfig, get_lora_model

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=args.vocab, max_position_embeddings=args.seq,
                         tie_word_embeddings=False)  # fmt: skip
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj", "lm_head"])
    return get_lora_model(LlamaForCausalLM(config), lora)


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    """One mode in this (fresh) process: warm-up step, then `--steps` timed steps."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    torch.set_num_threads(1)
    from lorakit.head_loss import chunk_rows
    from lorakit.train import tasks

    model = _model(args)
    model.train()
    rows = args.chunk_rows or chunk_rows(args.vocab)
    fused = tasks.FusedHead(model.model.model, model.model.get_output_embeddings(), rows) if mode == "fused" else None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def step() -> float:
        loss = tasks.score("causal-lm", model, batch, fused).mean_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step()
    rss_before = _status_kib("VmRSS") / 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS (VmHWM) := current RSS
    times, loss = [], 0.0
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    peak = _status_kib("VmHWM") / 1024
    return {"step_seconds": statistics.median(times), "rss_before_mib": rss_before, "rss_peak_mib": peak,
            "peak_above_before_mib": peak - rss_before, "final_loss": loss}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--chunk-rows", type=int, default=0, help="rows per chunk (0: lorakit train's choice)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                runs[mode].append(pool.submit(run_mode, mode, args).result())
    summary = {
        mode: {key: statistics.median(r[key] for r in rs) for key in rs[0] if key != "final_loss"}
        | {"final_loss": rs[0]["final_loss"]}
        for mode, rs in runs.items()
    }
    logits_mib = args.batch * (args.seq - 1) * args.vocab * 4 / 2**20
    for mode, s in summary.items():
        print(
            f"{mode:8s} step {s['step_seconds']:.3f} s  RSS before {s['rss_before_mib']:.0f} MiB  peak "
            f"{s['rss_peak_mib']:.0f} MiB (+{s['peak_above_before_mib']:.0f})  final loss {s['final_loss']:.6f}"
        )
    print(f"fp32 logits of one batch: {logits_mib:.0f} MiB")
    if args.json:
        date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        machine = platform.processor() or platform.machine()
        out = {"args": vars(args), "torch": torch.__version__, "machine": machine, "date": date, "runs": runs,
               "summary": summary}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
