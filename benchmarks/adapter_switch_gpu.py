"""Switching a cached adapter on the GPU (issue 11's target "switch a cached adapter, pinned RAM -> GPU, r16
all-linear: < 5 ms, no recompile"), on a Llama-3.2-1B-shaped model (benchmarks/train_step_gpu.build_model: random
bf16 weights from config, 16 layers unless --layers).

Adapters: --adapters of them, r16, lora_alpha 32, all-linear (112 layers at 16 layers), random factors, saved as
PEFT folders in bf16. The model serves them through one slot (load_adapter of the first, factors in the base's
bf16 as lorakit serve keeps them, prepare_slot at rank 16), with an AdapterCache attached. Measured, each the median
(and quartiles) of --rounds calls, cycling through the adapters, torch.cuda.synchronize() inside each timed call:
  switch_from_pinned_ram   hotswap_adapter of an adapter held in the cache's pinned host RAM (device_slots=0):
                           the files' tensors copied to the GPU, padded to the slot, scale folded, copied in
  switch_resident          the same with every adapter already staged on the GPU (device_slots=--adapters)
  peft_hotswap             peft.utils.hotswap.hotswap_adapter of the same folders (PEFT reads the files each time)
No recompile: the slot model is torch.compile'd (--backend), run once, then after each switch to an adapter it
runs again; recompiles = torch._dynamo's compiled-frame count after the first call (0 expected). Each output is
compared with every adapter loaded the ordinary way (load_adapter on a second model, eager): `matches` says the
nearest is the adapter switched to, at under a quarter of the distance to the next nearest (bf16 compiled kernels
do not reproduce eager bits, so equality is judged against how far apart the adapters are); the eager switched
model's distance to its own adapter is reported too (expected ~0).

Run (CUDA): PYTHONPATH=. python benchmarks/adapter_switch_gpu.py [--json PATH]
Smoke run (CPU, tiny model): PYTHONPATH=. python benchmarks/adapter_switch_gpu.py --quick --json /tmp/s.json
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
import traceback
from pathlib import Path

import torch
from adapter_switch import ALPHA, RANK, quartiles_ms
from decode_step_gpu import environment, synchronizer
from torch._dynamo.utils import counters
from train_step_gpu import build_model

from lorakit import LoraConfig, LoraModel, get_lora_model
from lorakit.multi.cache import AdapterCache, prepare_slot

QUICK = dict(layers=2, hidden=64, intermediate=128, vocab=256, adapters=3, rounds=20, peft_rounds=5, device="cpu")


def save_adapters(args: argparse.Namespace, root: Path) -> list[Path]:
    torch.manual_seed(100)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=False)
    model = get_lora_model(build_model(args, args.device), config, adapter_name="a0", adapter_dtype=torch.bfloat16)
    for i in range(1, args.adapters):
        model.add_adapter(f"a{i}", config, adapter_dtype=torch.bfloat16)
    model.save_pretrained(root)  # a{i} in root / a{i}
    return [root / f"a{i}" for i in range(args.adapters)]


def loaded_model(args: argparse.Namespace, paths: list[Path], cache: AdapterCache | None) -> LoraModel:
    """A model with paths[i] loaded the ordinary way as adapter a{i}, factors in the base's bf16."""
    model = LoraModel(build_model(args, args.device)).eval()
    model.adapter_cache = cache
    for i, path in enumerate(paths):
        model.load_adapter(path, f"a{i}")
    return model.to(torch.bfloat16)


def switch_ms(model: LoraModel, cache: AdapterCache, paths: list[Path], args: argparse.Namespace) -> dict:
    """Quartiles of hotswap_adapter into slot a0 from `cache` (its adapters read, and staged if it keeps slots)."""
    model.adapter_cache = cache
    for path in paths:
        cache.get(path)
        if cache.device_slots:
            model.hotswap_adapter(path, "a0")
    sync = synchronizer(args.device)

    def switch(path: Path) -> None:
        model.hotswap_adapter(path, "a0")
        sync()

    q1, median, q3 = quartiles_ms(args.rounds, paths[1:] + paths[:1], switch)
    return {"median_ms": median, "q1_ms": q1, "q3_ms": q3}


def reference_logits(args: argparse.Namespace, paths: list[Path], ids: torch.Tensor) -> list[torch.Tensor]:
    model = loaded_model(args, paths, None)
    logits = []
    with torch.no_grad():
        for i in range(len(paths)):
            model.set_adapter(f"a{i}")
            logits.append(model(input_ids=ids, use_cache=False).logits.float())
    return logits


