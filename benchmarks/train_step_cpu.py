"""CPU training step: lorakit vs PEFT on a small Llama-shaped model (seeded random weights), in one run.

Both sides get the same base weights, the same LoRA settings (r, alpha, target_modules="all-linear", no dropout),
fp32 throughout, AdamW on the trainable parameters and the causal-LM loss of transformers' LlamaForCausalLM.

  time    median wall time of one step (forward + backward + AdamW step + zero_grad) after warm-up; the two
          sides alternate step by step in ABBA order, so drift and noise fall on both alike
  memory  each side in a fresh subprocess: the peak of live tensor bytes over training steps (torch.profiler's
          allocator events), and the peak RSS above the RSS before those steps; both count the activations
          kept for backward, the gradients and AdamW's state

Prints a table with the ratios ours / PEFT (target: <= 1.0 for both), the spread of the step-by-step time ratio
and how much CPU other processes took meanwhile (over 5%: the timings are not sound); --json PATH also writes it
all as JSON. --profile N prints the aten ops of N steps per side, side by side: where a difference in time comes from.

Run: python benchmarks/train_step_cpu.py [--quick] [--profile 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import gc
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

SIDES = ("ours", "peft")
# glibc's mallopt parameter: blocks at least this big get their own mapping, unmapped when freed. Fixed, it
# also stops glibc raising the threshold as it sees frees, which makes RSS depend on allocation history.
_M_MMAP_THRESHOLD = -3


@dataclass
class Trainer:
    """One side's model, optimizer and fixed batch; step() is the unit that is timed."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    input_ids: torch.Tensor

    def step(self) -> float:
        loss = self.model(input_ids=self.input_ids, labels=self.input_ids).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


# -- model and the two sides ---------------------------------------------------------------------------
def build_base(args: argparse.Namespace) -> nn.Module:
    """A Llama-shaped LlamaForCausalLM with seeded random fp32 weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 2048),
        tie_word_embeddings=False,
        use_cache=False,  # training: no KV cache is built during forward
        attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config).float()


def adapt(side: str, model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """The same LoRA settings through lorakit's or PEFT's public API; A is drawn from the same seed."""
    settings = {
        "r": args.rank,
        "lora_alpha": args.alpha,
        "lora_dropout": 0.0,
        "target_modules": "all-linear",
        "task_type": "CAUSAL_LM",
    }
    torch.manual_seed(args.seed + 1)
    if side == "peft":
        import peft

        return peft.get_peft_model(model, peft.LoraConfig(**settings))
    from lorakit import LoraConfig, get_lora_model

    return get_lora_model(model, LoraConfig(**settings))


def make_trainer(side: str, base: nn.Module, args: argparse.Namespace) -> Trainer:
    model = adapt(side, base, args).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(args.seed + 2)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)
    return Trainer(model, optimizer, input_ids)


# -- time: both sides in this process, alternating --------------------------------------------------------
def build_trainers(args: argparse.Namespace) -> dict[str, Trainer]:
    """Both sides on copies of one seeded base model, in this process."""
    base = build_base(args)
    return {side: make_trainer(side, copy.deepcopy(base), args) for side in SIDES}


def measure_time(trainers: dict[str, Trainer], args: argparse.Namespace) -> tuple[dict[str, dict], float]:
    """Median step time per side, and the background load while timing.

    Rounds run ours, PEFT then PEFT, ours (ABBA), so drift and other processes' load fall on both alike.
    """
    first_loss = {side: trainers[side].step() for side in SIDES}
    for _ in range(args.warmup - 1):
        for side in SIDES:
            trainers[side].step()
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    with BackgroundLoad() as load:
        for i in range(args.steps):
            for side in SIDES if i % 2 == 0 else SIDES[::-1]:
                times[side].append(_timed(trainers[side].step))
    timing = {
        side: {
            "median_ms": 1000 * statistics.median(times[side]),
            "times_ms": [1000 * t for t in times[side]],
            "first_loss": first_loss[side],
            "trainable": trainers[side].trainable(),
        }
        for side in SIDES
    }
    return timing, load.share


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class BackgroundLoad:
    """The share of all CPUs' time that other processes used while the block ran (Linux /proc/stat)."""

    share = 0.0

    def __enter__(self) -> BackgroundLoad:
        self._start, self._wall = _cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        (busy, ours), (busy0, ours0) = _cpu_seconds(), self._start
        available = (time.perf_counter() - self._wall) * (os.cpu_count() or 1)
        self.share = max(0.0, (busy - busy0) - (ours - ours0)) / available


