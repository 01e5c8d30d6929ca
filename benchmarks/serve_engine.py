"""`lorakit serve`'s engine without HTTP: 32 requests submitted at once, over 8 adapters and all on one adapter,
in one process, on benchmarks/serve_throughput.py's model and adapters (what mixing adapters costs the engine itself:
each request prefilled alone, then decode steps with requests joining and leaving).

Rounds alternate (8 adapters, then one) and every round is printed: the first round pays each adapter's first
prefill and the first decode steps' plans. With --profile, the round's host time per function, over 8 adapters
minus on one (cProfile on the engine's worker thread), the top 30 by cumulative difference.

Run: PYTHONPATH=. python benchmarks/serve_engine.py [--device cuda --hidden 576] [--rounds 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import tempfile
import threading
import time
from pathlib import Path

import torch
from serve_throughput import ADAPTERS, WORDS, build
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit import LoraModel
from lorakit.serve.engine import Engine, GenerationRequest


def load(args: argparse.Namespace):
    model_dir, root = build(Path(tempfile.mkdtemp()), args.hidden, args.layers)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = LoraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), root / ADAPTERS[0], ADAPTERS[0])
    for name in ADAPTERS[1:]:
        model.load_adapter(root / name, adapter_name=name)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    return model.to(args.device, dtype).eval(), tokenizer  # as `lorakit serve --dtype auto` has it


def run(model, tokenizer, adapters: int, args: argparse.Namespace, profile: bool) -> tuple[float, pstats.Stats | None]:
    engine = Engine(model, tokenizer, max_concurrent=args.requests, max_queue=1024)
    profiler = cProfile.Profile() if profile else None
    work = engine._run  # the worker thread's loop: profiled there, where the model runs

    def profiled() -> None:
        profiler.enable()
        try:
            work()
        finally:
            profiler.disable()

    if profiler is not None:
        engine._thread = threading.Thread(target=profiled, daemon=True)
    done = threading.Semaphore(0)

    def emit(event) -> None:
        if event.finish_reason or event.error:
            done.release()

    engine.start()
    start = time.perf_counter()
    for i in range(args.requests):
        ids = tokenizer(f"{WORDS} {i}")["input_ids"]
        request = GenerationRequest(ADAPTERS[i % adapters], ids, max_tokens=args.max_tokens, ignore_eos=True)
        engine.submit(request, emit)
    for _ in range(args.requests):
        done.acquire()
    wall = time.perf_counter() - start
    engine.stop()
    return wall, (pstats.Stats(profiler) if profiler is not None else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    model, tokenizer = load(args)
    rounds, stats = [], {}
    with torch.inference_mode():
        for r in range(args.rounds):
            last = r == args.rounds - 1
            for adapters in (8, 1):
                wall, stat = run(model, tokenizer, adapters, args, profile=args.profile and last)
                tokens = args.requests * args.max_tokens
                rounds.append({"round": r, "adapters": adapters, "wall_s": round(wall, 3),
                               "tokens_per_s": round(tokens / wall, 1)})  # fmt: skip
                print(rounds[-1], flush=True)
                if stat is not None:
                    stats[adapters] = {k: v[3] for k, v in stat.stats.items()}
    for r in range(args.rounds):
        mixed, one = (next(x for x in rounds if x["round"] == r and x["adapters"] == a) for a in (8, 1))
        print(f"round {r}: mixed / one adapter = {mixed['tokens_per_s'] / one['tokens_per_s']:.2f}")
    if stats:
        diff = sorted(((stats[8].get(k, 0) - stats[1].get(k, 0), k) for k in set(stats[8]) | set(stats[1])),
                      key=lambda d: -d[0])  # fmt: skip
        for seconds, (file, line, name) in diff[:30]:
            print(f"{1000 * seconds:8.0f} ms  {name} ({file}:{line})")
    if args.json:
        device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        with open(args.json, "w") as f:
            json.dump({"device": device, "torch": torch.__version__, "args": vars(args), "rounds": rounds}, f, indent=1)


if __name__ == "__main__":
    main()
