"""The seed's training-set-size comparison ("A Brief Introduction to LoRA"): the default LoRA run on MiniLM with
250, 1,000 and 4,000 training tweets, loss curves and eval accuracy in one plot.

Like `lorakit sweep --samples 250,1000,4000 --out runs/data-size`; written out here to show the API.
Run: python examples/data_size.py [OUT]   (about 7 minutes on 2 CPU cores; OUT defaults to runs/data-size)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lorakit.train import load_config, train  # noqa: E402
from lorakit.train.plots import plot_compare  # noqa: E402
from lorakit.train.tracking import read_metrics  # noqa: E402

SIZES = (250, 1000, 4000)


def main(out: Path) -> None:
    curves, rows = {}, []
    for n in SIZES:
        folder = out / f"n-{n}"
        # log every 2 steps: the 250-example run has only 7, and each run should draw a curve
        overrides = [f"data.max_samples={n}", f"run.out_dir={folder}", "run.progress=none", "run.eval_every=20",
                     "run.log_every=2"]  # fmt: skip
        result = train(load_config(None, overrides), overwrite=True)
        curves[f"{n} examples"] = read_metrics(folder)
        rows.append((n, result.steps, result.before["accuracy"], result.after["accuracy"], result.seconds))
    plot = plot_compare(curves, "accuracy", out / "data_size.png")
    print(f"{'examples':>8s} {'steps':>6s} {'acc before':>10s} {'acc after':>9s} {'time':>6s}")
    for n, steps, before, after, seconds in rows:
        print(f"{n:8d} {steps:6d} {before:10.3f} {after:9.3f} {seconds:5.0f}s")
    print(f"plot: {plot}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/data-size"))
