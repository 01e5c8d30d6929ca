"""How often a two-rank `lorakit train` under torchrun (gloo, on the CPU) ends with a rank killed after its run
succeeded. A rank that returns from train() while the process group's gloo workers still free a collective's
tensors can abort as the interpreter shuts down (SIGABRT, "terminate called without an active exception"); it shows
most where the workers wait for a core, so --concurrent runs go at once on this 2-core machine.

A tiny BERT (tests/test_train_helpers.py) on 96 sentences, 6 steps, FSDP2 or DDP; prints each failed run's first
lines and the count of failed runs.

Run: PYTHONPATH=. python benchmarks/torchrun_exits.py [--runs 20] [--concurrent 3] [--mode fsdp]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20, help="rounds; each starts --concurrent runs at once")
    parser.add_argument("--concurrent", type=int, default=3)
    parser.add_argument("--mode", choices=["fsdp", "ddp"], default="fsdp")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from test_train_helpers import sentiment_csv, seq_cls_config, tiny_bert

    work = Path(tempfile.mkdtemp(prefix="torchrun_exits_"))
    config = seq_cls_config(work, tiny_bert(work / "bert"), sentiment_csv(work / "s.csv"), checkpoint_every="2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip
    failed = aborted = 0
    for round_ in range(args.runs):
        runs = []
        for i in range(args.concurrent):
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                       f"--master_port={29700 + i}", "-m", "lorakit", "train", str(config),
                       f"--run.out_dir={work / f'r{round_}_{i}'}", "--optim.max_steps=0",
                       "--optim.epochs=1", f"--run.distributed={args.mode}"]  # fmt: skip
            runs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        for i, run in enumerate(runs):
            output, _ = run.communicate(timeout=600)
            if run.returncode != 0:
                failed += 1
                aborted += "SIGABRT" in output
                print(f"round {round_} run {i}: exit {run.returncode}; " + " | ".join(output.splitlines()[:10]))
    total = args.runs * args.concurrent
    print(f"{args.mode}: {failed} of {total} runs failed ({aborted} with a rank aborted by SIGABRT)")


if __name__ == "__main__":
    main()
