"""Inference on the GPU against the base model: a decode step with 64 adapters (one per row), and one adapter
unmerged (prefill forward and decode step), lorakit and PEFT side by side in one run (issue 11's targets
"decode step, 64 distinct adapters / base <= 1.15x" and "inference, 1 adapter unmerged / base <= 1.10x").

Model: Llama-3.2-1B shape (hidden 2048, intermediate 8192, 32/8 heads, vocab 128256, tied head) with seeded random
bf16 weights from config (benchmarks/train_step_gpu.build_model): --layers 16 as the real model, but decode-64 has
--decode-layers 8 by default, to keep the run short: adding 64 adapters grows with the depth (each add_adapter walks
every module; at 16 layers it took lorakit 71 s and PEFT 32 s on the project's shared 2-core CPU), while a decode
step costs about the same per layer, so its ratio to the base moves little with the depth (the head's share of a
step doubles). Adapters: r16,
lora_alpha 32, all-linear, bf16 factors, random non-zero B (benchmarks/mixed_batch_gpu.adapt). Eager by default;
--compile puts every mode's transformers forward under torch.compile(mode="reduce-overhead") (CUDA graphs) with a
static KV cache (its prefill run eagerly), so the host's launches leave the comparison.
Cases, each mode on a fresh model (base: the model alone; ours: lorakit; ours-unpacked: lorakit without
lorakit.packed's buffers; ours-unaligned: lorakit with the gathered kernels' element loads; ours-state-first:
lorakit with every layer reading the adapter state (enabled, routing, training) before its packed path, as before
packed layers stopped reading it, so a compiled step guards the state again in every layer; ours-shrink-apart:
lorakit with each sibling's own x A^T in a prefill, as before one GEMM served the group; ours-one-stream: lorakit
with a routed decode step's terms made after the base products on one stream, not beside them; ours-in-place:
lorakit with those terms added into the base products in place, as before they were made apart; ours-unstacked:
lorakit with a tensor of its own for every routed layer's table, as before they shared one; peft: PEFT 0.21):
  decode-64   --decode-batch rows after a prefill of --decode-prompt tokens each (KV cache, DynamicCache); one
              decode step = one new token per row, row i on adapter i mod --adapters (model(..., adapter_names=)).
  one-adapter one adapter made active with set_adapter, not routed: "forward" = a prefill forward of
              --batch x --seq (use_cache=False, full logits), "decode" = one decode step of those --batch rows
              after a prefill of --seq tokens.
Attention: every mode runs without cuDNN's attention, as `lorakit serve` does (lorakit.serve.routing: cuDNN builds a
plan for every new key length, i.e. every decode step, which made the base's step 40 ms for 8 layers before).
Timing: torch.cuda.synchronize + perf_counter around each call, median of --steps after --warmup; decode steps
follow one another, so the KV cache grows by one token a step, equally in every mode. logits_vs_base is the largest
difference of the first decode step's logits from the base's (nonzero: the adapters act). By default each mode runs
on its own model, built after the last mode's was freed; --interleave keeps every mode's model (base, ours, peft)
and times their calls in turns, one of each a round, so the host's pace, which drifts within a process and
differs between processes, weighs on every mode alike.

Run (CUDA): PYTHONPATH=. python benchmarks/decode_step_gpu.py [--layers 16] [--compile] [--json PATH]
Smoke run (CPU, tiny model, seconds): PYTHONPATH=. python benchmarks/decode_step_gpu.py --quick --json /tmp/d.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
import traceback
from collections.abc import Callable
from functools import partial

import torch
from mixed_batch_gpu import adapt
from torch.nn.attention import sdpa_kernel
from train_step_gpu import build_model
from transformers.cache_utils import DynamicCache, StaticCache

import lorakit.layer
from lorakit import packed
from lorakit.layer import LoraLayer
from lorakit.ops import gathered
from lorakit.serve.routing import SERVING_ATTENTION

CASES = ("decode-64", "one-adapter")
MODES = (
    "base", "ours", "ours-unpacked", "ours-unaligned", "ours-state-first", "ours-ungrouped", "ours-shrink-apart",
    "ours-one-stream",
    "ours-in-place", "ours-unstacked", "peft",
)  # fmt: skip
SIBLINGS = packed.SIBLINGS
QUICK = dict(
    layers=2,
    decode_layers=2,
    hidden=64,
    intermediate=128,
    vocab=256,
    decode_prompt=8,
    seq=16,
    steps=3,
    warmup=1,
    device="cpu",
)


def synchronizer(device: str) -> Callable[[], None]:
    """Waits for the device's queued work (CUDA runs asynchronously; the CPU needs no wait)."""
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def median_ms(call: Callable[[], object], warmup: int, steps: int, device: str) -> float:
    """Median wall time of `call`, the device drained before and after each call."""
    sync = synchronizer(device)
    for _ in range(warmup):
        call()
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def decode_ms(model, prompt: torch.Tensor, routing: dict, args: argparse.Namespace) -> tuple:
    """(median ms of one decode step after a prefill of `prompt`, the first step's logits, the step)."""
    step, first = decode_step(model, prompt, routing, args)
    return median_ms(step, args.warmup, args.steps, args.device), first, step


