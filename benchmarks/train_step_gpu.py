"""GPU training step: lorakit vs PEFT on a Llama-3.2-1B-shaped model (random weights from config), in one run.

Modes (each on a fresh model, same seed, bf16 base; "-drop" = lora_dropout 0.1, else 0):
  hf-frozen            the base model, frozen, forward + backward to the input embeddings (the eager floor)
  hf-frozen-compiled   the same under torch.compile (the compiled floor)
  peft-default         PEFT as a user gets it: fp32 adapters (autocast_adapter_dtype), eager
  peft-compiled        PEFT with bf16 adapters + torch.compile (PEFT-best)
  ours-default         lorakit with no flags: fp32 factors, eager (the fused op on CUDA)
  ours-eager           lorakit with bf16 adapters, eager
  ours-compiled        lorakit with bf16 adapters + torch.compile
  ours-compiled-fp32   lorakit with fp32 factors + torch.compile
  ours-compiled-drop   ours-compiled with dropout 0.1
  ...-dora             any mode with use_dora=True (DoRA), e.g. ours-compiled-head-dora against ours-compiled-head
  ours-compiled-head   bf16 adapters, the decoder under torch.compile, then lorakit's chunked head + loss
                       (lorakit.train.tasks.FusedHead, what `lorakit train` scores a causal LM with): our best
  ours-default-head    fp32 factors, eager decoder, the chunked head + loss
  ours-train-default   what `lorakit train` runs on CUDA with no flags: fp32 factors, bf16 autocast, each decoder
                       layer compiled (train.parallel.compile_blocks, run.compile=auto), the chunked head + loss at
                       the library's chunk size, gradient clipping at 1.0 (optim.max_grad_norm), AdamW; with
                       --compile-mode, run.compile_mode (reduce-overhead: each layer replayed as CUDA graphs)
  ours-reference-...   any ours-* mode with LORAKIT_KERNELS=0 (the pure-torch reference ops)
The HF and PEFT modes take transformers' own loss (model(input_ids, labels=...).loss); the *-head modes take
FusedHead's mean loss, the same quantity (tests/test_head_loss.py checks it to 1e-5 with the gradients):
first_loss and first_grad_norm (the first step's, before any optimizer step) must match the twin mode without
the head (ours-compiled-head ~ ours-compiled, ours-default-head and ours-train-default ~ ours-default).
layer0_grad_norm in the results is the first layer's gradient norm: nonzero proves the backward reaches it.
Reports the median step time (forward, backward, AdamW step), peak memory and its excess over the compiled
floor, and ratios against PEFT-best and PEFT default (tokens/s ratios: the same tokens per step).
--chunk-rows R[:eager|:generic],... times the *-head modes named by --sweep again at R rows per head chunk (":eager":
the written-out chunk loss not compiled, ":generic": through the module and autograd as a LoRA head runs), on the
same model. --profile MODE prints that mode's top CUDA ops. The JSON is rewritten after every mode, and
--time-budget S skips the modes that would not end in S seconds, so a time-limited run keeps its table.

Run (on a CUDA machine): python benchmarks/train_step_gpu.py [--quick] [--modes a,b] [--chunk-rows 512,2048]
    [--json PATH]
CPU smoke run (tiny model, seconds; compiles with aot_eager): python benchmarks/train_step_gpu.py --device cpu --quick
    [--dtype float32: the *-head modes' first loss equals their twins' to fp32 rounding]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

DEFAULT_MODES = "hf-frozen,hf-frozen-compiled,peft-default,ours-default,peft-compiled,ours-compiled,ours-compiled-drop"
TWINS = {
    "ours-compiled-head": "ours-compiled",
    "ours-default-head": "ours-default",
    "ours-train-default": "ours-default",
}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options build_model reads: the Llama-3.2-1B shape by default."""
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128256)


