"""A sketch, not lorakit's code: one adapter's factors moved into one flat buffer (the factors become views of it),
each layer slicing it in the compiled graph at an offset kept on the layer (one graph input instead of two a
layer, no walk of the adapter structures). Adds mode 'packed' to decode_step_gpu.py.

Run (CUDA): PYTHONPATH=.:benchmarks python benchmarks/results/decode_step_gpu_h100_2026-11-27_one_packed_sketch.py \
    --cases one-adapter --modes base,ours,packed --compile --host
"""

import decode_step_gpu as d
import torch

import lorakit.layer as L
from lorakit import ops

PACK = {}
_orig_adapt = d.adapt
_orig_inner = d._inner


def _fast_forward(orig):
    def forward(self, x, *args, **kwargs):
        fast = self.__dict__.get("_fast")
        if fast is not None and torch.compiler.is_compiling() and not args and not kwargs:
            (oa, ra, ca), (ob, rb, cb), scale = fast
            pack = PACK["p"]
            A = pack[oa : oa + ra * ca].view(ra, ca)
            B = pack[ob : ob + rb * cb].view(rb, cb)
            base = self._modules["base_layer"]
            return ops.lora_linear(
                x, L._tensor(base, "weight"), L._tensor(base, "bias"), [ops.LoraFactors(A, B, scale, 0.0)], False
            )
        return orig(self, x, *args, **kwargs)

    return forward


def adapt(mode, model, names, rank):
    if mode != "packed":
        return _orig_adapt(mode, model, names, rank)
    lora = _orig_adapt("ours", model, names, rank)
    layers = [m for m in lora.modules() if isinstance(m, L.LoraLayer)]
    sizes = []
    for layer in layers:
        a = layer.adapters[names[0]]
        for n in ("lora_A", "lora_B"):
            sizes.append(-(-a._parameters[n].numel() // 64) * 64)
    p0 = layers[0].adapters[names[0]].lora_A
    pack = torch.empty(sum(sizes), dtype=p0.dtype, device=p0.device)
    off = 0
    for layer in layers:
        a = layer.adapters[names[0]]
        spans = []
        for n in ("lora_A", "lora_B"):
            p = a._parameters[n]
            k = p.numel()
            pack[off : off + k].copy_(p.detach().reshape(-1))
            p.data = pack[off : off + k].view(p.shape)
            spans.append((off, p.shape[0], p.shape[1]))
            off += -(-k // 64) * 64
        layer.__dict__["_fast"] = (spans[0], spans[1], float(a.scale))
    PACK["p"] = pack
    L.LoraLayer.forward = _fast_forward(L.LoraLayer.forward)
    return lora


def inner(model, mode):
    return _orig_inner(model, "ours" if mode == "packed" else mode)


d.adapt, d._inner = adapt, inner
d.MODES = d.MODES + ("packed",)
d.main()
