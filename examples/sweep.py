"""A learning-rate x rank sweep of the default task trained as one run (examples/sweep.toml: four adapters over one
base, one forward per step for all) against the same four runs one after another (`lorakit train` on each job's
own config): wall time, peak memory, and each setting's accuracy next to full fine-tuning's on the same data.

Each way runs in its own process, so its peak RSS is its own. Both train the same adapters from the same start on
the same batches; with dropout (0.1 in LoRA and in MiniLM itself) the random masks differ between the two ways,
so their accuracies differ a little.

Run: python examples/sweep.py [OUT]   (OUT defaults to runs/sweep-example; about 10 minutes on 2 CPU cores)
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
FULL_FINE_TUNING = 0.852  # examples/bert_lora_vs_full.py on the same 2,000 / 1,000 tweets, one epoch


def run(way: str, out: Path) -> dict:
    """One way end to end in this process: accuracy per job, wall seconds, this process's peak RSS."""
    jobs = load_jobs(SWEEP, [f"run.out_dir={out / way}"])
    start = time.perf_counter()
    if way == "one-run":
        results = train_jobs(jobs, overwrite=True)
    else:
        results = {name: train(config, overwrite=True) for name, config in jobs.configs.items()}
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    accuracy = {name: r.after["accuracy"] for name, r in results.items()}
    before = next(iter(results.values())).before["accuracy"]
    return {"way": way, "seconds": seconds, "peak_rss_mib": peak, "accuracy": accuracy, "before": before}


def main(out: Path) -> None:
    ways = {}
    for way in ("one-run", "one-after-another"):
        done = subprocess.run([sys.executable, __file__, way, str(out)], check=True, capture_output=True, text=True)
        ways[way] = json.loads(done.stdout.strip().splitlines()[-1])
    one, serial = ways["one-run"], ways["one-after-another"]
    print(f"4 LoRA adapters on MiniLM-L6, 2,000 tweets, 1 epoch (62 steps) each; accuracy before {one['before']:.3f}\n")
    print(f"{'way':<20s}{'time':>8s}{'peak RSS':>11s}")
    for r in (one, serial):
        print(f"{r['way']:<20s}{r['seconds']:7.0f}s{r['peak_rss_mib']:8.0f}MiB")
    print(f"one run / one after another: time {one['seconds'] / serial['seconds']:.2f}x, "
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