def build_model(args: argparse.Namespace, device: str = "cuda"):
    """The Llama-shaped model of `args`, seeded random bf16 weights (device "cpu": other scripts' smoke runs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=args.vocab,
        tie_word_embeddings=True,
        max_position_embeddings=max(args.seq, 2048),
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, getattr(args, "dtype", "bfloat16")))
    return model


def adapt(mode: str, model, args: argparse.Namespace):
    if mode.startswith("hf-frozen"):
        model.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)  # gradients flow through every layer
        return model
    dropout = 0.1 if "-drop" in mode else 0.0
    dora = "-dora" in mode
    fp32 = "default" in mode or "fp32" in mode
    if mode.startswith("peft"):
        import peft

        config = peft.LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, lora_dropout=dropout, target_modules="all-linear", use_dora=dora
        )
        return peft.get_peft_model(model, config, autocast_adapter_dtype=fp32)
    from lorakit import LoraConfig, get_lora_model

    config = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=dropout, target_modules="all-linear", use_dora=dora
    )
    return get_lora_model(model, config, adapter_dtype=None if fp32 else torch.bfloat16)


def is_head_mode(mode: str) -> bool:
    return "-head" in mode or is_train_default(mode)


def is_train_default(mode: str) -> bool:
    """ours-train-default and its variants (-dora, -drop): what `lorakit train` runs."""
    return mode.startswith("ours-train-default")


def loss_function(mode: str, model, ids: torch.Tensor, args: argparse.Namespace):
    """(a function giving the step's loss, the FusedHead it scores through or None) for `mode`."""
    if not is_head_mode(mode):
        step_fn = torch.compile(model, backend=args.backend, mode=args.compile_mode) if "compiled" in mode else model
        return (lambda: step_fn(input_ids=ids, labels=ids).loss), None
    from lorakit.head_loss import chunk_rows
    from lorakit.train import parallel
    from lorakit.train.tasks import FusedHead

    base = model.model  # LoraModel -> the transformers causal LM
    decoder, head = base.model, base.get_output_embeddings()
    if is_train_default(mode):  # run.compile=auto: each decoder layer, on CUDA only
        base.config.use_cache = False  # as the loop does: else every layer guards on its own cache slot
        parallel.compile_blocks(model, "auto", args.backend, torch.device(args.device), args.compile_mode or "default")
    elif "compiled" in mode:
        decoder = torch.compile(decoder, backend=args.backend, mode=args.compile_mode)
    fused = FusedHead(decoder, head, chunk_rows(args.vocab, args.device))
    batch = {"input_ids": ids, "labels": ids}
    autocast = is_train_default(mode) and args.device == "cuda"  # optim.precision=auto: bf16 autocast on GPU

    def loss() -> torch.Tensor:
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=autocast):
            return fused.score(batch).mean_loss()

    return loss, fused


def measure(mode: str, args: argparse.Namespace) -> dict[str, dict]:
    """{mode: result} and, for a swept *-head mode, {mode@point: result} per --chunk-rows point."""
    from lorakit.train import parallel

    os.environ["LORAKIT_KERNELS"] = "0" if "-reference" in mode else "1"
    started = time.perf_counter()
    model = adapt(mode, build_model(args, args.device), args).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device,
                        generator=torch.Generator(args.device).manual_seed(1))  # fmt: skip
    loss_fn, fused = loss_function(mode, model, ids, args)
    clip = is_train_default(mode)  # optim.max_grad_norm = 1.0
    graphs = parallel.replays_graphs(args.compile_mode or "default") and args.device == "cuda"

    def step(record: dict | None = None) -> None:
        if graphs:  # as lorakit train's loop does under CUDA graphs, for every mode alike
            torch.compiler.cudagraph_mark_step_begin()
        missing = [p.grad is None for p in params] if graphs else []
        loss = loss_fn()
        loss.backward()
        if graphs:
            parallel.graph_safe_gradients(params, missing)
        if record is not None:  # the first step, before the optimizer moves anything: the same in twin modes
            record["first_loss"] = loss.item()
            record["first_grad_norm"] = (
                torch.stack([p.grad.float().norm() for p in params if p.grad is not None]).norm().item()
            )
        if clip:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    first: dict = {}
    step(first)
    result = {**time_steps(step, args.warmup - 1, args.steps, args.device), **first}
    result["setup_s"] = time.perf_counter() - started  # building, compiling and timing
    result["trainable"] = sum(p.numel() for p in params)
    result["layer0_grad_norm"] = _first_layer_grad_norm(model, loss_fn)
    results = {mode: result}
    if fused is not None and mode in args.sweep.split(","):
        results.update(sweep(mode, fused, step, args))
    if mode in (args.profile or "").split(","):
        _profile(step)
    return results


def time_steps(step: Callable[[], None], warmup: int, steps: int, device: str) -> dict[str, float | None]:
    """Median step time after `warmup` steps, and the peak memory of the timed steps (CUDA only)."""
    for _ in range(warmup):
        step()
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    reserved = torch.cuda.max_memory_reserved() / 2**30 if device == "cuda" else None  # CUDA graph pools count here
    return {"median_ms": 1000 * statistics.median(times), "peak_gib": peak, "peak_reserved_gib": reserved}


