"""GPU: 4 adapters trained in parallel over one base vs the same 4 trained one after another with PEFT-best.

Target (the GPU issue): 4 adapters trained in parallel, each batch 1 x 2048, >= 1.3x the aggregate tokens/s of the
4 trained one after another with PEFT-best (bf16 adapters + torch.compile), one copy of the base.

Model: train_step_gpu.build_model, the Llama-3.2-1B shape from config (16 layers, hidden 2048, intermediate 8192,
vocabulary 128,256, tied head), seeded random bf16 weights, SDPA attention, use_cache off (as `lorakit train`).
Four jobs, all alike: r16, lora_alpha 32, target_modules "all-linear", dropout 0, task CAUSAL_LM, AdamW lr 1e-4,
each its own seeded batches of 1 x --seq token ids (input_ids = labels, the causal-LM loss), factors in bf16 (the
base's dtype). Modes, each on a fresh model (memory freed and torch._dynamo reset in between):

  parallel           lorakit.multi.parallel.ParallelTrainer: every step runs the base once over the 4 jobs' rows
                     (4 x seq, adapter_names routing each row to its job's adapter), one backward, then each job's
                     own AdamW step. ParallelTrainer adds its adapters in fp32 (it has no adapter dtype option), so
                     the jobs' factors are cast to bf16 right after it is built, before any step or optimizer state.
                     Loss: shift by one, cross-entropy in fp32 over the vocabulary, per job (transformers' loss)
  parallel-compiled  the same with each decoder layer compiled in place as `lorakit train` does it
                     (lorakit.train.parallel.compile_blocks, mode "on": a compile error is recorded, not hidden)
  ours-serial        lorakit, one job after another on the same base: get_lora_model(adapter_dtype=bf16) for the
                     first, then delete_adapter / add_adapter; the LoraModel under torch.compile, transformers' loss
  peft-serial        PEFT-best, one job after another: get_peft_model(autocast_adapter_dtype=False) (bf16
                     adapters), torch.compile(model), train, model.unload() gives the base back for the next job
In both serial modes every job's adapter is named "default" (PEFT's name), so a later job's model has the structure
the compiled graph was made for and need not be compiled again (an adapter named per job recompiles lorakit's).

Time: perf_counter around each step with torch.cuda.synchronize before and after; --warmup untimed steps first
(for serial modes per job: a new adapter may recompile, so every job is warmed up; the first job's compile falls in
its warm-up, and each job's warm-up seconds are reported). Aggregate tokens/s = 4 * seq / (the median parallel
step), or 4 * seq / (sum over jobs of the job's median step) for a serial mode; the ratio is against
peft-serial. Peak memory is torch.cuda.max_memory_allocated over the timed steps (every mode holds one copy of the
base, whose bytes are printed). Sanity check: each job's first loss (before any optimizer step; B = 0, so it is the
base's loss on that job's first batch) must agree across modes, to 1e-2 in bf16 (1e-4 in fp32); the largest
difference is printed. The table's graphs/breaks are the graphs torch.compile made in the mode and its graph breaks;
a graph compiled during timed steps is flagged. --profile MODE prints the top 15 CUDA ops of 3 more steps of that
mode (serial: the last job's). A failing mode prints its error and the others still run; the JSON is rewritten
after every mode; --time-budget S skips the modes that might not end within S seconds.

Run (on a CUDA machine, a few minutes, mostly compiling):
    PYTHONPATH=.:benchmarks python benchmarks/parallel_train_gpu.py [--modes a,b] [--json PATH] [--profile parallel]
        [--time-budget 480]
CPU smoke run (tiny fp32 model, seconds; compiles with aot_eager):
    PYTHONPATH=.:benchmarks python benchmarks/parallel_train_gpu.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from torch import nn
from train_step_gpu import add_model_arguments, build_model

MODES = "parallel,peft-serial,parallel-compiled,ours-serial"  # the target's two sides first
JOBS = 4
BASELINE = "peft-serial"
TARGET = 1.3
Batch = dict[str, torch.Tensor]


def job_batches(args: argparse.Namespace, count: int) -> list[list[Batch]]:
    """Per job, `count` batches of 1 x seq token ids from the job's own seed (the same in every mode)."""
    out = []
    for job in range(JOBS):
        g = torch.Generator().manual_seed(100 + job)
        ids = [torch.randint(0, args.vocab, (1, args.seq), generator=g).to(args.device) for _ in range(count)]
        out.append([{"input_ids": t, "labels": t} for t in ids])
    return out


def causal_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' causal-LM loss: token t+1 predicted from tokens <= t, cross-entropy in fp32."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))


def lora_settings(args: argparse.Namespace) -> dict:
    return dict(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules="all-linear",
                task_type="CAUSAL_LM")  # fmt: skip


