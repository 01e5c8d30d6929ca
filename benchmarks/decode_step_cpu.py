"""One decode step of a routed (mixed-adapter) batch on CPU, the call `lorakit serve` makes for every new token:
`model(input_ids, past_key_values=cache, adapter_names=[...])`, against the base model and against every row on
one adapter (what mixing adapters in one batch costs in the step itself, without the server around it).

Model: benchmarks/serve_throughput.build (Llama-shaped, 4 layers, hidden 256, seeded random weights) with its 8
random rank-16 adapters on every linear layer, loaded with load_adapter. --batch rows (32), a --prompt-token
prefill (20), then --steps decode steps (40), one new token per row, greedy. Cases:
  base      every row "__base__" (routed, no adapter takes part)
  one       every row on style0
  even8     row i on style(i mod 8): 4 rows per adapter
  uneven8   styles 0-6 on 2 rows each, style7 on the other 18 (padded to 18 rows per adapter)
Timing: one torch thread; rounds run the four cases one after another (so a busy neighbour slows all of them);
each round gives each case the median of its steps, and the table keeps each case's lowest round median.

    python benchmarks/decode_step_cpu.py                   # 3 rounds, JSON into benchmarks/results/
    python benchmarks/decode_step_cpu.py --rounds 1 --profile even8   # plus a cProfile of one round of even8
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import platform
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from serve_throughput import ADAPTERS, build
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache

from lorakit import LoraModel

RESULTS = Path(__file__).parent / "results"


def cases(batch: int) -> dict[str, list[str]]:
    uneven = [ADAPTERS[min(i // 2, 7)] for i in range(batch)]
    return {
        "base": ["__base__"] * batch,
        "one": [ADAPTERS[0]] * batch,
        "even8": [ADAPTERS[i % 8] for i in range(batch)],
        "uneven8": uneven,
    }


def decode_ms(model: LoraModel, ids: torch.Tensor, names: list[str], steps: int) -> float:
    """Median milliseconds of `steps` decode steps after a prefill of `ids`, every call routed by `names`."""
    with torch.inference_mode():
        cache = DynamicCache()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, adapter_names=names, logits_to_keep=1)
        times = []
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache, use_cache=True, adapter_names=names, logits_to_keep=1)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=20)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--profile", choices=["base", "one", "even8", "uneven8"], help="cProfile one round of it")
    parser.add_argument("--note", default="", help="kept in the JSON, e.g. which commit ran")
    parser.add_argument("--json", type=Path, default=RESULTS / f"decode_step_cpu_{datetime.date.today()}.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_dir, root = build(Path(tempfile.mkdtemp()), args.hidden, args.layers)
    model = LoraModel(AutoModelForCausalLM.from_pretrained(model_dir).eval())
    for name in ADAPTERS:
        model.load_adapter(root / name, name)
    ids = torch.randint(5, 200, (args.batch, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    routes = cases(args.batch)
    rounds = [
        {case: decode_ms(model, ids, names, args.steps) for case, names in routes.items()} for _ in range(args.rounds)
    ]
    best = {case: min(r[case] for r in rounds) for case in routes}
    ratios = {f"{c}/base": best[c] / best["base"] for c in ("one", "even8", "uneven8")}
    ratios |= {f"{c}/one": best[c] / best["one"] for c in ("even8", "uneven8")}
    for case, ms in best.items():
        print(f"{case:8s} {ms:7.2f} ms   rounds: {', '.join(f'{r[case]:.2f}' for r in rounds)}")
    for name, ratio in ratios.items():
        print(f"{name:13s} {ratio:.2f}x")
    report = {
        "benchmark": "decode_step_cpu",
        "date": str(datetime.date.today()),
        "machine": f"{platform.processor() or platform.machine()}, torch threads 1",
        "torch": torch.__version__,
        "command": "python " + " ".join(sys.argv),
        "note": args.note,
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "profile", "note")},
        "best_ms": best,
        "rounds_ms": rounds,
        "ratios": ratios,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(decode_ms, model, ids, routes[args.profile], args.steps)
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