def decode_step(model, prompt: torch.Tensor, routing: dict, args: argparse.Namespace) -> tuple:
    """(one decode step after a prefill of `prompt`, the first step's logits). Under --compile the cache is static
    (the KV tensors preallocated for every step, so each step has the same shapes and one CUDA graph serves them all)
    and the next position is a tensor updated in place, as transformers' compiled generate does."""
    rows, length = prompt.shape
    token = torch.randint(0, args.vocab, (rows, 1), device=prompt.device, generator=_generator(args, 2))
    if not args.compile:
        cache = DynamicCache()
        model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1, **routing)

        def step() -> torch.Tensor:
            return model(input_ids=token, past_key_values=cache, use_cache=True, **routing).logits[:, -1]

        return step, step().float().cpu()
    config = model.config
    extra = 5 + (3 * args.steps + 32 if args.host else 0) + (args.steps if args.interleave else 0)  # 3 profiled
    cache = StaticCache(config=config, max_cache_len=length + args.warmup + args.steps + extra)
    with torch.compiler.set_stance("force_eager"):  # the cache's tensors made eagerly: static addresses for graphs
        model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1, **routing)
    for layer in cache.layers:  # what the steps update in place stays put between graph replays
        for tensor in vars(layer).values():
            if isinstance(tensor, torch.Tensor):
                torch._dynamo.mark_static_address(tensor)
    position = torch.tensor([length], device=prompt.device)
    torch._dynamo.mark_static_address(position)

    def step() -> torch.Tensor:
        logits = (
            model(input_ids=token, past_key_values=cache, use_cache=True, cache_position=position, **routing)
            .logits[:, -1]
            .clone()
        )
        position.add_(1)
        return logits

    return step, step().float().cpu()