def compiled_switches(model: LoraModel, paths: list[Path], args: argparse.Namespace) -> dict:
    """Compiles the slot model, then switches through every adapter twice: recompiles and output distances."""
    ids = torch.randint(0, args.vocab, (1, args.check_seq), device=args.device, generator=_generator(args))
    references = reference_logits(args, paths, ids)
    gc.collect()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=args.backend)
    model.hotswap_adapter(paths[0], "a0")
    before, start = counters["frames"]["total"], time.perf_counter()
    with torch.no_grad():
        compiled(input_ids=ids, use_cache=False)
    frames, checks = counters["frames"]["total"], []
    result = {"compile_s": time.perf_counter() - start, "frames_compiled_first_call": frames - before}
    with torch.no_grad():
        for i in [*range(1, len(paths)), 0] * 2:
            model.hotswap_adapter(paths[i], "a0")
            compiled_out = compiled(input_ids=ids, use_cache=False).logits.float()
            eager_out = model(input_ids=ids, use_cache=False).logits.float()
            checks.append(_distances(i, compiled_out, eager_out, references))
    result["recompiles"] = counters["frames"]["total"] - frames
    result["matches"] = all(c["matches"] for c in checks)
    for key in ("compiled_to_own", "eager_to_own"):
        result[f"{key}_max"] = max(c[key] for c in checks)
    result["nearest_other_min"] = min(c["nearest_other"] for c in checks)
    return result


def _distances(i: int, compiled_out: torch.Tensor, eager_out: torch.Tensor, references: list[torch.Tensor]) -> dict:
    distances = [(compiled_out - ref).abs().max().item() for ref in references]
    others = distances[:i] + distances[i + 1 :]
    own, nearest_other = distances[i], min(others, default=float("inf"))
    eager_own = (eager_out - references[i]).abs().max().item()
    return {"compiled_to_own": own, "eager_to_own": eager_own, "nearest_other": nearest_other,
            "matches": own < 0.25 * nearest_other}  # fmt: skip


def peft_switch_ms(args: argparse.Namespace, paths: list[Path]) -> dict:
    import peft
    from peft.utils.hotswap import hotswap_adapter

    model = peft.PeftModel.from_pretrained(build_model(args, args.device), str(paths[0])).eval()
    model.to(torch.bfloat16)
    sync = synchronizer(args.device)

    def switch(path: Path) -> None:
        hotswap_adapter(model, str(path), "default", torch_device=args.device)
        sync()

    q1, median, q3 = quartiles_ms(args.peft_rounds, paths[1:] + paths[:1], switch)
    return {"median_ms": median, "q1_ms": q1, "q3_ms": q3}


def _generator(args: argparse.Namespace) -> torch.Generator:
    return torch.Generator(args.device).manual_seed(1)


def run(args: argparse.Namespace, root: Path) -> dict:
    """Every measure in turn; the JSON is rewritten after each, so a run cut short keeps what it measured."""
    results: dict = {}

    def record(name: str, value) -> None:
        results[name] = value
        print(f"{name}: {value}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({**environment(args.device), "args": vars(args), "results": results}, f, indent=2)

    paths = save_adapters(args, root)
    _release(args)
    pinned = AdapterCache(device_slots=0)
    model = loaded_model(args, paths[:1], pinned)
    prepare_slot(model, "a0", RANK)
    record("switch_from_pinned_ram", switch_ms(model, pinned, paths, args))
    record("pinned", all(t.is_pinned() for p in paths for t in pinned.get(p).weights.values()))
    record("switch_resident", switch_ms(model, AdapterCache(device_slots=len(paths)), paths, args))
    try:
        record("compiled", compiled_switches(model, paths, args))
    except Exception as err:  # kept in the JSON; the PEFT comparison still runs (one GPU call, no second try)
        traceback.print_exc()
        record("compiled", {"error": f"{type(err).__name__}: {err}"[:2000]})
    del model
    _release(args)
    if args.peft_rounds:
        record("peft_hotswap", peft_switch_ms(args, paths))
    return results


def _release(args: argparse.Namespace) -> None:
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("layers", 16), ("hidden", 2048), ("intermediate", 8192), ("vocab", 128256)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--seq", type=int, default=2048, help="positions the model is built for")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--peft-rounds", type=int, default=20, help="0: skip PEFT")
    parser.add_argument("--check-seq", type=int, default=32, help="tokens of the compiled forward after each switch")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the recompile check")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="a tiny model on CPU, few rounds: a smoke run")
    parser.add_argument("--json", help="also write the results here (rewritten after every measure)")
    if parser.parse_args().quick:  # its sizes are defaults: flags given beside --quick still win
        parser.set_defaults(**QUICK)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = run(args, Path(tmp))
    device = environment(args.device)["device"]
    print(f"== adapter_switch_gpu: {device}, torch {torch.__version__}, {args.layers} layers, r{RANK} all-linear")
    for name in ("switch_from_pinned_ram", "switch_resident", "peft_hotswap"):
        if name in results:
            r = results[name]
            print(f"{name:<24}{r['median_ms']:>8.3f} ms (quartiles {r['q1_ms']:.3f} .. {r['q3_ms']:.3f})")
    print(f"adapters held in pinned host RAM: {results['pinned']}")
    c = results["compiled"]
    if "error" in c:
        print(f"compiled ({args.backend}): failed: {c['error']}")
        return
    print(f"compiled ({args.backend}): {c['recompiles']} recompiles after {c['frames_compiled_first_call']} frames, "
          f"outputs match the normal load: {c['matches']} (compiled {c['compiled_to_own_max']:.3g}, eager "
          f"{c['eager_to_own_max']:.3g} from own; nearest other adapter >= {c['nearest_other_min']:.3g})")  # fmt: skip


if __name__ == "__main__":
    main()
