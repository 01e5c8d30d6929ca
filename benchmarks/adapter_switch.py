"""Switching adapters on CPU: how long a 4-layer Llama-shaped model takes to change its LoRA adapter.

Model: transformers' LlamaForCausalLM from a LlamaConfig with seeded random fp32 weights (4 layers, hidden 512,
intermediate 1376, 8 heads, vocabulary 1000). Adapters: --adapters of them, r=16, lora_alpha=32, all-linear
(q, k, v, o, gate, up, down in every layer), random factors (init_lora_weights=False), saved as PEFT folders.

Each measure is the median over --rounds single calls timed with time.perf_counter, cycling through the adapters:
  switch, resident    hotswap_adapter to an adapter staged in the cache's device tier: one in-place copy of
                      every factor into the slot (the < 1 ms target)
  switch, from RAM    hotswap_adapter of a cached adapter that is not staged (device_slots=0): pad, fold the
                      scale into B, copy
  switch, from disk   hotswap_adapter without a cache: read the folder, then as above
  PEFT hotswap        peft.utils.hotswap.hotswap_adapter of the same folders (PEFT reads the folder each time)
  load, from RAM      load_adapter served by an AdapterCache (a new adapter: inject + copy), then delete_adapter
  load, from disk     load_adapter without a cache, then delete_adapter
  PEFT load           PeftModel.load_adapter of the same folder, then delete_adapter
  forward             one forward of a 1 x 64 batch, for scale (median of at most 30)
Before timing, the script checks that a switched model gives the outputs of the adapter loaded normally.

Run: python benchmarks/adapter_switch.py [--rounds 200] [--adapters 8] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lorakit import LoraConfig, LoraModel, get_lora_model
from lorakit.multi.cache import AdapterCache, prepare_slot

RANK, ALPHA = 16, 32


def build_base() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
        vocab_size=1000, max_position_embeddings=128, use_cache=False,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def save_adapters(root: Path, count: int) -> list[Path]:
    paths = []
    for i in range(count):
        torch.manual_seed(100 + i)
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=False)
        get_lora_model(build_base(), config).save_pretrained(root / f"a{i}")
        paths.append(root / f"a{i}")
    return paths


def median_ms(rounds: int, paths: list[Path], call: Callable[[Path], object]) -> float:
    return quartiles_ms(rounds, paths, call)[1]


def quartiles_ms(rounds: int, paths: list[Path], call: Callable[[Path], object]) -> list[float]:
    times = []
    for i in range(rounds):
        start = time.perf_counter()
        call(paths[i % len(paths)])
        times.append(time.perf_counter() - start)
    return [1e3 * q for q in statistics.quantiles(times, n=4)]


def ours_slot(paths: list[Path], cache: AdapterCache | None) -> LoraModel:
    model = LoraModel(build_base())
    model.adapter_cache = cache
    model.load_adapter(paths[0], "live")
    prepare_slot(model, "live", RANK)
    return model


def check_switch(paths: list[Path], ids: torch.Tensor) -> None:
    """A switched model equals the adapter loaded the ordinary way (else the timings mean nothing)."""
    model = ours_slot(paths, AdapterCache())
    with torch.no_grad():
        for path in (paths[-1], paths[0]):
            model.hotswap_adapter(path, "live")
            expected = LoraModel.from_pretrained(build_base(), path)(input_ids=ids).logits
            torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def measure(paths: list[Path], rounds: int) -> dict[str, float]:
    ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
    check_switch(paths, ids)
    results = {}
    resident = ours_slot(paths, AdapterCache(device_slots=len(paths)))
    for path in paths:  # stage them all
        resident.hotswap_adapter(path, "live")
    quartiles = quartiles_ms(rounds, paths, lambda p: resident.hotswap_adapter(p, "live"))
    results["switch_resident_ms"], results["switch_resident_q1_ms"], results["switch_resident_q3_ms"] = (
        quartiles[1],
        quartiles[0],
        quartiles[2],
    )
    from_ram = ours_slot(paths, AdapterCache(device_slots=0))
    results["switch_from_ram_ms"] = median_ms(rounds, paths, lambda p: from_ram.hotswap_adapter(p, "live"))
    from_disk = ours_slot(paths, None)
    results["switch_from_disk_ms"] = median_ms(rounds, paths, lambda p: from_disk.hotswap_adapter(p, "live"))
    results.update(_peft(paths, rounds))
    results["load_from_ram_ms"] = _load_ms(LoraModel(build_base()), AdapterCache(), paths, rounds)
    results["load_from_disk_ms"] = _load_ms(LoraModel(build_base()), None, paths, rounds)
    with torch.no_grad():
        results["forward_1x64_ms"] = median_ms(min(rounds, 30), paths, lambda p: resident(input_ids=ids))
    return results


def _load_ms(model: LoraModel, cache: AdapterCache | None, paths: list[Path], rounds: int) -> float:
    model.adapter_cache = cache
    model.load_adapter(paths[0], "keep")  # the first adapter: later loads add a second one, as a server would
    if cache is not None:
        for path in paths:
            cache.get(path)

    def load(path: Path) -> None:
        model.load_adapter(path, "new")
        model.delete_adapter("new")

    return median_ms(rounds, paths, load)


def _peft(paths: list[Path], rounds: int) -> dict[str, float]:
    import peft
    from peft.utils.hotswap import hotswap_adapter

    model = peft.PeftModel.from_pretrained(build_base(), paths[0]).eval()
    swap = median_ms(rounds, paths, lambda p: hotswap_adapter(model, str(p), "default", torch_device="cpu"))

    def load(path: Path) -> None:
        model.load_adapter(str(path), "new")
        model.delete_adapter("new")

    return {"peft_hotswap_ms": swap, "peft_load_ms": median_ms(rounds, paths, load)}


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}"


def _commit() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "lorakit"], check=False).returncode != 0
    return out.stdout.strip() + (" + uncommitted changes in lorakit/" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--adapters", type=int, default=8)
    # one thread: on a shared 2-core machine two OpenMP threads stall each other (1x64 forward: 1.2 s vs 52 ms)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        paths = save_adapters(Path(tmp), args.adapters)
        load_before = os.getloadavg()[0]
        results = measure(paths, args.rounds)
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "lorakit_commit": _commit(),
        "load_average_1min_before": load_before,
        "command": "python benchmarks/adapter_switch.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v),
        "model": "LlamaForCausalLM 4 layers, hidden 512, intermediate 1376, 8 heads, vocab 1000, fp32",
        "adapters": f"{args.adapters} x r={RANK} lora_alpha={ALPHA} all-linear (28 layers)",
        "rounds": args.rounds,
        "results_ms": {k: round(v, 4) for k, v in results.items()},
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
