"""How the gathered decode kernels load the factors: compiles them for an H100 (sm_90) without a GPU and counts the
global loads in their PTX by width. A factor's address comes from the table as an integer, so the compiler knows
nothing of its alignment unless told: 16-bit loads (`ld.global.b16`) are one element each, 128-bit ones
(`ld.global.v4`) eight bf16 at once.

    --pointer-hint  compiles them as if the table's addresses were declared 16-byte aligned on the pointer
                    (`tl.multiple_of(ptr, 16)` after the cast; the same hint on the integer does not reach the loads).
                    The expand's loads of B stay 16-bit: its rows' stride is the rank, read from the table, and
                    needs its own hint (`tl.multiple_of(rank, 8)`, in results/
                    decode_step_gpu_h100_2026-11-27_unrouted_tables.patch, which has both).

Needs torch and triton (CPU-only machines too: ptxas ships with triton). The shapes are decode-64's q_proj: bf16,
r16, 2048 inputs, 128-column shrink chunks, 256-output expand blocks (ops/triton/gathered.launch's tiles).

Run: PYTHONPATH=. python benchmarks/ptx_loads.py [--pointer-hint]
"""

from __future__ import annotations

import argparse
import re
import sys

try:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    sys.exit("benchmarks/ptx_loads.py needs triton (pip install triton==3.6.0; no GPU needed)")

from lorakit.ops.triton import gathered

WIDTHS = {"16-bit": r"ld\.global(\.nc)?\.b16", "64-bit": r"ld\.global(\.nc)?\.v2", "128-bit": r"ld\.global(\.nc)?\.v4"}


@triton.jit
def _hinted_address(raw, CODE: tl.constexpr):
    """gathered._address with the hint on the pointer it returns (a hint on a call's result is lost as the call is
    inlined, so the cast is repeated here)."""
    if CODE == 0:
        ptr = raw.to(tl.pointer_type(tl.bfloat16))
    elif CODE == 1:
        ptr = raw.to(tl.pointer_type(tl.float16))
    else:
        ptr = raw.to(tl.pointer_type(tl.float32))
    return tl.multiple_of(ptr, 16)


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
    parser.add_argument("--pointer-hint", action="store_true", help="addresses declared 16-byte aligned")
    args = parser.parse_args()
    if args.pointer_hint:
        gathered._address = _hinted_address  # the kernels look it up by name as they compile
    shrink = ptx(
        gathered._shrink_kernel,
        dict(x_ptr="*bf16", slots_ptr="*i32", entries_ptr="*i64", part_ptr="*fp32", n_tokens="i32", n_in="i32",
             chunk="i32"),
        dict(PATHS=1, BLOCK_R=16, BLOCK_K=128, CODE=0),
        aligned=(0, 1, 2, 3, 5, 6),
        warps=1,
    )  # fmt: skip
    expand = ptx(
        gathered._expand_kernel,
        dict(part_ptr="*fp32", slots_ptr="*i32", entries_ptr="*i64", out_ptr="*bf16", n_tokens="i32", n_out="i32"),
        dict(CHUNKS=16, PATHS=1, BLOCK_R=16, BLOCK_N=256, CODE=0),
        aligned=(0, 1, 2, 3, 5),
        warps=4,
    )
    print(f"triton {triton.__version__}, sm_90, pointer hint: {args.pointer_hint}")
    print(f"shrink global loads by width: {counts(shrink)}")
    print(f"expand global loads by width: {counts(expand)}")


if __name__ == "__main__":
    main()