def _cpu_seconds() -> tuple[float, float]:
    """(busy seconds of all CPUs, CPU seconds of this process) since boot / start."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    times = os.times()
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), times.user + times.system


# -- where the time goes: aten ops per step, side by side ---------------------------------------------------
def compare_ops(trainers: dict[str, Trainer], steps: int, top: int = 12) -> None:
    """Prints calls and self CPU time per step of the costliest ops, then every op whose call count differs.

    One step at a time, the sides alternating as in measure_time, so background load falls on both alike.
    """
    totals: dict[str, dict[str, tuple[float, float]]] = {side: {} for side in SIDES}
    for i in range(steps):
        for side in SIDES if i % 2 == 0 else SIDES[::-1]:
            for op, (calls, micros) in _op_stats(trainers[side]).items():
                before = totals[side].get(op, (0.0, 0.0))
                totals[side][op] = (before[0] + calls, before[1] + micros)
    stats = {side: {op: (n / steps, us / steps / 1000) for op, (n, us) in totals[side].items()} for side in SIDES}
    ops = sorted(set(stats["ours"]) | set(stats["peft"]), key=lambda op: -_op_cost(stats, op))
    differing = [op for op in ops if _calls(stats, "ours", op) != _calls(stats, "peft", op)]
    print(f"torch.profiler, {steps} steps per side; per step:")
    print(f"{'op':<52}{'calls ours':>11}{'calls PEFT':>11}{'self ms ours':>13}{'self ms PEFT':>13}")
    for op in ops[:top] + [op for op in differing if op not in ops[:top]]:
        ours, theirs = stats["ours"].get(op, (0.0, 0.0)), stats["peft"].get(op, (0.0, 0.0))
        print(f"{op[:51]:<52}{ours[0]:>11.0f}{theirs[0]:>11.0f}{ours[1]:>13.2f}{theirs[1]:>13.2f}")
    total = {side: sum(ms for _, ms in stats[side].values()) for side in SIDES}
    print(f"{'all ops':<74}{total['ours']:>13.2f}{total['peft']:>13.2f}")
    print(f"ops whose call counts differ: {differing or 'none'}")


def _op_stats(trainer: Trainer) -> dict[str, tuple[float, float]]:
    """op name -> (calls, self CPU microseconds) over one step."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.step()
    return {e.key: (e.count, e.self_cpu_time_total) for e in prof.key_averages()}


def _calls(stats: dict[str, dict[str, tuple[float, float]]], side: str, op: str) -> float:
    return stats[side].get(op, (0.0, 0.0))[0]


def _op_cost(stats: dict[str, dict[str, tuple[float, float]]], op: str) -> float:
    return max(stats[side].get(op, (0.0, 0.0))[1] for side in SIDES)


