"""How the gathered decode kernels load the factors: compiles them for an H100 (sm_90) without a GPU and counts the
global loads in their PTX by width. A factor's address comes from the table as an integer, so the compiler knows
nothing of its alignment unless told: 16-bit loads (`ld.global.b16`) are one element each, 128-bit ones
(`ld.global.v4`) eight bf16 at once.

    --aligned   compiles them with ALIGNED (GatherTable.aligned: every address and row 16-byte aligned), which
                declares the pointers aligned (`tl.multiple_of(ptr, 16)` on the cast, inside gathered._address: the
                same hint on the integer, or on the caller's copy, does not reach the loads) and B's row stride, the
                rank read from the table, a multiple of 8 elements.

Needs torch and triton (CPU-only machines too: ptxas ships with triton). The shapes are decode-64's q_proj: bf16,
r16, 2048 inputs, 128-column shrink chunks, 256-output expand blocks (ops/triton/gathered.launch's tiles).

Run: PYTHONPATH=. python benchmarks/ptx_loads.py [--aligned]
"""

from __future__ import annotations

import argparse
import re
import sys

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    sys.exit("benchmarks/ptx_loads.py needs triton (pip install triton==3.6.0; no GPU needed)")

from lorakit.ops.triton import gathered

WIDTHS = {"16-bit": r"ld\.global(\.nc)?\.b16", "64-bit": r"ld\.global(\.nc)?\.v2", "128-bit": r"ld\.global(\.nc)?\.v4"}


def ptx(kernel, signature: dict[str, str], constants: dict, aligned: tuple[int, ...], warps: int) -> str:
    """The kernel's PTX for sm_90, the `aligned` arguments (pointers, and ints divisible by 16) marked as the
    launcher marks them."""
    signature = {**signature, **{name: "constexpr" for name in constants}}
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]


def counts(text: str) -> dict[str, int]:
    return {name: len(re.findall(pattern, text)) for name, pattern in WIDTHS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--aligned", action="store_true", help="addresses and rows declared 16-byte aligned")
    args = parser.parse_args()
    shrink = ptx(
        gathered._shrink_kernel,
        dict(x_ptr="*bf16", slots_ptr="*i32", e0="*i64", e1="*i64", e2="*i64", part_ptr="*fp32", n_tokens="i32",
             n_in="i32", chunk="i32", chunks="i32"),
        dict(PARTS=1, PATHS=1, BLOCK_R=16, BLOCK_K=128, CODE=0, ALIGNED=args.aligned),
        aligned=(0, 1, 2, 3, 4, 5, 7, 8),
        warps=1,
    )  # fmt: skip
    expand = ptx(
        gathered._expand_kernel,
        dict(part_ptr="*fp32", slots_ptr="*i32", e0="*i64", e1="*i64", e2="*i64", y0="*bf16", y1="*bf16",
             y2="*bf16", n0="i32", n1="i32", n2="i32", n_tokens="i32"),
        dict(CHUNKS=16, PARTS=1, PATHS=1, BLOCK_R=16, BLOCK_N=256, CODE=0, ALIGNED=args.aligned),
        aligned=(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10),
        warps=4,
    )  # fmt: skip
    print(f"triton {triton.__version__}, sm_90, aligned: {args.aligned}")
    print(f"shrink global loads by width: {counts(shrink)}")
    print(f"expand global loads by width: {counts(expand)}")


if __name__ == "__main__":
    main()
