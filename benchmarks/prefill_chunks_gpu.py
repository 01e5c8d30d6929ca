"""The one-adapter inference composite at prefill sizes, whole and in row chunks, against the base GEMM alone.

y = x W^T + s (x A^T) B^T through cuBLAS (lorakit.ops.triton.fused_linear._inference): t = x A^T, u = t B^T, then
x W^T accumulated onto u by the GEMM's beta epilogue. At 2048 rows u is as large as y, written by one GEMM and read
back by the next, which is most of the composite's cost over the base. In chunks of rows the u of one chunk may
still be in L2 when the large GEMM reads it; each chunk's three GEMMs are launched in turn.

bf16, r16, CUDA-graph replays over copies of the weights (256 MB) so W comes from memory.
Run (CUDA): PYTHONPATH=. python benchmarks/prefill_chunks_gpu.py [--rows 2048] [--json PATH]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from splitk_gemv_gpu import over_shapes, projection, timed  # the same operands, checks and timing


def composite(x, w, a, b, scale, chunk: int):
    """lorakit's composite over row chunks of `chunk` rows (all rows: as it ships)."""
    y = x.new_empty(x.shape[0], w.shape[0])
    for start in range(0, x.shape[0], chunk):
        xc = x[start : start + chunk]
        yc = y[start : start + chunk]
        torch.mm(torch.mm(xc, a.T), b.T, out=yc)
        yc.addmm_(xc, w.T, beta=scale)
    return y


def base_then_term(x, w, a, b, scale):
    """x W^T first, then s t B^T added in place (a K=16 GEMM reading and writing y)."""
    return torch.mm(x, w.T).addmm_(torch.mm(x, a.T), b.T, alpha=scale)


def _shape(n_in: int, n_out: int, rows: int) -> dict:
    p = projection(n_in, n_out, rows)
    ws, a, b, x, scale, copies = p.ws, p.a, p.b, p.x, p.scale, len(p.ws)
    row = {"base_us": timed(lambda i: F.linear(x, ws[i]), copies)}
    forms = {f"chunks of {c}": (lambda i, c=c: composite(x, ws[i], a, b, scale, c)) for c in (rows, 1024, 512, 256)}
    forms["base, then the term in place"] = lambda i: base_then_term(x, ws[i], a, b, scale)
    for name, call in forms.items():
        if (err := p.error(call(0))) is not None:
            raise AssertionError(f"{n_in}->{n_out} {name}: max error {err:.3g}")
        row[name] = timed(call, copies)
    row = {k: round(v, 2) for k, v in row.items()}
    row.update({f"{k} / base": round(v / row["base_us"], 3) for k, v in row.items() if k != "base_us"})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": args.rows}
    over_shapes(_shape, args.rows, results, args.json)


if __name__ == "__main__":
    main()