def fresh_base(args: argparse.Namespace) -> tuple[nn.Module, int]:
    """The seeded base model in training mode, without a KV cache, and its bytes."""
    base = build_model(args, args.device)
    base.config.use_cache = False
    return base.train(), sum(p.nbytes for p in base.parameters())


def timed_steps(step: Callable[[int], object], args: argparse.Namespace) -> tuple[object, dict]:
    """Steps 0 .. warmup-1 untimed (compiling falls here), then --steps timed: (step 0's output, times, peak)."""
    started = time.perf_counter()
    first = step(0)
    for i in range(1, args.warmup):
        step(i)
    _sync(args.device)
    warmup_s = time.perf_counter() - started
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    graphs = _graph_counts()
    times = []
    for i in range(args.warmup, args.warmup + args.steps):
        _sync(args.device)
        start = time.perf_counter()
        step(i)
        _sync(args.device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
    compiled_while_timed = _graph_counts()[0] - graphs[0]  # a recompile in the timed steps would inflate them
    return first, {"median_ms": 1000 * statistics.median(times), "times_ms": [1000 * t for t in times],
                   "warmup_s": warmup_s, "peak_gib": peak, "compiled_while_timed": compiled_while_timed}  # fmt: skip


# -- the modes --------------------------------------------------------------------------------------------------------
def run_parallel(mode: str, args: argparse.Namespace, batches: list[list[Batch]]) -> dict:
    from lorakit import LoraConfig
    from lorakit.multi.parallel import ParallelJob, ParallelTrainer
    from lorakit.train.parallel import compile_blocks

    base, base_bytes = fresh_base(args)
    jobs = [
        ParallelJob(f"job{i}", LoraConfig(**lora_settings(args)), iter(batches[i]), steps=len(batches[i]),
                    optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4), seed=i)
        for i in range(JOBS)
    ]  # fmt: skip
    trainer = ParallelTrainer(base, jobs, loss_fn=causal_loss)
    dtype = getattr(torch, args.dtype)
    for job in jobs:  # no adapter dtype option: cast before any step, the optimizers hold these same Parameters
        for param in trainer.parameters_of(job.name):
            param.data = param.data.to(dtype)
    if mode == "parallel-compiled":
        compile_blocks(trainer.model, "on", args.backend, torch.device(args.device))
    result = {"base_bytes": base_bytes, "adapter_dtype": str(_adapter_dtype(trainer.model)),
              "allocated_gib": _allocated(args.device)}  # fmt: skip
    reports, timed = timed_steps(lambda _: trainer.step(), args)
    result.update(timed)  # the first step's losses come before any optimizer step
    result["first_loss"] = {f"job{i}": reports[f"job{i}"].loss for i in range(JOBS)}
    result["tokens_per_s"] = JOBS * args.seq / (result["median_ms"] / 1000)
    if mode in args.profile:
        _profile(lambda: trainer.step())
    return result


def run_serial(mode: str, args: argparse.Namespace, batches: list[list[Batch]]) -> dict:
    base, base_bytes = fresh_base(args)
    attach = _ours_attach if mode == "ours-serial" else _peft_attach
    result: dict = {"base_bytes": base_bytes, "first_loss": {}, "jobs": {}}
    lora = None  # ours: the LoraModel kept across jobs
    for i in range(JOBS):
        model, detach, lora = attach(base, lora, i, args)
        result["adapter_dtype"] = str(_adapter_dtype(model))
        result["allocated_gib"] = _allocated(args.device)
        job = train_job(model, batches[i], args, profile=mode in args.profile and i == JOBS - 1)
        result["first_loss"][f"job{i}"] = job.pop("first_loss")
        result["jobs"][f"job{i}"] = job
        base = detach(model)
        del model
    jobs = result["jobs"].values()
    result["median_ms"] = sum(j["median_ms"] for j in jobs)  # 4 jobs' steps: one token batch of each
    result["peak_gib"] = max(j["peak_gib"] for j in jobs) if args.device == "cuda" else None
    result["tokens_per_s"] = JOBS * args.seq / (result["median_ms"] / 1000)
    return result


def _ours_attach(base: nn.Module, lora, i: int, args: argparse.Namespace):
    """(model to train, how to take its adapter off again, the LoraModel) for job i: lorakit, bf16 factors."""
    from lorakit import LoraConfig, get_lora_model

    name, dtype = "default", getattr(torch, args.dtype)  # one name for every job, as PEFT's: no recompile for a name
    torch.manual_seed(i)
    if lora is None:
        lora = get_lora_model(base, LoraConfig(**lora_settings(args)), adapter_name=name, adapter_dtype=dtype)
    else:
        lora.add_adapter(name, LoraConfig(**lora_settings(args)), adapter_dtype=dtype)
        lora.set_adapter(name)

    def detach(model: nn.Module) -> nn.Module:
        model.delete_adapter(name)  # the last one: the base gets its own modules back
        return model.model

    return lora, detach, lora


