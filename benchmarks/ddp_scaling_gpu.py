"""Two-GPU scaling of a real `lorakit train` run (issue 11's target "2 x H100, DDP training tokens/s vs 1 >= 1.8x").

The same causal-LM run is launched with `torchrun --nproc_per_node=N -m lorakit train config.toml
--run.distributed=ddp` for each N of --procs (default 1, then 2): N = 1 is the plain single-process run (no process
group, no DDP), N = 2 is lorakit's DDP path over NCCL (gloo on CPU). Weak scaling: every process keeps the same
batch (--batch x --seq tokens), so two processes train twice the tokens per optimizer step; the ratio reported is
tokens/s with N processes over tokens/s with one, 2.0 being perfect.

Model: benchmarks/train_step_gpu.build_model (Llama-3.2-1B's shape: hidden 2048, 16 layers, intermediate 8192,
vocabulary 128,256, tied embeddings; seeded random bf16 weights), saved with a word-level tokenizer of the same
vocabulary into a work folder, so the run loads it as a user's model folder, offline. Data: random words, one line
per example of exactly --seq tokens, padded/truncated to --seq (fixed shapes: one compile serves every step).
The run: r16, lora_alpha 32, all-linear, AdamW (lr 1e-4), the loop's defaults otherwise: bf16 autocast on CUDA,
fp32 adapter factors, each decoder layer compiled (run.compile, --compile; auto = on on CUDA, off on CPU).
run.fused_head_loss is off in both runs, as in the runs before ddp could take it, so the ratios stay comparable with
those (a ratio compares the same per-process work either way). Eval sets are one batch, checkpoints only at the
end, so the run is mostly training steps.

Measured: the run's own metrics.jsonl (log_every = 1, written by rank 0): each optimizer step's examples/s, which
is examples x world / that step's wall time on rank 0 (the loss .item() and gradient-norm reads inside the step
wait for the GPU; the optimizer's GPU work is counted in the next step). The first --warmup steps (compiling,
allocator warm-up) are left out; tokens/s = examples/s x --seq (no padding: every position is a token). Also from
the records' time stamps (wall time between the first kept record and the last, which includes logging): a check
on the per-step numbers.

Run (2 GPUs): PYTHONPATH=. python3 benchmarks/ddp_scaling_gpu.py --json benchmarks/results/ddp_scaling.json
(or bash benchmarks/two_gpu_session.sh, which runs the FSDP2 test first and keeps both under time limits)
Smoke run (CPU, gloo, tiny model): PYTHONPATH=. python benchmarks/ddp_scaling_gpu.py --quick --json /tmp/d.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from decode_step_gpu import environment
from train_step_gpu import build_model

ROOT = Path(__file__).resolve().parents[1]
# NVLink multicast stays off (the GPU machines' rule: it can put a shared host's GPUs out of service)
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
QUICK = dict(layers=2, hidden=64, intermediate=128, vocab=512, batch=2, seq=32, steps=6, warmup=2)


def write_inputs(args: argparse.Namespace, work: Path) -> Path:
    """Model folder, tokenizer, train/eval text and config.toml in `work`; returns the config's path."""
    model_dir = work / "model"
    if torch.cuda.is_available():  # seconds on a GPU, not a minute on the CPU; in a child, so that this process
        child = multiprocessing.get_context("spawn").Process(target=_save_model, args=(args, model_dir, "cuda"))
        child.start()  # never holds a GPU context while the runs measure
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"building the model failed (exit {child.exitcode})")
    else:
        _save_model(args, model_dir, "cpu")
    _tokenizer(args.vocab).save_pretrained(model_dir)
    rng = random.Random(0)
    for name, rows in (("train", args.batch * 16), ("eval", args.batch)):
        lines = (" ".join(f"w{rng.randrange(3, args.vocab)}" for _ in range(args.seq)) for _ in range(rows))
        (work / f"{name}.txt").write_text("\n".join(lines) + "\n")
    config = f"""task = "causal-lm"
seed = 0
[model]
source = "{model_dir}"
[data]
path = "{work / "train.txt"}"
eval_path = "{work / "eval.txt"}"
max_length = {args.seq}
padding = "max_length"
[lora]
r = {args.rank}
lora_alpha = {2 * args.rank}
target_modules = "all-linear"
[optim]
lr = 1e-4
batch_size = {args.batch}
max_steps = {args.steps}
[run]
progress = "none"
log_every = 1
eval_every = {args.steps + 1}
checkpoint_every = {args.steps + 1}
tensorboard = false
plots = false
compile = "{args.compile}"
fused_head_loss = "off"
"""
    (work / "config.toml").write_text(config)
    return work / "config.toml"


