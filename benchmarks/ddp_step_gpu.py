"""Where a two-process training step loses time against one process: the same step under torchrun, five ways.

Each rank builds benchmarks/train_step_gpu.build_model (Llama-3.2-1B shape, seeded random bf16 weights), adds r16
all-linear LoRA with fp32 factors, runs under bf16 autocast with each decoder layer compiled, as `lorakit train`
does on CUDA with no flags (transformers' loss, clipping at 1.0, AdamW). Variants, in this order, each after
torch._dynamo.reset() so each compiles as it would alone:
  alone      every rank trains on its own, no communication: what two busy GPUs on one host cost by themselves
  ddp        torch's DistributedDataParallel with its defaults (buffers broadcast every forward, 25 MB buckets)
  ddp-small  DDP with 4 MB buckets: more of the reduction overlaps the backward, a smaller last bucket waits for it
  ddp-lean   DDP without the buffer broadcast, one bucket for every adapter gradient, gradients as bucket views
  allreduce  no wrapper: after backward, every gradient in one flat all-reduce (the adapter's are small)
A step: forward, backward, (communication), loss.item(), gradient norm read, AdamW step, the loop's host syncs.
Rank 0 reports the median step time of each; --profile VARIANT prints rank 0's top CUDA ops and the GPU's idle
share for one step of that variant.

Run (2 GPUs): torchrun --nproc_per_node=2 benchmarks/ddp_step_gpu.py [--json PATH]
Smoke run (CPU, gloo): torchrun --nproc_per_node=2 benchmarks/ddp_step_gpu.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from train_step_gpu import add_model_arguments, build_model

import lorakit
from lorakit.train import parallel

VARIANTS = ("alone", "ddp", "ddp-small", "ddp-lean", "allreduce")
QUICK = dict(layers=2, hidden=64, intermediate=128, vocab=512, batch=2, seq=32, steps=4, warmup=2)


def make_step(model, variant: str, device: torch.device, world: int):
    trainable = [p for p in model.parameters() if p.requires_grad]
    if variant == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=_ids(device))
    elif variant == "ddp-small":
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=_ids(device), bucket_cap_mb=4)
    elif variant == "ddp-lean":
        megabytes = sum(p.numel() * p.element_size() for p in trainable) / 2**20 + 1
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=_ids(device), broadcast_buffers=False, bucket_cap_mb=megabytes,
            gradient_as_bucket_view=True,
        )  # fmt: skip
    else:
        wrapped = model
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def step(ids: torch.Tensor) -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        if variant == "allreduce":
            grads = [p.grad for p in trainable]
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            flat /= world
            torch._foreach_copy_(grads, torch._utils._unflatten_dense_tensors(flat, grads))
        value = loss.item()
        norm = float(torch.nn.utils.clip_grad_norm_(trainable, 1.0))
        mean = torch.tensor([value], device=device)
        if variant != "alone":
            dist.all_reduce(mean)
        mean.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    return step


def _ids(device: torch.device) -> list[int] | None:
    return [device.index] if device.type == "cuda" else None


def run_variant(variant: str, args: argparse.Namespace, device: torch.device, rank: int, world: int) -> dict:
    torch._dynamo.reset()
    base = build_model(args, device=str(device.type))
    base.config.use_cache = False  # as the training loop sets it: no KV cache, so one compiled block serves every layer
    config = lorakit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    model = lorakit.get_lora_model(base, config).to(device)
    parallel.compile_blocks(model, "on", "inductor" if device.type == "cuda" else "aot_eager", device)
    step = make_step(model, variant, device, world)
    gen = torch.Generator(device).manual_seed(rank)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), device=device, generator=gen)
    times = []
    for i in range(args.warmup + args.steps):
        dist.barrier()
        start = time.perf_counter()
        step(ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    result = {"median_ms": 1000 * statistics.median(times), "ms": [round(1000 * t, 1) for t in times]}
    if args.profile == variant:
        result["profile"] = profile(step, ids, device, rank)
    del model, base, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def profile(step, ids: torch.Tensor, device: torch.device, rank: int) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        start = time.perf_counter()
        step(ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    if rank != 0:
        return ""
    events = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    busy = sum(getattr(e, key, 0) for e in events) / 1e3
    table = events.table(sort_by=key, row_limit=25)
    return f"wall {1000 * wall:.1f} ms, device busy (sum of kernels) {busy:.1f} ms\n{table}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--profile", default="", help="a variant to profile one step of, on rank 0")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    if parser.parse_args().quick:
        parser.set_defaults(**QUICK)
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.quick
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    results = {}
    for variant in args.variants.split(","):
        results[variant] = run_variant(variant, args, device, rank, world)
        if rank == 0:
            shown = {k: v for k, v in results[variant].items() if k != "profile"}
            print(f"{variant}: {shown}", flush=True)
            if results[variant].get("profile"):
                print(results[variant]["profile"], flush=True)
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "world": world, "results": results}, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