def profiled(step: Callable[[], object], args: argparse.Namespace) -> str:
    """--profile: the kernels of 3 decode steps (after the timed ones) by GPU time, and how many there were."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        synchronizer(args.device)()
    events = prof.key_averages()
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    busy = sum(e.self_device_time_total for e in events) / 3e3
    table = events.table(sort_by="self_device_time_total", row_limit=20)
    return f"{kernels / 3:.0f} GPU events a step, GPU busy {busy:.3f} ms a step\n{table}"


def host_report(step: Callable[[], object], args: argparse.Namespace) -> dict[str, float]:
    """--host: where a decode step's time goes on the host. host_ms: the call alone, the device idle before it and
    not waited for (under CUDA graphs: guards, the inputs gathered, the replay launched); unguarded_ms: the whole
    step with dynamo's guards skipped (torch's skip_guard_eval_unsafe stance), so decode_ms - unguarded_ms is what
    the guards cost; and the functions that took the host's time over 30 steps (cProfile, printed)."""
    sync, host = synchronizer(args.device), []
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        step()
        host.append(time.perf_counter() - start)
    sync()
    result = {"host_ms": 1000 * statistics.median(host)}
    if args.compile:
        result.update(host_split(step, args))
    if args.compile:
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        try:
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                result["unguarded_ms"] = median_ms(step, 2, args.steps, args.device)
        except RuntimeError as err:  # the stance refuses to compile, and a step that breaks its graph may recompile
            print(f"no unguarded time: {str(err)[:200]}", flush=True)
        result["graphs_compiled_since"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
    host_profile(step, "decode steps", args)
    return result


def host_profile(step: Callable[[], object], what: str, args: argparse.Namespace) -> None:
    """Prints the functions that took the host's time over 30 calls of `step` (cProfile) and dynamo's counters."""
    import cProfile
    import io
    import pstats

    profiler, text, sync = cProfile.Profile(), io.StringIO(), synchronizer(args.device)
    profiler.enable()
    for _ in range(30):
        step()
        sync()
    profiler.disable()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    counters = {k: dict(v) for k, v in torch._dynamo.utils.counters.items() if k in ("inductor", "stats")}
    print(f"== host profile of 30 {what}:\n{text.getvalue()}\ncounters: {counters}", flush=True)


def host_split(step: Callable[[], object], args: argparse.Namespace) -> dict[str, float]:
    """--host under --compile: the host's call cut where it enters each layer of torch's machinery, medians over
    --steps calls (each started with the device idle): split_outside_ms, before and after the compiled forward (the
    wrapper's Python: lorakit's routed block); split_frame_ms, the compiled frame around its graph (dynamo's guards,
    the bytecode that gathers the graph's inputs, AOT's wrappers); split_graph_ms, inductor's call around the CUDA
    graph tree (its input checks and copies, the outputs rebuilt); split_replay_ms, the replay's launch."""
    from torch._inductor import cudagraph_trees, output_code

    spans: dict[str, float] = {}
    calls: dict[str, int] = {}  # how many times each was entered over the timed calls
    patched = []

    def timed(owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                spans[label] = spans.get(label, 0.0) + time.perf_counter() - start
                calls[label] = calls.get(label, 0) + 1

        setattr(owner, name, wrapper)
        patched.append((owner, name, original))

    inner = [m for m in _COMPILED if m is not None]
    for module in inner:
        timed(module, "forward", "frame")
    timed(output_code.CompiledFxGraph, "__call__", "graph")
    timed(cudagraph_trees.CUDAGraphTreeManager, "run", "tree")
    timed(torch.cuda.CUDAGraph, "replay", "replay")
    sync, rows = synchronizer(args.device), []
    try:
        for _ in range(args.steps):
            sync()
            spans.clear()
            start = time.perf_counter()
            step()
            rows.append((time.perf_counter() - start, dict(spans)))
        sync()
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)

    def median(f) -> float:
        return 1000 * statistics.median(f(total, s) for total, s in rows)

    return {
        "split_call_ms": median(lambda t, s: t),
        "split_outside_ms": median(lambda t, s: t - s.get("frame", 0.0)),
        "split_frame_ms": median(lambda t, s: s.get("frame", 0.0) - s.get("graph", 0.0)),
        "split_graph_ms": median(lambda t, s: s.get("graph", 0.0) - s.get("tree", 0.0)),
        "split_tree_ms": median(lambda t, s: s.get("tree", 0.0) - s.get("replay", 0.0)),
        "split_replay_ms": median(lambda t, s: s.get("replay", 0.0)),
        **{f"split_{label}_entered": n / len(rows) for label, n in calls.items()},
    }


_COMPILED: dict = {}  # the transformers module whose forward --compile compiled -> that compiled forward


_FORWARD = LoraLayer.forward
_STACKED_A = lorakit.layer._stacked_a
_WITH_TERMS = lorakit.layer._with_terms


def _in_place(x, weights, biases, slots, tables):
    """ours-in-place: the base products, then the group's terms added into them (ops.add_gathered_lora_group)."""
    flat = x.reshape(-1, x.shape[-1])
    outs = [torch.nn.functional.linear(flat, w, b) for w, b in zip(weights, biases, strict=True)]
    outs = lorakit.layer.ops.add_gathered_lora_group(flat, outs, slots, tables)
    return [o.view(*x.shape[:-1], o.shape[-1]) for o in outs]


def _state_first(self, x, *args, **kwargs):
    """ours-state-first: the state and the layer's flags read first in every layer, then lorakit's forward."""
    if self.state.enabled and self.state.routing_now() is None and not (self.acts_on_weight or self.training):
        return _FORWARD(self, x, *args, **kwargs)
    return _FORWARD(self, x, *args, **kwargs)


def _inner(model, mode: str) -> torch.nn.Module:
    """The transformers model inside the mode's wrapper (lorakit's LoraModel.model, PEFT's base_model.model)."""
    return model.base_model.model if mode == "peft" else model if mode == "base" else model.model


def compiled(model, mode: str, args: argparse.Namespace):
    """--compile: the transformers model's forward under torch.compile with CUDA graphs (mode reduce-overhead: a
    step replays recorded kernels, no Python, no launches), the wrapper left as it is; every mode alike. With
    --interleave every mode's models stay alive, each compiled through a function of its own (own_code)."""
    if args.compile:
        inner = _inner(model, mode)
        forward = inner.forward
        if args.interleave:
            forward = own_code(forward, mode.replace("-", "_"))
        else:
            torch._dynamo.reset()  # the modes share transformers' forward: each compiles and counts recompiles afresh
        backend = "inductor" if args.device == "cuda" else "aot_eager"
        mode = "reduce-overhead" if args.device == "cuda" else None
        inner.forward = torch.compile(forward, backend=backend, mode=mode)
        if not args.interleave:
            _COMPILED.clear()
        _COMPILED[inner] = inner.forward
    return model


def own_code(forward: Callable, tag: str) -> Callable:
    """`forward` called through a function with a code object of its own. Dynamo keeps its compiled entries on the
    code it compiles: two models compiled through transformers' one forward would share them, and each step would
    first check the other model's guards."""
    space = {"forward": forward}
    exec(f"def forward_{tag}(*args, **kwargs):\n    return forward(*args, **kwargs)\n", space)  # noqa: S102
    return space[f"forward_{tag}"]


def _setup(case: str, mode: str, args: argparse.Namespace) -> tuple:
    """The mode's model for the case, built and compiled, its prompt and routing, and its result so far."""
    n_adapters = args.adapters if case == "decode-64" else 1
    names = [f"a{i}" for i in range(n_adapters)]
    layers = args.decode_layers if case == "decode-64" else args.layers
    start = time.perf_counter()
    base = build_model(argparse.Namespace(**{**vars(args), "layers": layers}), args.device)
    packed.PACK_DEVICES = () if mode == "ours-unpacked" else ("cuda",)  # the same code with and without buffers
    packed.SIBLINGS = () if mode == "ours-ungrouped" else SIBLINGS  # and without groups of siblings
    gathered.VECTOR_LOADS = mode != "ours-unaligned"  # and with the gathered kernels' element loads
    gathered.BESIDE = mode != "ours-one-stream"  # and with the terms after the base products, one stream
    gathered.STACKED = mode != "ours-unstacked"  # and with a tensor of its own for every layer's table
    lorakit.layer._with_terms = _in_place if mode == "ours-in-place" else _WITH_TERMS
    LoraLayer.forward = _state_first if mode == "ours-state-first" else _FORWARD
    lorakit.layer._stacked_a = (lambda spans: None) if mode == "ours-shrink-apart" else _STACKED_A
    model = compiled(adapt(mode, base, names, args.rank).eval(), mode, args)
    result: dict = {"layers": layers, "build_s": time.perf_counter() - start}
    rows = args.decode_batch if case == "decode-64" else args.batch
    length = args.decode_prompt if case == "decode-64" else args.seq
    prompt = torch.randint(0, args.vocab, (rows, length), device=args.device, generator=_generator(args, 1))
    routing = {}
    if mode != "base" and case == "decode-64":
        routing = {"adapter_names": [names[i % n_adapters] for i in range(rows)]}
    elif mode != "base":
        model.set_adapter(names[0])
    return model, prompt, routing, result


def measure(case: str, mode: str, args: argparse.Namespace) -> dict[str, float | torch.Tensor]:
    model, prompt, routing, result = _setup(case, mode, args)
    with torch.no_grad():
        if case == "one-adapter":

            def forward() -> object:
                return model(input_ids=prompt, use_cache=False)

            result["forward_ms"] = median_ms(forward, args.warmup, args.steps, args.device)
            if args.host and args.compile:  # the forward's host call, cut as a decode step's
                result.update({f"forward_{k}": v for k, v in host_split(forward, args).items()})
                host_profile(forward, f"{case} {mode} forwards", args)
            if mode in args.profile.split(","):
                print(f"== profile of {case} {mode}'s forward: " + profiled(forward, args), flush=True)
        result["decode_ms"], result["logits"], step = decode_ms(model, prompt, routing, args)
        if mode in args.profile.split(","):
            print(f"== profile of {case} {mode}'s decode step: " + profiled(step, args), flush=True)
        if args.host:
            print(f"== {case} {mode}", flush=True)
            result.update(host_report(step, args))
    return result


INTERLEAVED = ("base", "ours", "peft")  # modes that --interleave takes: none changes lorakit's switches


def interleaved(case: str, args: argparse.Namespace) -> dict[str, dict]:
    """--interleave: every mode's model of the case alive at once, their calls taking turns (alternating), so the
    process's drift over time (the host's pace moves by up to 1.4x between processes and within one) falls on
    every mode alike. The forwards first, then the decode steps, as measure() orders them."""
    setups = {mode: _setup(case, mode, args) for mode in args.modes.split(",")}
    results = {mode: setup[3] for mode, setup in setups.items()}
    with torch.no_grad():
        if case == "one-adapter":
            forwards = {mode: partial(_forward, model, prompt) for mode, (model, prompt, _, _) in setups.items()}
            for mode, ms in alternating(forwards, args).items():
                results[mode]["forward_ms"] = ms
        steps = {}
        for mode, (model, prompt, routing, _) in setups.items():
            steps[mode], results[mode]["logits"] = decode_step(model, prompt, routing, args)
        for mode, ms in alternating(steps, args).items():
            results[mode]["decode_ms"] = ms
    return results


def _forward(model, prompt: torch.Tensor) -> object:
    return model(input_ids=prompt, use_cache=False)


def alternating(calls: dict[str, Callable[[], object]], args: argparse.Namespace) -> dict[str, float]:
    """Median ms of each call, the calls taking turns: --warmup rounds, then --steps rounds of one call each, every
    call timed alone (the device drained before and after)."""
    sync = synchronizer(args.device)
    for _ in range(args.warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.steps):
        for name, call in calls.items():
            sync()
            start = time.perf_counter()
            call()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(spans) for name, spans in times.items()}


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _generator(args: argparse.Namespace, seed: int) -> torch.Generator:
    return torch.Generator(args.device).manual_seed(seed)


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Every (case, mode), base first so the others' logits compare with it; the JSON is rewritten after each.
    --interleave: every case's modes at once (interleaved)."""
    results: dict[str, dict[str, float]] = {}
    base_logits = {}
    cases, modes = args.cases.split(","), args.modes.split(",")
    pairs = [(case, None) for case in cases] if args.interleave else [(case, m) for m in modes for case in cases]
    for case, mode in pairs:
        try:
            by_mode = interleaved(case, args) if mode is None else {mode: measure(case, mode, args)}
        except Exception as err:  # kept in the JSON; the other cases still run (one GPU call, no second try)
            traceback.print_exc()
            failed = {"error": f"{type(err).__name__}: {err}"[:2000], "logits": None}
            by_mode = {m: dict(failed) for m in ([mode] if mode else modes)}
        for name, result in by_mode.items():
            logits = result.pop("logits")
            if name == "base":
                base_logits[case] = logits
            elif case in base_logits and logits is not None:
                result["logits_vs_base"] = (logits - base_logits[case]).abs().max().item()
            results[f"{case} {name}"] = result
            print(f"{case} {name}: " + ", ".join(f"{k} {_short(v)}" for k, v in result.items()), flush=True)
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        if args.json:
            write_json(args.json, args, results)
    return results


