"""Fuzzing `lorakit train`: many kill -9s of checkpointed runs, and many generated train configs.

1. Kills: each trial trains the same 24-step run (dropout on, a checkpoint after every step) in a child process,
   SIGKILLs it at random moments 1-3 times, resumes (or restarts when no checkpoint exists yet), lets it finish,
   and compares every logged loss and the final metrics with an uninterrupted run: exact, mismatch, or error.
2. Configs: each case draws a train config from pools of good and bad values for every setting (learning rates,
   step counts, warm-up, clipping, seeds, sample caps, output folders, data files with broken rows/encodings) and
   runs it in-process. Every outcome must be a finished run or one LorakitError; anything else is a bug.

    .venv/bin/python benchmarks/fuzz_train.py --trials 15 --configs 300

Writes benchmarks/results/fuzz_train_<date>.json; the figures go to docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import sys
import tempfile
import time
import traceback
from collections import Counter
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_train_fault import every_step_config, kill_when_training, next_mode, start, train_losses  # noqa: E402
from test_train_helpers import tabular_config, tabular_csv  # noqa: E402

from lorakit.errors import LorakitError  # noqa: E402
from lorakit.train import load_config, train  # noqa: E402


def kill_trial(tmp: Path, data: Path, reference: dict, rng: random.Random) -> tuple[str, int]:
    """One run killed 1-3 times at random moments, then finished; ('exact' | 'mismatch' | 'error: ...', kills)."""
    config = every_step_config(tmp, data)
    run = tmp / "run"
    kills, mode = 0, "fresh"
    for _ in range(rng.randint(1, 3)):
        child = start(config, mode)
        if not kill_when_training(child, run, rng.uniform(0.0, 0.6)):
            if child.returncode != 0:
                return f"error: {child.stderr.read().strip().splitlines()[-1][:200]}", kills
            break
        kills += 1
        try:
            mode = next_mode(run)
        except LorakitError as err:  # a damaged checkpoint would show here
            return f"error: {err}", kills
    if not (run / "summary.json").exists():
        child = start(config, mode)
        if child.wait(timeout=600) != 0:
            return f"error: {child.stderr.read().strip().splitlines()[-1][:200]}", kills
    after = json.loads((run / "summary.json").read_text())["after"]
    same = train_losses(run) == reference["losses"] and after == reference["after"]
    return ("exact" if same else "mismatch"), kills


# -- generated configs -----------------------------------------------------------------------------------------------
NAN, INF = float("nan"), float("inf")
POOLS = {  # key -> values, good ones first; a case draws each key with probability 0.12
    "optim.lr": [0.05, 1e-3, 0.0, -1e-3, NAN, INF, 1e30, 11.0],
    "optim.max_steps": [3, 0, -1, -5, None],
    "optim.epochs": [0.5, 2, 0, -1, INF],
    "optim.warmup_steps": [0, 2, 100, -1],
    "optim.warmup_ratio": [0.0, 0.5, 1.0, 5.0, -0.1, NAN],
    "optim.max_grad_norm": [1.0, 0.0, -1.0, NAN, INF],
    "optim.batch_size": [8, 1, 1000, 0, -2],
    "optim.grad_accum": [1, 3, 0],
    "optim.weight_decay": [0.0, 0.1, -1.0, NAN],
    "optim.loraplus_lr_ratio": [None, 16.0, 1.0, 0.5, NAN],
    "optim.schedule": ["linear", "cosine", "constant", "exp"],
    "optim.name": ["AdamW", "SGD", "Adamm"],
    "seed": [0, 1, 2**32 - 1, 2**32, -1, 2**62],
    "data.max_samples": [None, 10, 1, 0, -5],
    "data.eval_fraction": [0.25, 0.5, 0.0, 1.0, -0.1],
    "data.eval_samples": [None, 3, 0],
    "data.encoding": ["utf-8", "latin-1", "klingon"],
    "run.out_dir": ["OUT/run", "", " ", ".", "/", "~", "OUT/{user}", "OUT/{time", "FILE/run", "FILE"],
    "lora.r": [2, 1, 0, -1, 2.5, True],
    "lora.lora_dropout": [0.0, 0.5, 1.0, -0.1, NAN],
    "lora.target_modules": [["hidden", "out"], ["nothing"], []],
}
ERRORS: Counter = Counter()  # the first words of each LorakitError: which checks the cases reached
BAD_ROWS = [None, "nan,0,0,0,1", "1e39,0,0,0,1", "0.1,0.2,1", "0.1,0.2,0.3,0.4,1,9", "a,b,c,d,1", "0,0,0,0,7"]


def config_case(tmp: Path, rng: random.Random) -> tuple[list[str], str | None]:
    """Overrides for one case, and the bad row its data gets (None: clean data)."""
    overrides = []
    for key, values in POOLS.items():
        if rng.random() < 0.12:
            value = rng.choice(values)
            if key == "run.out_dir" and isinstance(value, str):
                value = value.replace("OUT", str(tmp)).replace("FILE", str(tmp / "FILE"))
            overrides.append(f"{key}={_toml(value)}")
    return overrides, rng.choice(BAD_ROWS) if rng.random() < 0.3 else None


def _check_name(message: str) -> str:
    """Which check refused a case: the setting a message names, else its first words (paths left out)."""
    words = [w for w in message.replace("'", " ").split() if "/" not in w]
    keys = [w.rstrip(":,;") for w in words if re.fullmatch(r"(optim|data|run|model|lora)\.[a-z_]+:?,?;?", w)]
    return keys[0] if keys else " ".join(words[:4])


def _toml(value) -> str:
    if value is None:
        return '""'  # not expressible in TOML; an empty string is another bad value
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, float) and abs(value) == INF:
        return "inf" if value > 0 else "-inf"
    return json.dumps(value)


def run_config_case(tmp: Path, rng: random.Random) -> str:
    """'finished', 'LorakitError', or 'BUG: <exception>' for one generated case."""
    tmp.mkdir(parents=True)
    (tmp / "FILE").write_text("a file")
    overrides, bad_row = config_case(tmp, rng)
    data = tabular_csv(tmp / "t.csv", n=40, bad_row=bad_row)
    try:
        config = load_config(tabular_config(tmp, data), overrides)
        train(config, overwrite=rng.random() < 0.5)
        return "finished"
    except LorakitError as err:
        ERRORS[_check_name(str(err))] += 1
        return "LorakitError" if "\n" not in str(err).strip() else "BUG: multi-line LorakitError"
    except Exception as err:  # noqa: BLE001 - the point is to find these
        return (
            f"BUG: {type(err).__name__}: {str(err)[:160]} | {overrides} | bad_row={bad_row!r} | "
            + "".join(traceback.format_tb(err.__traceback__)[-2:]).replace("\n", " ")[:400]
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=15, help="kill trials (each 1-3 kills)")
    parser.add_argument("--configs", type=int, default=300, help="generated config cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / f"fuzz_train_{date.today()}.json")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="fuzz_train_"))
    data = tabular_csv(tmp / "t.csv", n=120)
    (tmp / "reference").mkdir()
    straight = train(load_config(every_step_config(tmp / "reference", data)))
    reference = {"losses": train_losses(Path(straight.folder)), "after": straight.after}
    t0 = time.time()
    kill_outcomes, kills = Counter(), 0
    for trial in range(args.trials):
        (tmp / f"k{trial}").mkdir()
        outcome, n = kill_trial(tmp / f"k{trial}", data, reference, rng)
        kill_outcomes[outcome] += 1
        kills += n
        print(f"kill trial {trial}: {n} kills, {outcome}", flush=True)
    t_kills = time.time() - t0
    config_outcomes = Counter(run_config_case(tmp / f"c{i}", rng) for i in range(args.configs))
    for outcome, n in config_outcomes.items():
        print(f"configs: {n} x {outcome}", flush=True)
    result = {
        "date": str(date.today()),
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}, CPU only",
        "command": " ".join(["benchmarks/fuzz_train.py", *sys.argv[1:]]),
        "kill_trials": args.trials,
        "kills": kills,
        "kill_outcomes": dict(kill_outcomes),
        "kill_seconds": round(t_kills),
        "config_cases": args.configs,
        "config_outcomes": dict(config_outcomes),
        "config_errors_by_start": dict(ERRORS.most_common()),
        "seconds": round(time.time() - t0),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