def _peft_attach(base: nn.Module, lora, i: int, args: argparse.Namespace):
    """PEFT-best for job i: bf16 adapters on the bf16 base (autocast_adapter_dtype=False); unload() detaches."""
    import peft

    torch.manual_seed(i)
    model = peft.get_peft_model(base, peft.LoraConfig(**lora_settings(args)), autocast_adapter_dtype=False)
    return model, lambda m: m.unload(), None


def train_job(model: nn.Module, batches: list[Batch], args: argparse.Namespace, profile: bool) -> dict:
    """One job alone: the model under torch.compile, transformers' loss, AdamW over its trainable parameters."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    compiled = torch.compile(model, backend=args.backend)

    def step(i: int) -> torch.Tensor:
        ids = batches[i]["input_ids"]
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    first, result = timed_steps(step, args)
    result["first_loss"] = first.item()  # step 0's: before the optimizer moved anything
    if profile:
        extra = iter(range(args.warmup + args.steps, len(batches)))
        _profile(lambda: step(next(extra)))
    return result


RUNNERS = {"parallel": run_parallel, "parallel-compiled": run_parallel, "ours-serial": run_serial,
           "peft-serial": run_serial}  # fmt: skip


def _adapter_dtype(model: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters() if p.requires_grad), None)


def _allocated(device: str) -> float | None:
    """GiB allocated once the model and its adapters are built: one base copy plus the factors."""
    return torch.cuda.memory_allocated() / 2**30 if device == "cuda" else None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _profile(step: Callable[[], object]) -> None:
    """The top 15 CUDA ops of 3 steps, by CUDA time."""
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        print("--profile: no CUDA device, nothing to profile")
        return
    try:
        torch.cuda.synchronize()
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / 3 * 1000
        events = prof.key_averages()
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]  # not the ops around them
        busy = sum(e.self_device_time_total for e in kernels) / 3 / 1000
        print(f"profile: GPU busy {busy:.1f} ms of {wall:.1f} ms a step (under the profiler)")
        print(events.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
        print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    except Exception:  # the mode's timings are taken already: keep them
        traceback.print_exc()


def measure_fresh(mode: str, args: argparse.Namespace, batches: list[list[Batch]]) -> dict:
    """One mode; its error, if any, is recorded and printed; everything it allocated or compiled is released."""
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _graph_counts(clear=True)
    started = time.perf_counter()
    try:
        result = RUNNERS[mode](mode, args, batches)
    except Exception as err:  # one broken mode must not lose the others' figures
        traceback.print_exc()
        result = {"error": f"{type(err).__name__}: {str(err)[:2000]}"}
    result["mode_s"] = time.perf_counter() - started
    result["compiled_graphs"], result["graph_breaks"] = _graph_counts()
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    shown = {k: v for k, v in result.items() if k not in ("jobs", "times_ms")}
    print(f"{mode}: {shown}", flush=True)
    return result


def _graph_counts(clear: bool = False) -> tuple[int, int]:
    """(graphs torch.compile made, graph breaks) since they were last cleared (dynamo's own counters)."""
    from torch._dynamo.utils import counters

    found = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    if clear:
        counters.clear()
    return found


# -- report -----------------------------------------------------------------------------------------------------------
def summary(results: dict[str, dict], args: argparse.Namespace) -> None:
    baseline = results.get(BASELINE, {}).get("tokens_per_s")
    print(f"{'mode':<19}{'step ms (serial: per job)':>28}{'sum ms':>9}{'tokens/s':>10}{'vs ' + BASELINE:>16}"
          f"{'peak GiB':>10}{'warm-up s':>11}{'graphs/breaks':>15}")  # fmt: skip
    for mode, r in results.items():
        if "error" in r:
            print(f"{mode:<19}failed: {r['error'][:200]}")
            continue
        jobs = list(r["jobs"].values()) if "jobs" in r else [r]
        per_job = " ".join(f"{j['median_ms']:.1f}" for j in jobs)
        ratio = f"{r['tokens_per_s'] / baseline:.3f}" if baseline else "-"
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        graphs = f"{r['compiled_graphs']}/{r['graph_breaks']}"
        print(f"{mode:<19}{per_job:>28}{r['median_ms']:>9.1f}{r['tokens_per_s']:>10.0f}{ratio:>16}{peak:>10}"
              f"{sum(j['warmup_s'] for j in jobs):>11.1f}{graphs:>15}")  # fmt: skip
        late = sum(j["compiled_while_timed"] for j in jobs)
        if late:
            print(f"  {mode}: {late} graphs compiled during the timed steps: its times include compiling")
    ok = [r for r in results.values() if "error" not in r]
    if ok:
        print(
            f"base: {ok[0]['base_bytes'] / 2**20:.1f} MiB, one copy in every mode; allocated with the adapters: "
            + ", ".join(f"{m} {_gib(r.get('allocated_gib'))}" for m, r in results.items() if "error" not in r)
        )
    for mode in ("parallel", "parallel-compiled"):
        if mode in results and baseline and "tokens_per_s" in results[mode]:
            ratio = results[mode]["tokens_per_s"] / baseline
            print(f"target: {mode} >= {TARGET}x {BASELINE}'s aggregate tokens/s: {ratio:.3f}x, "
                  f"{'met' if ratio >= TARGET else 'missed'}")  # fmt: skip
    check_first_losses(results, args)


def check_first_losses(results: dict[str, dict], args: argparse.Namespace) -> float | None:
    """Each job's first loss across modes (the base's loss on the job's first batch): the largest spread."""
    losses = {mode: r["first_loss"] for mode, r in results.items() if "first_loss" in r}
    if len(losses) < 2:
        return None
    tolerance = 1e-2 if args.dtype == "bfloat16" else 1e-4
    spread = max(max(v[j] for v in losses.values()) - min(v[j] for v in losses.values()) for j in next(iter(
        losses.values())))  # fmt: skip
    for mode, values in losses.items():
        print(f"first loss {mode:<19}" + " ".join(f"{v:.6f}" for v in values.values()))
    verdict = "agree" if spread <= tolerance else "DISAGREE"
    print(f"first losses across {len(losses)} modes: max difference {spread:.2e} (tolerance {tolerance:g}): {verdict}")
    return spread


def _gib(value: float | None) -> str:
    return f"{value:.2f} GiB" if value is not None else "-"


def write_json(path: str, args: argparse.Namespace, results: dict[str, dict]) -> None:
    import peft
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    if args.device == "cuda":
        try:
            import triton

            versions["triton"] = triton.__version__
        except ImportError:
            pass
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device, "versions": versions,
            "commit": _commit(), "args": {k: v for k, v in vars(args).items()}}  # fmt: skip
    with open(path, "w") as f:
        json.dump({**meta, "results": results}, f, indent=2)


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None  # fmt: skip
    except Exception:  # no git where it runs
        return None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (per job in serial modes), >= 1")
    parser.add_argument("--modes", default=MODES)
    parser.add_argument("--profile", default="", help="print the top CUDA ops of these modes (comma-separated)")
    parser.add_argument("--quick", action="store_true", help="a tiny model (CPU) or 2 layers (CUDA), few steps")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--dtype", help="the base's and adapters' dtype (default bfloat16; float32 on CPU)",
                        choices=("bfloat16", "float32"))  # fmt: skip
    parser.add_argument("--backend", help="torch.compile's backend (default: inductor; aot_eager on CPU)")
    parser.add_argument("--json", help="also write the results here (after every mode)")
    parser.add_argument("--time-budget", type=float, help="seconds: skip a mode that might end later than this, "
                        "judged by the longest mode so far (the table still prints)")  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.layers, args.steps, args.warmup = 2, 3, 2
    if args.quick and args.device == "cpu":
        args.hidden, args.intermediate, args.vocab, args.seq = 64, 128, 512, 32
    args.warmup = max(1, args.warmup)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.backend = args.backend or ("inductor" if args.device == "cuda" else "aot_eager")
    args.profile = [m for m in args.profile.split(",") if m]
    return args