def environment(device: str) -> dict:
    """Device name and library versions, for the record every result carries."""
    import peft
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {"device": name, "versions": versions, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def write_json(path: str, args: argparse.Namespace, results: dict) -> None:
    with open(path, "w") as f:
        json.dump({**environment(args.device), "args": vars(args), "results": results}, f, indent=2)


def summary(results: dict[str, dict[str, float]]) -> None:
    print(f"{'case':<13}{'mode':<6}{'layers':>7} {'metric':<12}{'ms':>9}{'/ base':>8}{'logits vs base':>16}")
    for key, result in results.items():
        case, mode = key.split(" ")
        base = results.get(f"{case} base", {})
        if "error" in result:
            print(f"{case:<13}{mode:<6} failed: {result['error'][:200]}")
        for metric in ("forward_ms", "decode_ms"):
            if metric in result:
                ratio = f"{result[metric] / base[metric]:.3f}" if metric in base else "-"
                diff = f"{result['logits_vs_base']:.3g}" if "logits_vs_base" in result else "-"
                row = f"{case:<13}{mode:<6}{result['layers']:>7} {metric:<12}{result[metric]:>9.2f}{ratio:>8}{diff:>16}"
                print(row)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("layers", 16), ("hidden", 2048), ("intermediate", 8192), ("vocab", 128256), ("rank", 16)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--decode-layers", type=int, default=8, help="decode-64: layers (its setup is the slow part)")
    parser.add_argument("--adapters", type=int, default=64, help="decode-64: distinct adapters over the rows")
    parser.add_argument("--decode-batch", type=int, default=64, help="decode-64: rows")
    parser.add_argument("--decode-prompt", type=int, default=128, help="decode-64: prompt tokens per row in the cache")
    parser.add_argument("--batch", type=int, default=4, help="one-adapter: rows")
    parser.add_argument("--seq", type=int, default=512, help="one-adapter: prompt tokens per row")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--modes", default="base,ours,peft", help="base first: the others compare with it")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="every mode under torch.compile with CUDA graphs "
        "(reduce-overhead) and a static KV cache, as transformers' compiled generate runs",
    )
    parser.add_argument(
        "--profile", default="", help="modes whose decode step (and one-adapter forward) to profile, e.g. base,ours"
    )
    parser.add_argument(
        "--host",
        action="store_true",
        help="also time the host's share of a decode step (and of a compiled forward); print its profile",
    )
    parser.add_argument(
        "--recursive-dict-tags",
        action="store_true",
        help="dynamo's use_recursive_dict_tags_for_guards (skips the guards of modules whose dicts did not change)",
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help=f"every mode's model alive at once, their calls taking turns (modes among {','.join(INTERLEAVED)})",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny model on CPU, a few steps: a smoke run")
    parser.add_argument("--json", help="also write the results here (rewritten after every case)")
    if parser.parse_args().quick:  # its sizes are defaults: flags given beside --quick still win
        parser.set_defaults(**QUICK)
    args = parser.parse_args()
    for flag, given, known in (("--modes", args.modes, MODES), ("--cases", args.cases, CASES)):
        if not set(given.split(",")) <= set(known):
            parser.error(f"{flag} takes a comma-separated subset of {','.join(known)}, got {given!r}")
    if args.interleave and not set(args.modes.split(",")) <= set(INTERLEAVED):
        parser.error(f"--interleave takes modes among {','.join(INTERLEAVED)} (the others change lorakit's switches)")
    if args.interleave and (args.host or args.profile):
        parser.error("--interleave times the calls only: run --host and --profile without it")
    return args


def main() -> None:
    args = parse_args()
    if args.recursive_dict_tags:  # every mode alike
        torch._dynamo.config.use_recursive_dict_tags_for_guards = True
    torch.backends.cuda.matmul.allow_tf32 = True
    with sdpa_kernel(SERVING_ATTENTION):  # every mode alike, as lorakit serve runs: no cuDNN plan per key length
        results = run(args)
    device = environment(args.device)["device"]
    how = "torch.compile reduce-overhead (CUDA graphs), static cache" if args.compile else "eager"
    print(f"== decode_step_gpu: {device}, torch {torch.__version__}, r{args.rank} all-linear, bf16, {how}")
    summary(results)


if __name__ == "__main__":
    main()
