"""A learning-rate x rank sweep of the default task trained as one run (examples/sweep.toml: four adapters over one
base, one forward per step for all) against the same four runs one after another (`lorakit train` on each job's
own config): wall time, peak memory, and each setting's accuracy next to full fine-tuning's on the same data.

Each way runs in its own process, so its peak RSS and CPU time are its own; the two run at the same time (on a
shared machine wall time says more about the neighbours than about the work, CPU time does not). Both train the
same adapters from the same start on the same batches; with dropout (0.1 in LoRA and in MiniLM itself) the random
masks differ between the two ways, so their accuracies differ a little.

Run: python examples/sweep.py [OUT]   (OUT defaults to runs/sweep-example; 16 CPU-minutes for both ways)
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lorakit.train import train  # noqa: E402
from lorakit.train.jobs import load_jobs, train_jobs  # noqa: E402

SWEEP = Path(__file__).with_name("sweep.toml")
FULL_FINE_TUNING = 0.852  # examples/bert_lora_vs_full.py: one epoch on 2,000 tweets of the same pool, 1,000 held out


def run(way: str, out: Path) -> dict:
    """One way end to end in this process: accuracy per job, wall seconds, this process's peak RSS."""
    jobs = load_jobs(SWEEP, [f"run.out_dir={out / way}"])
    start, cpu_start = time.perf_counter(), time.process_time()
    if way == "one-run":
        results = train_jobs(jobs, overwrite=True)
    else:
        results = {name: train(config, overwrite=True) for name, config in jobs.configs.items()}
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - cpu_start
    peak = usage.ru_maxrss / 1024
    accuracy = {name: r.after["accuracy"] for name, r in results.items()}
    before = next(iter(results.values())).before["accuracy"]
    return {"way": way, "seconds": seconds, "cpu_seconds": cpu, "peak_rss_mib": peak, "accuracy": accuracy,
            "before": before}  # fmt: skip


def main(out: Path) -> None:
    procs = {way: subprocess.Popen([sys.executable, __file__, way, str(out)], stdout=subprocess.PIPE, text=True)
             for way in ("one-run", "one-after-another")}  # fmt: skip
    ways = {way: json.loads(proc.communicate()[0].strip().splitlines()[-1]) for way, proc in procs.items()}
    one, serial = ways["one-run"], ways["one-after-another"]
    print(f"4 LoRA adapters on MiniLM-L6, 640 tweets, 1 epoch (20 steps of 32) each, 300 held out; accuracy "
          f"before {one['before']:.3f}\n")  # fmt: skip
    print(f"{'way':<20s}{'CPU time':>9s}{'wall':>8s}{'peak RSS':>11s}")
    for r in (one, serial):
        print(f"{r['way']:<20s}{r['cpu_seconds']:8.0f}s{r['seconds']:7.0f}s{r['peak_rss_mib']:8.0f}MiB")
    print(f"one run / one after another: CPU time {one['cpu_seconds'] / serial['cpu_seconds']:.2f}x, "
          f"peak memory {one['peak_rss_mib'] / serial['peak_rss_mib']:.2f}x\n")  # fmt: skip
    print(f"{'setting':<14s}{'acc one run':>12s}{'acc serial':>12s}{'vs full FT':>12s}")
    for name, acc in one["accuracy"].items():
        print(f"{name:<14s}{acc:12.3f}{serial['accuracy'][name]:12.3f}{acc - FULL_FINE_TUNING:+12.3f}")
    best = max(one["accuracy"], key=one["accuracy"].get)
    print(f"\nclosest to full fine-tuning ({FULL_FINE_TUNING:.3f}): {best} ({one['accuracy'][best]:.3f})")


if __name__ == "__main__":
    if len(sys.argv) > 2:
        print(json.dumps(run(sys.argv[1], Path(sys.argv[2]))))
    else:
        main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/sweep-example"))