def main() -> None:
    args = parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    for name in ("recompile_limit", "cache_size_limit"):  # a serial job's new adapter may recompile: never go eager
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    batches = job_batches(args, args.warmup + args.steps + 3)  # + 3 for --profile
    results: dict[str, dict] = {}
    started, longest = time.perf_counter(), 0.0
    for mode in filter(None, args.modes.split(",")):
        if mode not in RUNNERS:
            print(f"{mode}: unknown mode; known: {', '.join(RUNNERS)}")
            continue
        if args.time_budget and time.perf_counter() - started + longest > args.time_budget:
            print(f"{mode}: skipped, it might not end within --time-budget {args.time_budget} s", flush=True)
            continue
        begun = time.perf_counter()
        results[mode] = measure_fresh(mode, args, batches)
        longest = max(longest, time.perf_counter() - begun)
        if args.json:
            write_json(args.json, args, results)
    where = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"\n{where}, torch {torch.__version__}, {JOBS} jobs x batch 1x{args.seq}, r{args.rank} all-linear, "
          f"{args.layers} layers, hidden {args.hidden}, {args.dtype}, compile backend {args.backend}, "
          f"total {time.perf_counter() - started:.0f} s")  # fmt: skip
    summary(results, args)


if __name__ == "__main__":
    main()