# -- memory: each side in a fresh process -------------------------------------------------------------------
def measure_memory(side: str, args: argparse.Namespace) -> dict[str, float]:
    """Runs memory_worker in a new interpreter, so no allocator state or model of the other side is there."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(memory_worker, side, vars(args)).result()


def memory_worker(side: str, arg_dict: dict) -> dict[str, float]:
    """Peak RSS and peak live tensor bytes over `memory_steps` training steps, above the state before them.

    Before: model built and adapted, optimizer made (no state yet), one forward + backward done so one-time
    allocations (thread pools, kernel caches) are out of the count, gradients dropped, free heap returned to
    the OS. So the peak holds what a step needs: activations kept for backward, gradients, AdamW state.
    """
    args = argparse.Namespace(**arg_dict)
    _quiet()
    torch.set_num_threads(args.threads)
    _libc().mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    trainer = make_trainer(side, build_base(args), args)
    rss_peak_mib = _rss_peak_above_start(trainer, args.memory_steps)
    trainer.optimizer = torch.optim.AdamW(trainer.optimizer.param_groups[0]["params"], lr=1e-4)  # state anew
    return {"rss_peak_mib": rss_peak_mib, "tensor_peak_mib": _tensor_peak(trainer, args.memory_steps)}


def _rss_peak_above_start(trainer: Trainer, steps: int) -> float:
    _warm_up_without_state(trainer)
    start_kib = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets this process's peak RSS (VmHWM) to its current RSS
    for _ in range(steps):
        trainer.step()
    return (_proc_status_kib("VmHWM") - start_kib) / 1024


def _tensor_peak(trainer: Trainer, steps: int) -> float:
    """The highest sum of bytes held by tensors allocated while profiling (the CPU allocator's own count)."""
    _warm_up_without_state(trainer)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(steps):
            trainer.step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def _warm_up_without_state(trainer: Trainer) -> None:
    trainer.model(input_ids=trainer.input_ids, labels=trainer.input_ids).loss.backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    _libc().malloc_trim(0)  # freed activations go back to the OS, so they are not in the starting RSS


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"))


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status (Linux only)")


def measure_memory_rounds(args: argparse.Namespace) -> dict[str, dict]:
    """Median over rounds per side; the order alternates (ours, PEFT, PEFT, ours, ...)."""
    runs: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
    for i in range(args.memory_rounds):
        for side in SIDES if i % 2 == 0 else SIDES[::-1]:
            runs[side].append(measure_memory(side, args))
    return {
        side: {key: statistics.median(r[key] for r in runs[side]) for key in runs[side][0]} | {"runs": runs[side]}
        for side in SIDES
    }


# -- report ---------------------------------------------------------------------------------------------
def summarize(timing: dict[str, dict], memory: dict[str, dict], background: float) -> dict:
    rows = {side: {**timing[side], **memory[side]} for side in SIDES}
    ours, theirs = rows["ours"], rows["peft"]
    ratios = {key: ours[key] / theirs[key] for key in ("median_ms", "tensor_peak_mib", "rss_peak_mib")}
    # each timed step of ours next to the PEFT step of the same round: the spread shows the noise
    paired = [a / b for a, b in zip(ours["times_ms"], theirs["times_ms"], strict=True)]
    ratios["paired_step_quartiles"] = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
    return {"sides": rows, "ratios": ratios, "background_cpu_share": background}


def print_table(result: dict, args: argparse.Namespace) -> None:
    sides, ratios = result["sides"], result["ratios"]
    print(
        f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}; "
        f"Llama {args.layers}L h{args.hidden} i{args.intermediate} v{args.vocab}, batch {args.batch}x{args.seq}, "
        f"r{args.rank} alpha{args.alpha}, {args.steps} steps"
    )
    print(f"{'side':<12}{'step ms':>10}{'tensor peak MiB':>17}{'RSS peak MiB':>14}{'trainable':>12}")
    for side in SIDES:
        r = sides[side]
        print(
            f"{side:<12}{r['median_ms']:>10.1f}{r['tensor_peak_mib']:>17.1f}"
            f"{r['rss_peak_mib']:>14.1f}{r['trainable']:>12,}"
        )
    print(
        f"{'ours/PEFT':<12}{ratios['median_ms']:>10.3f}{ratios['tensor_peak_mib']:>17.3f}{ratios['rss_peak_mib']:>14.3f}"
    )
    q1, q2, q3 = ratios["paired_step_quartiles"]
    print(f"step by step, ours/PEFT of the same round: median {q2:.3f}, quartiles {q1:.3f} .. {q3:.3f}")
    share = result["background_cpu_share"]
    warning = ": too busy for sound timings, run again on a quiet machine" if share > 0.05 else ""
    print(f"other processes used {100 * share:.1f}% of the CPUs while timing{warning}")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def check_same_work(timing: dict[str, dict]) -> None:
    """Both sides train the same number of parameters and start at the same loss (B = 0: the base model)."""
    ours, theirs = timing["ours"], timing["peft"]
    if ours["trainable"] != theirs["trainable"]:
        raise SystemExit(f"trainable parameters differ: ours {ours['trainable']:,}, PEFT {theirs['trainable']:,}")
    if abs(ours["first_loss"] - theirs["first_loss"]) > 1e-4:
        raise SystemExit(f"first losses differ: ours {ours['first_loss']}, PEFT {theirs['first_loss']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--layers", type=int, default=4)
    add("--hidden", type=int, default=256)
    add("--intermediate", type=int, default=688, help="Llama-7B's ratio: 256 * 11008 / 4096")
    add("--heads", type=int, default=4)
    add("--kv-heads", type=int, default=2)
    add("--vocab", type=int, default=32000)
    add("--batch", type=int, default=4)
    add("--seq", type=int, default=256)
    add("--rank", type=int, default=16)
    add("--alpha", type=float, default=16)
    add("--steps", type=int, default=50, help="timed steps per side")
    add("--warmup", type=int, default=5, help="untimed steps per side first (at least 1)")
    add("--memory-rounds", type=int, default=2, help="fresh subprocesses per side for memory")
    add("--memory-steps", type=int, default=3, help="training steps inside each memory measurement")
    add("--threads", type=int, default=2, help="torch.set_num_threads")
    add("--seed", type=int, default=0)
    add("--profile", type=int, default=0, metavar="N", help="also compare the aten ops of N steps per side")
    add("--quick", action="store_true", help="a smoke run of a few seconds: short sequences, few steps")
    add("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.seq, args.steps, args.warmup, args.memory_rounds, args.memory_steps = 32, 4, 1, 1, 2
    return args


def _quiet() -> None:
    """transformers' deprecation notices, raised from inside PEFT, say nothing about this benchmark."""
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _quiet()
    torch.set_num_threads(args.threads)
    trainers = build_trainers(args)
    timing, background = measure_time(trainers, args)
    check_same_work(timing)
    if args.profile:
        compare_ops(trainers, args.profile)
    del trainers
    result = summarize(timing, measure_memory_rounds(args), background)
    print_table(result, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "cpu": cpu_name(), "torch": torch.__version__, **result}, f, indent=2)


if __name__ == "__main__":
    main()
