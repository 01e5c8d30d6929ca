"""A split-K decode kernel for y = x W^T + s (x A^T) B^T against cuBLAS's GEMV and lora_gemm, per Llama projection.

lora_gemm gives each program whole rows of W (all of K) for 16 or 32 outputs: 32-256 programs, each also reading
all of A for its shrink. Here a program takes a (K slice x BLOCK_N outputs) tile: its share of x W^T, of t = x A^T
(its slice of A only) and of s t B^T, which is linear in t, so the slices' terms add up to the whole. The slices
add into an fp32 workspace with atomics; the last slice of a column block to arrive (a counter) writes y in x's
dtype and leaves the workspace and counter at zero for the next launch (no memset, CUDA-graph safe).

4 rows, bf16, r16; CUDA-graph replays over 256 MB of weight copies so W comes from memory.
Run (CUDA): PYTHONPATH=. python benchmarks/splitk_gemv_gpu.py [--json PATH]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    from triton.testing import do_bench_cudagraph
except ImportError:
    sys.exit("benchmarks/splitk_gemv_gpu.py needs triton and a CUDA GPU")

from lorakit.ops.triton.lora_gemm import lora_gemm

SHAPES = {"q/o_proj": (2048, 2048), "k/v_proj": (2048, 512), "gate/up_proj": (2048, 8192), "down_proj": (8192, 2048)}


@triton.jit
def _splitk_kernel(
    x_ptr, w_ptr, a_ptr, b_ptr, y_ptr, acc_ptr, count_ptr,
    M, N, K, R, scale, stride_xm, stride_wn, stride_am, stride_bn, stride_ym,
    HAS_LORA: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    k_len = K // SPLIT  # K a multiple of SPLIT * BLOCK_K
    k_first = pid_k * k_len
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    m_in = rm[:, None] < M
    x_ptrs = x_ptr + rm[:, None] * stride_xm + (k_first + rk)[None, :]
    w_ptrs = w_ptr + rn[:, None] * stride_wn + (k_first + rk)[None, :]
    a_ptrs = a_ptr + rr[:, None] * stride_am + (k_first + rk)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for _ in range(0, k_len, BLOCK_K):
        x = tl.load(x_ptrs, mask=m_in, other=0.0)
        w = tl.load(w_ptrs)
        acc = tl.dot(x, tl.trans(w), acc)
        if HAS_LORA:
            a = tl.load(a_ptrs, mask=rr[:, None] < R, other=0.0)
            t_acc = tl.dot(x, tl.trans(a), t_acc)
            a_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_LORA:
        b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :], mask=rr[None, :] < R, other=0.0)
        acc += tl.dot(t_acc.to(x_ptr.dtype.element_ty), tl.trans(b)) * scale
    if SPLIT == 1:
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=m_in)
    else:
        tile = acc_ptr + rm[:, None] * N + rn[None, :]
        tl.atomic_add(tile, acc, mask=m_in, sem="relaxed")
        tl.debug_barrier()  # every thread's adds are issued before the one increment that releases them
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT - 1:  # the last slice: every other slice's adds are visible (acquire)
            total = tl.load(tile, mask=m_in, other=0.0, volatile=True)
            tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], total.to(y_ptr.dtype.element_ty), mask=m_in)
            tl.store(tile, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), mask=m_in)
            tl.atomic_xchg(count_ptr + pid_n, 0)


_WORK: dict = {}


def splitk(x, w, a, b, scale, block_n, block_k, split, warps, stages, lora=True):
    rows, n_in = x.shape
    n_out = w.shape[0]
    key = x.device
    if key not in _WORK:
        _WORK[key] = (torch.zeros(16 * 8192, device=x.device), torch.zeros(8192, device=x.device, dtype=torch.int32))
    acc, count = _WORK[key]
    y = x.new_empty(rows, n_out)
    grid = (triton.cdiv(n_out, block_n), split)
    _splitk_kernel[grid](
        x, w, a, b, y, acc, count, rows, n_out, n_in, a.shape[0], float(scale),
        x.stride(0), w.stride(0), a.stride(0), b.stride(0), y.stride(0),
        HAS_LORA=lora, SPLIT=split, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=16,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return y


def timed(call, copies: int) -> float:
    """Microseconds a call of call(i), i over the weight copies, CUDA-graph replays."""
    return 1e3 * do_bench_cudagraph(lambda: [call(i) for i in range(copies)], rep=200) / copies


@dataclass
class Projection:
    """One projection's operands (bf16, r16, s = 2): W in copies filling 256 MB, so timed calls read it from
    memory, and the float64 result every form is checked against."""

    ws: list[torch.Tensor]
    a: torch.Tensor
    b: torch.Tensor
    x: torch.Tensor
    scale: float
    expected: torch.Tensor

    def error(self, y: torch.Tensor) -> float | None:
        """The largest error of y where it is over 2% of the largest output, else None."""
        err = (y.double() - self.expected).abs().max().item()
        return err if err > 2e-2 * self.expected.abs().max().item() else None


def projection(n_in: int, n_out: int, rows: int) -> Projection:
    dtype, rank, scale = torch.bfloat16, 16, 2.0
    copies = max(1, (256 << 20) // (n_in * n_out * 2 * 2))
    ws = [torch.randn(n_out, n_in, device="cuda", dtype=dtype) / n_in**0.5 for _ in range(copies)]
    a = (torch.randn(rank, n_in, device="cuda") / n_in**0.5).to(dtype)
    b = (torch.randn(n_out, rank, device="cuda") * 0.1).to(dtype)
    x = torch.randn(rows, n_in, device="cuda", dtype=dtype)
    xd, wd, ad, bd = (t.double() for t in (x, ws[0], a, b))
    return Projection(ws, a, b, x, scale, xd @ wd.T + scale * (xd @ ad.T) @ bd.T)


def _shape(n_in: int, n_out: int, rows: int) -> dict:
    p = projection(n_in, n_out, rows)
    ws, a, b, x, scale, copies = p.ws, p.a, p.b, p.x, p.scale, len(p.ws)
    row = {
        "cublas_us": timed(lambda i: F.linear(x, ws[i]), copies),
        "lora_gemm_us": timed(lambda i: lora_gemm(x, ws[i], None, a, b, scale), copies),
    }
    timings = {}
    for config in itertools.product((32, 64, 128), (64, 128, 256), (1, 2, 4, 8, 16), (4,), (3,)):
        bn, bk, split, _, _ = config
        if n_in % (split * bk) or n_out % bn or not 64 <= (n_out // bn) * split <= 1024:
            continue
        what = "bn={} bk={} split={} warps={} stages={}".format(*config)
        try:
            for _ in range(3):  # the workspace must come back clean: every call equal
                if (err := p.error(splitk(x, ws[0], a, b, scale, *config))) is not None:
                    raise AssertionError(f"max error {err:.3g}")
            timings[what] = round(timed(lambda i, c=config: splitk(x, ws[i], a, b, scale, *c), copies), 2)
        except Exception as error:  # shared memory or registers the GPU cannot hold
            print(f"  skip {n_in}->{n_out} {what}: {type(error).__name__}: {str(error)[:100]}", flush=True)
    best = sorted((us, what) for what, us in timings.items())[:5]
    row["splitk_best"] = best
    if best:
        config = tuple(int(p.split("=")[1]) for p in best[0][1].split())
        row["splitk_bare_us"] = timed(lambda i: splitk(x, ws[i], a, b, scale, *config, lora=False), copies)
    row = {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}
    row["sweep"] = timings
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--rows", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    over_shapes(_shape, args.rows, results, args.json)


def over_shapes(shape, rows: int, results: dict, json_path: str | None) -> None:
    """shape(n_in, n_out, rows) for every projection into `results` (printed without any sweep), then the JSON."""
    for name, (n_in, n_out) in SHAPES.items():
        results[name] = shape(n_in, n_out, rows)
        print(name, {k: v for k, v in results[name].items() if k != "sweep"}, flush=True)
        torch.cuda.empty_cache()
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
