"""Parallel training of 4 adapters over one base vs the same 4 trained one after another (lorakit, then PEFT).

Model: transformers' LlamaForCausalLM from a LlamaConfig with seeded random fp32 weights (the CPU step benchmark's
shape: 4 layers, hidden 256, intermediate 688, 4 heads, 2 KV heads, vocabulary 32,000). Four jobs that differ in
rank, alpha, targets and learning rate (AdamW, no dropout), each with its own seeded batches of `--batch` x
`--seq` token ids (the causal-LM loss on them), `--steps` optimizer steps each.

  parallel        lorakit.multi.parallel.ParallelTrainer: each step runs the base once over the 4 jobs' rows
  ours-serial     lorakit, one job after another on the same base: add the adapter, train it, delete it
  peft-serial     PEFT, one job after another: get_peft_model, train, unload

Each mode runs in its own fresh interpreter (spawn), `--rounds` times, alternating; reported are the median wall
and CPU time of the whole training (all 4 jobs; CPU time is the sounder measure on a busy machine, which the
share of the CPUs other processes took says), the process's RSS once the base is built, and its peak RSS during the
training (VmHWM, reset to the current RSS just before, with glibc's mmap threshold fixed at 128 KiB so RSS
follows live memory). All modes hold one copy of the base; 4 separate processes would hold 4. The final losses
of parallel and ours-serial are compared (they train the same adapters on the same data: equal up to fp32).

Run: python benchmarks/parallel_train.py [--steps 10] [--rounds 2] [--json benchmarks/results/parallel_train.json]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import platform
import statistics
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch
from torch import nn

MODES = ("parallel", "ours-serial", "peft-serial")
JOBS = [  # name, rank, alpha, targets, lr
    ("r4-attn", 4, 8, ["q_proj", "v_proj"], 1e-3),
    ("r8-attn", 8, 16, ["q_proj", "k_proj", "v_proj", "o_proj"], 5e-4),
    ("r16-mlp", 16, 16, ["gate_proj", "up_proj", "down_proj"], 1e-3),
    ("r32-all", 32, 64, "all-linear", 2e-4),
]
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def build_base(args: argparse.Namespace) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=32000, max_position_embeddings=2048,
                         tie_word_embeddings=False, use_cache=False)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def job_batches(index: int, args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + index)
    out = []
    for _ in range(args.steps):
        ids = torch.randint(0, 32000, (args.batch, args.seq), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def causal_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' causal-LM loss: predict token t+1 from tokens <= t."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )


# -- the three modes -------------------------------------------------------------------------------------------------
def run_parallel(base: nn.Module, args: argparse.Namespace) -> dict[str, float]:
    from lorakit import LoraConfig
    from lorakit.multi.parallel import ParallelJob, ParallelTrainer

    jobs = [
        ParallelJob(name, LoraConfig(r=r, lora_alpha=a, target_modules=t, task_type="CAUSAL_LM"),
                    job_batches(i, args), steps=args.steps, optimizer=lambda p, lr=lr: torch.optim.AdamW(p, lr=lr),
                    seed=i)
        for i, (name, r, a, t, lr) in enumerate(JOBS)
    ]  # fmt: skip
    losses = ParallelTrainer(base, jobs, loss_fn=causal_loss).run()
    return {name: values[-1] for name, values in losses.items()}


def run_ours_serial(base: nn.Module, args: argparse.Namespace) -> dict[str, float]:
    from lorakit import LoraConfig, LoraModel
    from lorakit.multi.parallel import add_seeded_adapter

    model, final = LoraModel(base), {}
    for i, (name, r, a, t, lr) in enumerate(JOBS):
        add_seeded_adapter(model, name, LoraConfig(r=r, lora_alpha=a, target_modules=t, task_type="CAUSAL_LM"), i)
        model.set_adapter(name)
        final[name] = _train(model, job_batches(i, args), lr)
        model.delete_adapter(name)
    return final


def run_peft_serial(base: nn.Module, args: argparse.Namespace) -> dict[str, float]:
    import peft

    final = {}
    for i, (name, r, a, t, lr) in enumerate(JOBS):
        config = peft.LoraConfig(r=r, lora_alpha=a, target_modules=t, task_type="CAUSAL_LM")
        torch.manual_seed(i)
        model = peft.get_peft_model(base, config)
        final[name] = _train(model, job_batches(i, args), lr)
        base = model.unload()
    return final


def _train(model: nn.Module, batches: list[dict[str, torch.Tensor]], lr: float) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    for batch in batches:
        loss = causal_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.item()


_RUNS = {"parallel": run_parallel, "ours-serial": run_ours_serial, "peft-serial": run_peft_serial}


# -- one mode in a fresh process -------------------------------------------------------------------------------------
def worker(mode: str, arg_dict: dict) -> dict:
    """Builds the base, then trains the 4 jobs `mode`'s way: wall and CPU seconds, RSS before, peak RSS during."""
    args = argparse.Namespace(**arg_dict)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    torch.set_num_threads(args.threads)
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    import peft  # noqa: F401 - imports are not part of the timed training

    import lorakit.multi.parallel  # noqa: F401

    base = build_base(args)
    base_mib = sum(p.numel() * p.element_size() for p in base.parameters()) / 2**20
    gc.collect()
    libc.malloc_trim(0)
    rss_before = _status_kib("VmRSS") / 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS (VmHWM) := current RSS
    wall, cpu = time.perf_counter(), time.process_time()
    final = _RUNS[mode](base, args)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = _status_kib("VmHWM") / 1024
    return {"seconds": wall, "cpu_seconds": cpu, "base_mib": base_mib, "rss_before_mib": rss_before,
            "rss_peak_mib": peak, "final_loss": final}  # fmt: skip


