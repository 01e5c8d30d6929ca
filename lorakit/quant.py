"""QLoRA's base storage (Dettmers et al. 2023): 4-bit NormalFloat weights with double quantization.

    W ≈ NF4[code] * absmax           codes: 4 bits per weight, absmax: one per block of 64 weights
    absmax ≈ int8 * scale + offset   double quantization: absmax in 8 bits, one fp32 scale per 256 blocks

About 0.52 byte per weight (0.5 for codes, 1/64 for absmax, 4/16384 for the scales). Pure PyTorch, so CPU
CI tests the math; on CUDA with bitsandbytes installed, `backend="bitsandbytes"` stores the weight in
bitsandbytes' Linear4bit format and uses its kernels. LoRA wraps an NF4Linear like any linear layer:
forward = dequantized-linear + the adapters. Merging dequantizes, adds dW and stores the result 4-bit
again; `dequantize_model` exports 16-bit (merge after it for an exact merge).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BLOCK = 64  # weights per absmax
SCALE_BLOCK = 256  # absmax values per second-level scale

# The 16 NF4 levels: quantiles of N(0, 1) rescaled to [-1, 1], with an exact zero (QLoRA, appendix E).
NF4_LEVELS = torch.tensor(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0]
)  # fmt: skip


def quantize_nf4(weight: Tensor) -> dict[str, Tensor]:
    """Semantics: per block of 64, code = nearest NF4 level of w / absmax; absmax double-quantized to int8."""
    flat = weight.detach().float().flatten()
    pad = (-flat.numel()) % BLOCK
    blocks = F.pad(flat, (0, pad)).reshape(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    levels = NF4_LEVELS.to(flat.device)
    codes = torch.bucketize(blocks / absmax[:, None], (levels[1:] + levels[:-1]) / 2).to(torch.uint8)
    packed = codes.flatten()[0::2] << 4 | codes.flatten()[1::2]
    offset = absmax.mean()
    centred = F.pad(absmax - offset, (0, (-absmax.numel()) % SCALE_BLOCK)).reshape(-1, SCALE_BLOCK)
    scale = (centred.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    absmax_codes = torch.round(centred / scale[:, None]).to(torch.int8).flatten()[: absmax.numel()]
    return {"packed": packed, "absmax_codes": absmax_codes, "absmax_scale": scale, "absmax_offset": offset}


def dequantize_nf4(state: dict[str, Tensor], shape: torch.Size, dtype: torch.dtype = torch.float32) -> Tensor:
    """Semantics: NF4[code] * (int8 * scale + offset), reshaped to `shape`: the inverse of quantize_nf4."""
    packed = state["packed"]
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).flatten().long()
    scale = state["absmax_scale"].repeat_interleave(SCALE_BLOCK)[: state["absmax_codes"].numel()]
    absmax = state["absmax_codes"].float() * scale + state["absmax_offset"]
    values = NF4_LEVELS.to(packed.device)[codes].reshape(-1, BLOCK) * absmax[:, None]
    return values.flatten()[: shape.numel()].reshape(shape).to(dtype)


class NF4Linear(nn.Module):
    """A linear layer whose weight is stored in NF4; `weight` reads (and assigning it re-stores) full precision."""

    is_quantized = True

    def __init__(self, in_features: int, out_features: int, bias: Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, dtype
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> NF4Linear:
        module = cls(linear.in_features, linear.out_features, linear.bias, linear.weight.dtype)
        module.weight = linear.weight.detach()  # a plain tensor: a Parameter would be registered, not stored 4-bit
        return module

    @property
    def weight(self) -> Tensor:
        state = {name: getattr(self, name) for name in ("packed", "absmax_codes", "absmax_scale", "absmax_offset")}
        return dequantize_nf4(state, torch.Size((self.out_features, self.in_features)), self.compute_dtype)

    @weight.setter
    def weight(self, value: Tensor) -> None:
        for name, tensor in quantize_nf4(value).items():
            self.register_buffer(name, tensor)

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), bias)

    def storage_bytes(self) -> int:
        """Bytes of the stored weight (codes, absmax codes, scales, offset); the bias not included."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear = linear.to(dtype or self.compute_dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, double-quantized"


def quantize_model(model: nn.Module, skip: tuple[str, ...] = (), backend: str = "torch") -> nn.Module:
    """Replaces every nn.Linear (but those whose name is in `skip`) by a 4-bit one, in place.

    backend="torch": NF4Linear (any device); "bitsandbytes": bitsandbytes' Linear4bit (CUDA only).
    """
    make = {"torch": NF4Linear.from_linear, "bitsandbytes": _bnb_linear4bit}[backend]
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and path.rsplit(".", 1)[-1] not in skip:
            parent_path, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, child, make(module))
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replaces every NF4Linear by an nn.Linear holding its dequantized weight (16-bit export), in place."""
    for path, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):
            parent_path, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, child, module.to_linear(dtype))
    return model


def base_weight_bytes_per_param(model: nn.Module) -> float:
    """Stored bytes per weight over the model's NF4 layers (about 0.52)."""
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    return sum(m.storage_bytes() for m in layers) / sum(m.in_features * m.out_features for m in layers)


def _bnb_linear4bit(linear: nn.Linear) -> nn.Module:
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ImportError(
            "backend='bitsandbytes' needs `pip install bitsandbytes`; backend='torch' runs anywhere"
        ) from None
    if not torch.cuda.is_available():
        raise RuntimeError("backend='bitsandbytes' needs a CUDA device; use backend='torch' on CPU")
    module = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        compute_dtype=linear.weight.dtype, compress_statistics=True, quant_type="nf4",
    )  # fmt: skip
    module.weight = bnb.nn.Params4bit(linear.weight.detach().cpu(), requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return module.cuda()
