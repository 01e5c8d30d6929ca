import torch
from lorakit.ops import gather_table, reference
from lorakit.ops.reference import LoraFactors
from lorakit.ops.triton import gathered as G
dev = "cuda"
for paths, n_in, n_out, dtype, ranks in [(1, 2048, 512, torch.bfloat16, [16]*8), (3, 100, 33, torch.float32, [1, 7, 16, 3, 40]),
                                         (2, 2048, 520, torch.bfloat16, [8, 16, 64, 128]), (1, 8192, 2048, torch.float16, [16]*4)]:
    torch.manual_seed(0)
    factors = []
    for g, r in enumerate(ranks):
        a = (torch.randn(r, n_in, device=dev) / n_in**0.5).to(dtype); b = (torch.randn(n_out, r, device=dev) / r**0.5).to(dtype)
        factors.append(None if g == 2 else LoraFactors(a, b, 0.5 + g, 0.0))
    table = gather_table(factors)
    x = torch.randn(37, n_in, device=dev).to(dtype); out = torch.randn(37, n_out, device=dev).to(dtype)
    slots = torch.randint(-1, len(ranks), (37, paths), dtype=torch.int32, device=dev)
    want = reference.add_gathered_lora(out.double(), x.double(), slots, [None if f is None else LoraFactors(f.lora_A.double(), f.lora_B.double(), f.scale, 0.) for f in factors])
    for ppr in [None, 1, 3]:
        got = out.clone()
        G.launch_fused(got, x, slots, table.entries, table.block_r, table.code, table.aligned, programs_per_row=ppr)
        base = ((slots == 2) | (slots < 0)).all(-1)
        print(paths, n_in, n_out, dtype, ppr, table.aligned, f"rel err {((got.double() - want).abs().max() / want.abs().max()).item():.2e}", torch.equal(got[base], out[base]), flush=True)