def _cpu_seconds() -> tuple[float, float, float]:
    """(busy seconds of all CPUs, CPU seconds of this process and its finished workers, wall clock)."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    t = os.times()
    ours = t.user + t.system + t.children_user + t.children_system
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), ours, time.perf_counter()


def _others_share(start: tuple[float, float, float]) -> float:
    """The share of all CPUs' time that processes other than this one and its worker used since `start`."""
    (busy, ours, now), (busy0, ours0, then) = _cpu_seconds(), start
    return max(0.0, (busy - busy0) - (ours - ours0)) / ((now - then) * (os.cpu_count() or 1))


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status (Linux only)")


def measure(args: argparse.Namespace) -> dict[str, dict]:
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for i in range(args.rounds):
        for mode in MODES if i % 2 == 0 else MODES[::-1]:
            start = _cpu_seconds()
            with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
                runs[mode].append(pool.submit(worker, mode, vars(args)).result())
            runs[mode][-1]["background_cpu_share"] = _others_share(start)
            r = runs[mode][-1]
            print(f"  round {i + 1} {mode}: {r['seconds']:.1f}s wall, {r['cpu_seconds']:.1f}s CPU, other processes "
                  f"{100 * r['background_cpu_share']:.0f}% of the CPUs", flush=True)  # fmt: skip
    keys = ("seconds", "cpu_seconds", "base_mib", "rss_before_mib", "rss_peak_mib", "background_cpu_share")
    return {
        mode: {k: statistics.median(r[k] for r in runs[mode]) for k in keys} | {"runs": runs[mode]} for mode in MODES
    }


def report(result: dict[str, dict], args: argparse.Namespace) -> None:
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}; "
          f"4 jobs x {args.steps} steps of {args.batch}x{args.seq} tokens, Llama 4L h256 v32000, median of "
          f"{args.rounds}")  # fmt: skip
    print(f"{'mode':<13}{'wall s':>8}{'CPU s':>8}{'CPU vs parallel':>16}{'RSS before MiB':>16}{'peak RSS MiB':>14}"
          f"{'peak-before':>13}{'others CPU':>12}")  # fmt: skip
    for mode in MODES:
        r = result[mode]
        ratio, rise = r["cpu_seconds"] / result["parallel"]["cpu_seconds"], r["rss_peak_mib"] - r["rss_before_mib"]
        print(f"{mode:<13}{r['seconds']:>8.1f}{r['cpu_seconds']:>8.1f}{ratio:>16.2f}{r['rss_before_mib']:>16.0f}"
              f"{r['rss_peak_mib']:>14.0f}{rise:>13.0f}{100 * r['background_cpu_share']:>11.0f}%")  # fmt: skip
    ours = result["parallel"]["runs"][0]["final_loss"]
    serial = result["ours-serial"]["runs"][0]["final_loss"]
    gap = max(abs(ours[k] - serial[k]) for k in ours)
    print(f"base weights {result['parallel']['base_mib']:.0f} MiB, held once in every mode (4 processes: 4x); "
          f"final losses parallel vs ours-serial differ by at most {gap:.1e}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: sound on a shared, busy machine)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    result = measure(args)
    report(result, args)
    if args.json:
        meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(), "torch": torch.__version__, "args": vars(args)}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "modes": result}, f, indent=2)


if __name__ == "__main__":
    main()
