"""Run under torchrun by test_train_distributed: trains a config with `lorakit.train.train` and writes, per rank,
the names of the process's threads seen during the steps and once train() has returned."""

import contextlib
import json
import os
import sys
from pathlib import Path

from lorakit.train import load_config, train


def thread_names() -> list[str]:
    names = []
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # the thread ended while listed
            names.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
    return sorted(names)


def main(config_path: str, out_dir: str, mode: str) -> None:
    config = load_config(Path(config_path))
    config.run.out_dir, config.run.distributed, config.optim.max_steps = out_dir, mode, 2
    during: set[str] = set()
    train(config, overwrite=True, on_step=lambda step: during.update(thread_names()))
    seen = {"during": sorted(during), "after": thread_names()}
    Path(out_dir, f"threads.{os.environ['RANK']}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main(*sys.argv[1:])
