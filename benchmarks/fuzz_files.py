"""Fuzzing the adapter files at scale: generated adapter_config.json files, mutated safetensors files, and kill -9
at random moments of save_pretrained over an older adapter. Prints counts by outcome; any "BUG" or "MIXED" outcome
is a defect (tests/test_fuzz_files.py runs the same harness briefly in CI).

    python benchmarks/fuzz_files.py --configs 300 --headers 300 --kills 60 --json benchmarks/results/fuzz_files.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests import fuzzing  # noqa: E402 - the shared harness lives with the tests


def _settings(n: int, seed: int) -> settings:
    return settings(
        max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=seed == 0
    )


def fuzz_configs(n: int, seed: int) -> Counter:
    counts: Counter = Counter()

    @_settings(n, seed)
    @given(content=fuzzing.config_files())
    def case(content: bytes) -> None:
        with tempfile.TemporaryDirectory() as folder:
            counts[fuzzing.load_config_case(Path(folder), content)] += 1

    case()
    return counts


def fuzz_weights(n: int, seed: int) -> Counter:
    counts: Counter = Counter()
    with tempfile.TemporaryDirectory() as folder:
        original = fuzzing.reference_adapter(Path(folder))

    @_settings(n, seed)
    @given(content=fuzzing.weight_files(original))
    def case(content: bytes) -> None:
        with tempfile.TemporaryDirectory() as folder:
            fuzzing.reference_adapter(Path(folder))
            counts[fuzzing.load_weights_case(Path(folder), content)] += 1

    case()
    return counts


def fuzz_kills(n: int, seed: int, in_place: bool = False) -> tuple[Counter, int, dict]:
    """Outcomes of n kills, how many left a silent mix, and how many leftover entries piled up."""
    with tempfile.TemporaryDirectory() as parent:
        folder = Path(parent) / "adapter"
        records = fuzzing.kill_during_saves(folder, kills=n, seed=seed, in_place=in_place)
        fuzzing.big_adapters()[8.0].save_pretrained(folder)
        left = {"most_after_a_kill": max(len(r["leftovers"]) for r in records),
                "after_the_next_save": len(fuzzing.leftovers(folder))}  # fmt: skip
    counts = Counter(
        f"{'save done' if r['finished'] else 'killed mid-save'}: PEFT reads {r['peft']}, lorakit reads {r['lorakit']}"
        for r in records
    )
    silent_mix = sum(r["lorakit"].startswith("MIXED") or (not in_place and not r["ok"]) for r in records)
    return counts, silent_mix, left


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=300)
    parser.add_argument("--headers", type=int, default=300)
    parser.add_argument("--kills", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0, help="0: hypothesis derandomized (reproducible)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    start = time.perf_counter()
    results = {
        "configs": fuzz_configs(args.configs, args.seed),
        "weights": fuzz_weights(args.headers, args.seed),
    }
    results["kills"], mixed, leftovers = fuzz_kills(args.kills, args.seed)
    results["kills, in-place fallback"], mixed_in_place, leftovers_in_place = fuzz_kills(args.kills, args.seed, True)
    mixed += mixed_in_place
    leftovers = {"swap": leftovers, "in-place fallback": leftovers_in_place}
    bugs = sum(n for part in results.values() for k, n in part.items() if k.startswith("BUG"))
    for part, counts in results.items():
        print(f"{part}: {sum(counts.values())} cases")
        for key, n in sorted(counts.items(), key=lambda kv: -kv[1]):
            print(f"  {n:5d}  {key}")
    print(f"leftover entries beside the folder: {leftovers}")
    print(f"bugs: {bugs}, mixed folders lorakit would load: {mixed}, {time.perf_counter() - start:.0f} s")
    if args.json:
        record = {
            "command": " ".join(sys.argv),
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.system()} {platform.machine()}, {platform.python_version()}",
            "results": {part: dict(counts) for part, counts in results.items()},
            "leftovers": leftovers,
            "bugs": bugs,
            "mixed": mixed,
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    sys.exit(1 if bugs or mixed else 0)


if __name__ == "__main__":
    main()
