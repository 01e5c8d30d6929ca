"""The run behind decode_step_gpu_h200_2026-11-28_plans_m2_beside.log: in one process, decode_step_gpu.py's compiled
decode-64 step for the base, lorakit, the base again with lorakit's 64-adapter model alive beside it (built and
routed once eagerly, never compiled), and lorakit again with Python's collector frozen after compiling (gc.freeze).

Run (CUDA, from benchmarks/): PYTHONPATH=..:. python results/decode_step_gpu_h200_2026-11-28_plans_m2_beside.py
"""

import argparse
import gc
import sys

import torch
from torch.nn.attention import sdpa_kernel

sys.argv = [sys.argv[0], "--cases", "decode-64", "--compile", "--host"]
import decode_step_gpu as d  # noqa: E402
from mixed_batch_gpu import adapt  # noqa: E402
from train_step_gpu import build_model  # noqa: E402

KEYS = ("decode_ms", "host_ms", "unguarded_ms", "split_outside_ms", "split_frame_ms", "split_graph_ms")
KEYS += ("split_tree_ms", "split_replay_ms")


def beside(args: argparse.Namespace, kept: list) -> None:
    names = [f"a{i}" for i in range(args.adapters)]
    shape = argparse.Namespace(**{**vars(args), "layers": args.decode_layers})
    model = adapt("ours", build_model(shape, "cuda"), names, args.rank).eval()
    ids = torch.randint(0, args.vocab, (args.decode_batch, 4), device="cuda")
    with torch.no_grad():
        model(input_ids=ids, use_cache=False, adapter_names=[names[i % len(names)] for i in range(args.decode_batch)])
    kept.append(model)


def main() -> None:
    args, kept = d.parse_args(), []
    torch.backends.cuda.matmul.allow_tf32 = True
    with sdpa_kernel(d.SERVING_ATTENTION):
        for label in ("base", "ours", "base+ballast", "ours+freeze"):
            if label == "base+ballast":
                beside(args, kept)
            if label == "ours+freeze":
                plain = d.compiled

                def frozen(model, mode, a, plain=plain):
                    out = plain(model, mode, a)
                    gc.collect()
                    gc.freeze()
                    return out

                d.compiled = frozen
            result = d.measure("decode-64", label.split("+")[0], args)
            print("RESULT", label, " ".join(f"{k} {result.get(k, float('nan')):.4f}" for k in KEYS), flush=True)
            gc.collect()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
