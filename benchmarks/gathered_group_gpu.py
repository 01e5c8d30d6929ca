"""A decode-64 layer's projections, base product and routed terms, per group of siblings (Llama-3.2-1B's shape).

64 token rows, each on its own adapter of 64 (r16, bf16), one decode step of one layer, per group of projections
that share an input (q, k, v; o; gate, up; down):
  base      the base model's own GEMVs (cuBLAS), one a projection
  apart     cuBLAS, then the gathered shrink and expand of each projection (decode-64 before groups)
  grouped   cuBLAS, then one shrink and one expand for the whole group (ops/triton/gathered.launch_group, what
            lorakit runs); --sweep tries its tiles and prints the best
  beside    the group's shrink on a second stream while cuBLAS runs, the expand after both (a graph's branches)
  terms     lorakit's ops.gathered_linear_group (triton's gathered_linear_group_): the group's shrink and expand
            (its terms apart, fp32) on a second stream while cuBLAS runs, then the terms added to the base outputs;
            terms-unadded without that last add (what lorakit ships: the graph's add can go into the kernel that
            reads the output next)
Timing: triton.testing.do_bench_cudagraph (as a compiled decode step replays it), over --copies copies of the
weights and adapters in turn, so they come from memory, not L2. Every form is checked against float64 math.

Run (CUDA): PYTHONPATH=.:benchmarks python benchmarks/gathered_group_gpu.py [--sweep] [--json PATH]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import torch.nn.functional as F

try:
    from triton.testing import do_bench_cudagraph
except ImportError:
    sys.exit("benchmarks/gathered_group_gpu.py needs triton and a CUDA GPU")

from gathered_gpu import _tables

from lorakit.ops import reference
from lorakit.ops.reference import LoraFactors
from lorakit.ops.triton.gathered import _expand, _shrink, gathered_linear_group_, launch, launch_group, partials_for

GROUPS = {  # input size, the outputs of each projection
    "q,k,v": (2048, (2048, 512, 512)),
    "o": (2048, (2048,)),
    "gate,up": (2048, (8192, 8192)),
    "down": (8192, (2048,)),
}
TILE_NAMES = ("chunk_cols", "shrink_warps", "expand_cols", "expand_warps")
SWEEP = [  # the shrink's tiles with the expand's defaults, then the other way round
    *((c, w, 256, 4) for c, w in itertools.product((256, 512, 1024, 2048), (2, 4, 8))),
    *((512, 8, n, w) for n, w in itertools.product((64, 128, 256, 512), (2, 4, 8))),
]


def _time(call, copies: int) -> float:
    return 1000 * do_bench_cudagraph(lambda: [call(i) for i in range(copies)], rep=60) / copies  # us


def _group(n_in: int, sizes: tuple[int, ...], args) -> dict:
    parts = [_tables(n_in, n, args) for n in sizes]  # each part's tables, a copy each
    copies = []
    for i in range(args.copies):
        weights = [torch.randn(n, n_in, device="cuda").bfloat16() / n_in**0.5 for n in sizes]
        copies.append((weights, [tables[i] for tables in parts]))
    x = torch.randn(args.rows, n_in, device="cuda").bfloat16()
    slots = (torch.arange(args.rows, device="cuda", dtype=torch.int32) % args.adapters)[:, None]
    weights, tables = copies[0]
    want = []
    for w, t in zip(weights, tables, strict=True):
        wide = [LoraFactors(f.lora_A.double(), f.lora_B.double(), f.scale, 0.0) for f in t.factors]
        want.append(reference.add_gathered_lora(F.linear(x.double(), w.double()), x.double(), slots, wide))
    first = tables[0]

    def base(i):
        return [F.linear(x, w) for w in copies[i][0]]

    def apart(i):
        outs = base(i)
        for out, t in zip(outs, copies[i][1], strict=True):
            launch(out, x, slots, t.entries, t.block_r, t.code, t.aligned)
        return outs

    def grouped(i, tiles=()):
        outs = base(i)
        entries = [t.entries for t in copies[i][1]]
        launch_group(outs, x, slots, entries, first.block_r, first.code, first.aligned, *tiles)
        return outs

    side, spec = torch.cuda.Stream(), (first.block_r, first.code, first.aligned)

    def beside(i):
        main, entries = torch.cuda.current_stream(), [t.entries for t in copies[i][1]]
        part = partials_for(x, slots, len(entries), first.block_r, first.aligned)  # made on the stream that frees it
        side.wait_stream(main)
        with torch.cuda.stream(side):
            _, chunks = _shrink(x, slots, entries, first.block_r, first.code, first.aligned, part=part)
        outs = base(i)
        main.wait_stream(side)
        _expand(outs, part, chunks, slots, entries, first.block_r, first.code, first.aligned)
        return outs

    def terms(i, add=True):  # what lorakit runs: its op, recorded with the terms beside the base products
        weights, entries = copies[i][0], [t.entries for t in copies[i][1]]
        made = gathered_linear_group_(x, weights, [None] * len(weights), slots, entries, *spec)
        outs, apart = made[: len(weights)], made[len(weights) :]
        return [o.add_(d) for o, d in zip(outs, apart, strict=True)] if add else outs

    def error(outs) -> float:
        return max(((o.double() - r).abs().max() / r.abs().max()).item() for o, r in zip(outs, want, strict=True))

    row = {}
    forms = (("base", base), ("apart", apart), ("grouped", grouped), ("beside", beside), ("terms", terms))
    for name, form in (*forms, ("terms-unadded", lambda i: terms(i, add=False))):
        if name not in ("base", "terms-unadded"):
            row[f"{name}_max_rel_error"] = error(form(0))
        row[f"{name}_us"] = _time(form, args.copies)
    if args.sweep:
        timed = {}
        for tiles in SWEEP:
            try:
                if error(grouped(0, tiles)) > 0.02:
                    continue
                timed[tiles] = _time(lambda i, t=tiles: grouped(i, t), args.copies)
            except Exception as e:  # a tile the card cannot hold (shared memory)
                print("  skipped", tiles, type(e).__name__, flush=True)
        best = min(timed, key=timed.get)
        row["grouped_sweep_best"] = dict(zip(TILE_NAMES, best, strict=True))
        row["grouped_sweep_best_us"] = timed[best]
        row["grouped_sweep"] = {str(k): round(v, 2) for k, v in sorted(timed.items(), key=lambda kv: kv[1])[:8]}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--copies", type=int, default=4, help="copies of the weights and adapters, used in turn")
    parser.add_argument("--groups", default=";".join(GROUPS), help="';'-separated, of: " + " ".join(GROUPS))
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {}
    for name in args.groups.split(";"):
        n_in, sizes = GROUPS[name]
        results[name] = row = _group(n_in, sizes, args)
        print(name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    forms = ("base", "apart", "grouped", "beside", "terms", "terms-unadded")
    summary = {f: sum(r[f"{f}_us"] for r in results.values()) for f in forms}
    print("a layer's projections, us:", {k: round(v, 2) for k, v in summary.items()}, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