def _save_model(args: argparse.Namespace, folder: Path, device: str) -> None:
    build_model(args, device=device).save_pretrained(folder)


def _tokenizer(vocab: int):
    """A word-level tokenizer over 'w3' .. 'w{vocab-1}', so every line of --seq words is --seq tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"[UNK]": 0, "[PAD]": 1, "[EOS]": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def launch(procs: int, config: Path, out: Path, args: argparse.Namespace, deadline: float) -> tuple[int, float, str]:
    """`lorakit train` under torchrun with `procs` processes; (exit code, seconds, its output). A run past
    --timeout (or past the --budget deadline) gets SIGTERM, on which torchrun stops its workers (a SIGKILL would
    leave them holding the GPUs); torchrun shares this script's process group, so an outer `timeout` reaches it."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "-m", "lorakit", "train", str(config), f"--run.out_dir={out}",
               "--run.distributed=ddp"]  # fmt: skip
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)  # carried wheels stay first
    env = {**os.environ, **NO_MULTICAST, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1" if args.quick else "4"}  # fmt: skip
    limit = max(1.0, min(args.timeout, deadline - time.monotonic()))
    start = time.perf_counter()
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as process:  # fmt: skip
        try:
            output, _ = process.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                output, _ = process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                output, _ = process.communicate()
            output += f"\n[stopped after {limit:.0f} s]"
    return process.returncode, time.perf_counter() - start, output


def free_port() -> int:
    """A port nothing listens on now. torchrun's static rendezvous on 127.0.0.1 needs no host name lookup, which
    --standalone does (its workers meet at the machine's fully qualified name)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def step_measures(out: Path, procs: int, args: argparse.Namespace) -> dict:
    """Per-step times and tokens/s of one finished run, warm-up steps left out."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = sorted((r for r in records if r["kind"] == "train"), key=lambda r: r["step"])
    kept = [r for r in train if r["step"] > args.warmup]
    if len(kept) < 2:
        raise RuntimeError(f"{out}: {len(kept)} steps after the warm-up; raise --steps above --warmup + 1")
    examples = args.batch * procs  # per optimizer step, all processes together
    step_s = [examples / r["examples_per_s"] for r in kept]
    wall = kept[-1]["time"] - train[train.index(kept[0]) - 1]["time"]  # from the end of the last warm-up step
    summary = json.loads((out / "summary.json").read_text())
    return {
        "procs": procs,
        "tokens_per_step": examples * args.seq,
        "median_step_s": statistics.median(step_s),
        "tokens_per_s": examples * args.seq / statistics.median(step_s),
        "tokens_per_s_wall": examples * args.seq * len(kept) / wall,
        "step_s": step_s,
        "warmup_step_s": [examples / r["examples_per_s"] for r in train if r["step"] <= args.warmup],
        "losses": [r["loss"] for r in train],
        "eval_loss_before_after": [summary["before"].get("loss"), summary["after"].get("loss")],
        "compiled": summary["compiled"],
        "peak_memory_gib": summary["peak_memory_bytes"] / 2**30,
    }


def run_all(args: argparse.Namespace) -> dict:
    """Inputs once, then one run per process count until one fails; the JSON is rewritten after each, so a cut-off
    run keeps what was measured."""
    work = Path(args.work or tempfile.mkdtemp(prefix="ddp_scaling_"))
    deadline = time.monotonic() + args.budget
    started = time.perf_counter()
    config = write_inputs(args, work)
    command = "python " + " ".join(sys.argv)
    record: dict = {"command": command, "args": vars(args), "inputs_s": time.perf_counter() - started, "runs": {}}
    print(f"inputs written to {work} in {record['inputs_s']:.1f} s", flush=True)
    for procs in (int(p) for p in args.procs.split(",")):
        out = work / f"run_{procs}"
        code, seconds, output = launch(procs, config, out, args, deadline)
        print(f"-- {procs} process(es), exit {code} after {seconds:.0f} s; its output:\n{output}", flush=True)
        run: dict = {"exit": code, "seconds": seconds,
                     "command": f"torchrun --nproc_per_node={procs} -m lorakit train {config} "
                                f"--run.out_dir={out} --run.distributed=ddp"}  # fmt: skip
        if code == 0:
            run.update(step_measures(out, procs, args))
        else:  # torchrun's own report ends the output; the worker's error is above it
            lines = output.splitlines()
            run["errors"] = [line for line in lines if "Error" in line or "[stopped" in line][:20] or lines[-3:]
            run["output_tail"] = output[-4000:]
        record["runs"][str(procs)] = run
        _save(args.json, record)
        if code != 0:  # the next run would fail the same way; its time is better left to the caller
            break
    return record


def _save(path: str | None, record: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(record, indent=2) + "\n")


def report(record: dict, args: argparse.Namespace) -> list[int]:
    """Prints the table and the ratios against one process (a ratio needs both runs); returns the failed runs."""
    runs = {int(k): v for k, v in record["runs"].items() if v["exit"] == 0}
    one = runs.get(1)
    print(f"\n== DDP scaling: {record.get('device')}, batch {args.batch} x {args.seq} per process, r{args.rank}, "
          f"compile {args.compile}")  # fmt: skip
    print(f"{'procs':>5}{'step s':>10}{'tokens/s':>12}{'vs 1':>7}{'tokens/s wall':>15}{'vs 1':>7}{'peak GiB':>10}")
    for procs, run in sorted(runs.items()):
        ratio = run["tokens_per_s"] / one["tokens_per_s"] if one else float("nan")
        wall = run["tokens_per_s_wall"] / one["tokens_per_s_wall"] if one else float("nan")
        run["speedup_vs_1"], run["speedup_vs_1_wall"] = ratio, wall
        print(f"{procs:>5}{run['median_step_s']:>10.4f}{run['tokens_per_s']:>12,.0f}{ratio:>7.3f}"
              f"{run['tokens_per_s_wall']:>15,.0f}{wall:>7.3f}{run['peak_memory_gib']:>10.2f}")  # fmt: skip
    failed = sorted(int(k) for k, v in record["runs"].items() if v["exit"] != 0)
    for procs in failed:
        print(f"failed: {procs} process(es), exit {record['runs'][str(procs)]['exit']}; errors:")
        print("\n".join(record["runs"][str(procs)]["errors"][:6]))
    return failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--batch", type=int, default=4, help="examples per process and step")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=8, help="first steps left out (compiling)")
    parser.add_argument("--compile", default="auto", choices=("auto", "on", "off"), help="run.compile")
    parser.add_argument("--procs", default="1,2", help="process counts, comma-separated")
    parser.add_argument("--timeout", type=int, default=200, help="seconds per run before it is killed")
    parser.add_argument("--budget", type=float, default=600, help="seconds for the whole script: the last run is cut")
    parser.add_argument("--work", help="folder for the model, data and runs (default: a new temporary one)")
    parser.add_argument("--quick", action="store_true", help="tiny model on the CPU (gloo): a smoke run")
    parser.add_argument("--json", help="write the results here (rewritten after each run)")
    args = parser.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    record = run_all(args)
    record.update(environment("cuda" if torch.cuda.is_available() else "cpu"))  # after the runs: no GPU context
    record["gpus"] = torch.cuda.device_count()
    failed = report(record, args)
    _save(args.json, record)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
