"""The default `lorakit train` run on CPU: wall time, peak memory, data-wait share; and our step vs PEFT's.

1. Runs the no-argument default (pretrained MiniLM-L6, packaged tweets) in a child process; reports its wall
   time, peak resident memory and the share of step time spent building batches (from its summary.json).
2. Times the same training step (forward, backward, AdamW) on the default run's batches with a lorakit
   LoraModel and with a PEFT model of the same config, alternating them, and prints the median ratio.

Run: python benchmarks/default_run.py [--skip-run] [--steps 30]   (about 4 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).with_name("results")


def default_run() -> dict:
    """The real thing, as a user runs it, in a child process so its peak memory is its own."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = [sys.executable, "-m", "lorakit.train", "train", f"--run.out_dir={out}", "--run.progress=none"]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        summary = json.loads((out / "summary.json").read_text())
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {
        "wall_seconds": round(wall, 1),
        "peak_rss_mib": round(peak / 2**20),
        "train_seconds": round(summary["seconds"], 1),
        "step_seconds": round(summary["step_seconds"], 4),
        "data_wait_percent": round(100 * summary["data_wait_fraction"], 2),
        "accuracy_before_after": [summary["before"]["accuracy"], summary["after"]["accuracy"]],
        "steps": summary["steps"],
    }


def _models() -> tuple[torch.nn.Module, torch.nn.Module, list[dict]]:
    """A lorakit and a PEFT model from the default config (same seed, same factors), and 8 default batches."""
    import peft

    from lorakit import get_lora_model
    from lorakit.train import load_config, tasks
    from lorakit.train.data import batch_indices

    config = load_config(None, ["data.max_samples=600"])
    prepared = tasks.prepare(config)
    ours = get_lora_model(tasks.build_model(config, prepared), config.lora_config())
    lora = config.lora_config()
    theirs = peft.get_peft_model(tasks.build_model(config, prepared), peft.LoraConfig(**{
        k: getattr(lora, k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save")
    }, task_type="SEQ_CLS"))  # fmt: skip
    order = batch_indices(len(prepared.train), config.optim.batch_size, config.seed, 0)
    return ours, theirs, [prepared.collate([prepared.train[i] for i in idx]) for idx in order[:8]]


def step_times(model: torch.nn.Module, batches: list[dict], steps: int) -> list[float]:
    from lorakit.train import tasks

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    times = []
    for i in range(steps):
        start = time.perf_counter()
        tasks.score("seq-cls", model, batches[i % len(batches)]).mean_loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[2:]  # the first steps allocate optimizer state


def compare_with_peft(steps: int) -> dict:
    ours, theirs, batches = _models()
    ours_t, theirs_t = [], []
    for _ in range(3):  # alternate, so a busy moment on the machine hits both
        ours_t += step_times(ours, batches, steps // 3)
        theirs_t += step_times(theirs, batches, steps // 3)
    ours_ms, theirs_ms = 1000 * statistics.median(ours_t), 1000 * statistics.median(theirs_t)
    return {
        "lorakit_step_ms": round(ours_ms, 1),
        "peft_step_ms": round(theirs_ms, 1),
        "ratio_lorakit_over_peft": round(ours_ms / theirs_ms, 3),
        "batch": "32 tweets, dynamic padding",
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-run", action="store_true", help="only the step comparison")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    result = {"date": str(date.today()), "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}"}
    if not args.skip_run:
        result["default_run"] = default_run()
    result["step_vs_peft"] = compare_with_peft(args.steps)
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"default_run_cpu_{result['date']}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