def sweep(mode: str, fused, step: Callable[[], None], args: argparse.Namespace) -> dict[str, dict]:
    """The same model and compiled decoder timed at each --chunk-rows point: only the head's chunking changes."""
    head, rows, compiled = fused.head, fused.chunk_rows, fused.compiled
    out = {}
    for point in filter(None, args.chunk_rows.split(",")):
        size, _, variant = point.partition(":")
        fused.chunk_rows = int(size)
        fused.compiled = False if variant == "eager" else None
        fused.head = nn.Sequential(head) if variant == "generic" else head  # not a plain Linear: the module path
        out[f"{mode}@{point}"] = {**time_steps(step, 2, max(3, args.steps // 2), args.device), "chunk_rows": int(size)}
        print(f"{mode}@{point}: {out[f'{mode}@{point}']}", flush=True)
    fused.head, fused.chunk_rows, fused.compiled = head, rows, compiled
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _first_layer_grad_norm(model, loss_fn) -> float:
    """The gradient norm of the first decoder layer's trainable tensors after one more backward: 0 would mean
    the backward stopped before reaching it (a broken input gradient), which no step time may hide."""
    loss_fn().backward()
    grads = [p.grad for n, p in model.named_parameters() if ".layers.0." in n and p.grad is not None]
    if not grads:  # the frozen base: its embeddings carry the gradient instead
        grads = [model.get_input_embeddings().weight.grad]
    norm = torch.stack([g.float().norm() for g in grads]).norm().item()
    model.zero_grad(set_to_none=True)
    return norm


def _profile(step) -> None:
    """The top CUDA ops of three steps: where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))


def measure_fresh(mode: str, args: argparse.Namespace) -> dict[str, dict]:
    """One mode, then everything it allocated or compiled is released before the next."""
    results = measure(mode, args)
    print(f"{mode}: {results[mode]}", flush=True)
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return results


def summary(results: dict[str, dict]) -> None:
    """The table: time, peak and its excess over the compiled floor, ratios (tokens/s) against both PEFT modes."""
    floor = results.get("hf-frozen-compiled", {}).get("peak_gib")
    print(f"{'mode':<34}{'step ms':>9}{'peak GiB':>10}{'- floor':>9}{'PEFT-best/ours':>15}{'PEFT-default/ours':>18}")
    for mode, r in results.items():
        peak = r["peak_gib"]
        print(f"{mode:<34}{r['median_ms']:>9.1f}", end="")
        print(f"{peak:>10.2f}" if peak is not None else f"{'-':>10}", end="")
        print(f"{peak - floor:>+9.2f}" if peak is not None and floor is not None else f"{'-':>9}", end="")
        for baseline, width in (("peft-compiled", 15), ("peft-default", 18)):
            ms = results.get(baseline, {}).get("median_ms")
            print(f"{ms / r['median_ms']:>{width}.3f}" if ms else f"{'-':>{width}}", end="")
        print()
    for mode, twin in TWINS.items():
        if mode in results and twin in results:
            a, b = results[mode], results[twin]
            loss, norm = (f"{a[k]:.6f} vs {b[k]:.6f} (rel {abs(a[k] / b[k] - 1):.1e})" for k in ("first_loss",
                          "first_grad_norm"))  # fmt: skip
            print(f"{mode} vs {twin}, first step: loss {loss}, gradient norm {norm}")
    for mode, r in results.items():  # the variant targets: a mode against the same mode without its suffix
        for suffix, target in (("-dora", 1.15), ("-drop", 1.05)):
            plain = mode.replace(suffix, "")
            if suffix in mode and "@" not in mode and plain in results:
                ratio = r["median_ms"] / results[plain]["median_ms"]
                print(f"{mode} / {plain}: {ratio:.3f}x step time (issue 11 target <= {target}x)")


def write_json(path: str, args: argparse.Namespace, results: dict[str, dict]) -> None:
    import peft
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    if args.device == "cuda":
        import triton

        versions["triton"] = triton.__version__
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    record = {"device": device, "versions": versions, "args": vars(args)}
    with open(path, "w") as f:
        json.dump({**record, "results": results}, f, indent=2)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--modes", default=DEFAULT_MODES)
    parser.add_argument("--chunk-rows", default="", help="head chunk sizes to time the --sweep modes at again, "
                        "e.g. 256,1024,4096,523:eager,523:generic")  # fmt: skip
    parser.add_argument("--sweep", default="ours-compiled-head", help="the *-head modes --chunk-rows applies to")
    parser.add_argument("--profile", help="print the top CUDA ops of these modes (comma-separated)")
    parser.add_argument("--quick", action="store_true", help="2 layers, short sequences (CPU: a tiny model)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="the base's dtype")
    parser.add_argument("--backend", help="torch.compile's backend (default: inductor; aot_eager on CPU, where "
                        "inductor's C++ builds take longer than the smoke run)")  # fmt: skip
    parser.add_argument("--compile-mode", help="torch.compile's mode for every compiled mode, PEFT's and ours "
                        "(e.g. reduce-overhead: CUDA graphs; default: torch's default)")  # fmt: skip
    parser.add_argument("--json", help="also write the results here (after every mode)")
    parser.add_argument("--time-budget", type=float, help="seconds: skip a mode that might end later than this, "
                        "judged by the longest mode so far (the table still prints)")  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.layers, args.seq, args.steps, args.warmup = 2, 256, 5, 2
    if args.quick and args.device == "cpu":
        args.hidden, args.intermediate, args.vocab, args.batch, args.seq = 128, 256, 1024, 2, 64
    args.backend = args.backend or ("inductor" if args.device == "cuda" else "aot_eager")
    return args


def main() -> None:
    args = parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    results: dict[str, dict] = {}
    started, longest = time.perf_counter(), 0.0
    for mode in args.modes.split(","):
        if args.time_budget and time.perf_counter() - started + longest > args.time_budget:
            print(f"{mode}: skipped, it might not end within --time-budget {args.time_budget} s", flush=True)
            continue
        begun = time.perf_counter()
        results.update(measure_fresh(mode, args))
        longest = max(longest, time.perf_counter() - begun)
        if args.json:
            write_json(args.json, args, results)
    where = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{where}, torch {torch.__version__}, batch {args.batch}x{args.seq}, r{args.rank}, {args.dtype} base")
    summary(results)


if __name__ == "__main__":
    main()
