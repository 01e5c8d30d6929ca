"""The layer kinds LoRA can adapt, each a small table entry: factor shapes, contribution, delta layout.

Every kind stores A as (r x in ...) and B as (out x r ...), PEFT's layout, so files map key for key.
A kind that `acts_on_weight` has no contribution: W + dW replaces W (torch parametrization).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lorakit import ops
from lorakit.errors import LorakitError, TargetError


@dataclass(frozen=True)
class Kind:
    """Plain linear: weight (out x in); contribution s * B(A(x)).

    The flags below are the only way the rest of lorakit tells kinds apart, so a new kind is one entry here.
    """

    name: str = "linear"
    transposed: bool = False  # weight stored (in x out): GPT-2's Conv1D, embeddings
    acts_on_weight: bool = False  # True: W + dW is substituted for W (parametrization), no contribution
    is_plain_matmul: bool = True  # y = x W^T however W is stored: all-linear takes it; LoRA-FA, VeRA act on it
    is_embedding: bool = False  # input is token ids: LoRA+'s embedding lr, PEFT's lora_embedding_A/B file keys
    takes_dropout: bool = True  # token ids cannot be dropped out (PEFT skips dropout on embeddings)
    zero_factor: str = "lora_B"  # the factor set to 0 at init, so training starts at the base model
    supports_weight_init: bool = True  # PiSSA / OLoRA factorise a 2-D (out x in) weight
    fan_in_fan_out: bool = False  # PEFT records fan_in_fan_out=True in the config for this kind
    quantized: bool = False  # W is stored quantized: in-place updates of W (Delta-LoRA) would round away
    mergeable: bool = True  # dW fits W's layout, so merging folds it in

    def weight_name(self) -> str:
        return "weight"

    def weight_of(self, module: nn.Module) -> Tensor:
        """The base weight in full precision, however the module stores it."""
        return getattr(module, self.weight_name())

    def store_weight(self, module: nn.Module, value: Tensor) -> None:
        """Replaces a weight that is not a plain Parameter (a quantized one is quantized again)."""
        setattr(module, self.weight_name(), value)

    def in_out(self, weight: Tensor) -> tuple[int, int]:
        out_f, in_f = weight.shape[:2]
        return (out_f, in_f) if self.transposed else (in_f, out_f)

    def factor_shapes(self, weight: Tensor, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        in_f, out_f = self.in_out(weight)
        return (r, in_f), (out_f, r)

    def contribution(self, module: nn.Module, x: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float):
        return ops.linear_contribution(x, lora_A, lora_B, scale)

    def delta(self, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
        delta = ops.low_rank_delta(lora_A, lora_B, scale)
        return delta.T if self.transposed else delta

    def base_output(self, module: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
        """The base layer's product with `weight`, without bias (variants that rescale W x need it)."""
        return F.linear(x, weight.T if self.transposed else weight)

    def without_bias(self, module: nn.Module, out: Tensor) -> Tensor:
        """module(x) less its bias: W x, from an output already computed."""
        bias = getattr(module, "bias", None)
        return out if bias is None else out - self.output_bias(module, bias)

    def output_bias(self, module: nn.Module, bias: Tensor) -> Tensor:
        """A per-output-feature bias (out,) laid out to broadcast against the layer's output."""
        return bias

    def after_copy(self, module: nn.Module) -> None:
        """Called on the base module of a deep-copied layer; nothing to do unless the kind parametrizes it."""

    def check_rank(self, path: str, r: int) -> None:
        """Raises, naming the fix, when the kind cannot take rank r; called before the model is changed."""

    def companions(self) -> list[tuple[str, Kind]]:
        """(child name, kind) of other weights one target of this kind adapts too; none for most kinds."""
        return []


@dataclass(frozen=True)
class EmbeddingKind(Kind):
    """Embedding table (num x dim): A (r x num) is indexed by token id, B (dim x r)."""

    name: str = "embedding"
    transposed: bool = True
    is_plain_matmul: bool = False
    is_embedding: bool = True
    takes_dropout: bool = False
    zero_factor: str = "lora_A"  # the table is looked up through A, so A is the zero factor (PEFT, loralib)
    supports_weight_init: bool = False

    def contribution(self, module: nn.Module, x: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float):
        term = ops.embedding_contribution(x, lora_A, lora_B, scale, padding_idx=module.padding_idx)
        return _scaled_as_the_table(module, term)

    def base_output(self, module: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
        out = F.embedding(
            x, weight, module.padding_idx, module.max_norm, module.norm_type, module.scale_grad_by_freq, module.sparse
        )
        return _scaled_as_the_table(module, out)

    def without_bias(self, module: nn.Module, out: Tensor) -> Tensor:
        return out


def _scaled_as_the_table(module: nn.Module, out: Tensor) -> Tensor:
    """out * the module's embed_scale, where it has one: a scaled word embedding (Gemma 3, BART with scale_embedding)
    returns table[ids] * embed_scale, so a term that adds to its output is scaled alike, and merging (which puts dW
    into the table) changes nothing. PEFT's _get_embed_scale rule: a number (taken in the table's dtype) or a
    one-element tensor; anything else scales nothing."""
    embed_scale = getattr(module, "embed_scale", None)
    if isinstance(embed_scale, (int, float)) and not isinstance(embed_scale, bool):
        embed_scale = torch.tensor(embed_scale, dtype=module.weight.dtype, device=out.device)
    if isinstance(embed_scale, Tensor) and embed_scale.numel() == 1:
        return out * embed_scale.to(out.dtype)
    return out


@dataclass(frozen=True)
class ConvKind(Kind):
    """ConvNd: A is a conv with the base's kernel, stride, padding and dilation; B a 1x1 conv."""

    name: str = "conv"
    is_plain_matmul: bool = False
    supports_weight_init: bool = False
    groups: int = 1  # a grouped conv's B is a grouped 1x1 conv, as in PEFT; its dW is dense, so it cannot merge

    def in_out(self, weight: Tensor) -> tuple[int, int]:
        out_f, in_per_group = weight.shape[:2]
        return in_per_group * self.groups, out_f  # in_channels: A reads every input channel

    def factor_shapes(self, weight: Tensor, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        out_f, in_per_group, *kernel = weight.shape
        return (r, in_per_group * self.groups, *kernel), (out_f, r // self.groups, *(1 for _ in kernel))

    def check_rank(self, path: str, r: int) -> None:
        if r % self.groups:
            raise TargetError(
                f"{path} is a convolution with groups={self.groups}, and LoRA's B splits the rank into those groups "
                f"(as in PEFT): choose r divisible by {self.groups} (rank_pattern can set it for this layer alone), "
                "or exclude it with exclude_modules"
            )

    def contribution(self, module: nn.Module, x: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float):
        x, padding = _padded(module, x)
        conv = _conv_fn(lora_A)
        args = {"stride": module.stride, "padding": padding, "dilation": module.dilation}
        return ops.conv_contribution(x, lora_A, lora_B, scale, conv, groups=self.groups, **args)

    def delta(self, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
        if self.groups != 1:
            raise LorakitError(
                f"a convolution with groups={self.groups} cannot merge its adapter: dW couples every input channel "
                "with every output channel, which the grouped weight cannot hold (PEFT refuses too); keep it unmerged"
            )
        return super().delta(lora_A, lora_B, scale)

    def base_output(self, module: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
        x, padding = _padded(module, x)
        return _conv_fn(weight)(x, weight, None, module.stride, padding, module.dilation)

    def output_bias(self, module: nn.Module, bias: Tensor) -> Tensor:
        return bias.reshape(-1, *(1 for _ in module.kernel_size))  # the channel axis


def _conv_fn(weight: Tensor):
    return {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[weight.dim() - 2]


def _padded(module: nn.Module, x: Tensor) -> tuple[Tensor, object]:
    # non-zero padding modes pad the input explicitly, as nn.ConvNd does
    if module.padding_mode != "zeros":
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode), 0
    return x, module.padding


@dataclass(frozen=True)
class ParameterKind(Kind):
    """Any 2-D weight used as (out x in), adapted by parametrization: W + dW replaces W in forward."""

    name: str = "parameter"
    acts_on_weight: bool = True
    is_plain_matmul: bool = False
    parameter: str = "weight"

    def weight_name(self) -> str:
        return self.parameter

    def after_copy(self, module: nn.Module) -> None:
        """torch's parametrized class is shared by a module and its deep copies, and removing the parametrization
        from one deletes the weight's property from that class: the copy gets a class of its own."""
        cls = type(module)
        namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
        module.__class__ = type(cls.__name__, cls.__bases__, namespace)


@dataclass(frozen=True)
class ExpertsKind(ParameterKind):
    """A stack of expert weights, transformers' fused MoE layout (experts x out x in; experts x in x out where the
    module sets is_transposed), adapted as PEFT does: A (r*experts x in) holds expert e's (r x in) block at rows
    e*r.., B (out x r*experts) holds its (out x r) block at columns e, e+experts, ...; dW[e] = s * B_e A_e."""

    name: str = "experts"
    supports_weight_init: bool = False
    experts: int = 1
    in_first: bool = False  # the module's is_transposed: each expert's weight is (in x out)

    def in_out(self, weight: Tensor) -> tuple[int, int]:
        _, first, second = weight.shape
        return (first, second) if self.in_first else (second, first)

    def factor_shapes(self, weight: Tensor, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        in_f, out_f = self.in_out(weight)
        return (r * self.experts, in_f), (out_f, r * self.experts)

    def delta(self, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
        per_expert_A = lora_A.reshape(self.experts, -1, lora_A.shape[-1])  # (experts, r, in)
        per_expert_B = lora_B.reshape(lora_B.shape[0], -1, self.experts)  # (out, r, experts)
        layout = "ore,eri->eio" if self.in_first else "ore,eri->eoi"
        return torch.einsum(layout, per_expert_B, per_expert_A) * scale


@dataclass(frozen=True)
class MultiheadAttentionKind(ParameterKind):
    """nn.MultiheadAttention, as PEFT adapts it: in_proj_weight (3E x E) here and out_proj.weight as a companion,
    both on the weight, because the module reads out_proj's weight directly and never calls out_proj."""

    name: str = "multihead_attention"
    parameter: str = "in_proj_weight"

    def companions(self) -> list[tuple[str, Kind]]:
        return [("out_proj", ParameterKind(parameter="weight"))]


@dataclass(frozen=True)
class Bnb4bitKind(Kind):
    """bitsandbytes' Linear4bit (CUDA QLoRA): the packed weight is dequantized to read it, quantized to write it."""

    name: str = "linear4bit"
    quantized: bool = True

    def weight_of(self, module: nn.Module) -> Tensor:
        import bitsandbytes as bnb

        packed = module.weight
        return bnb.functional.dequantize_4bit(packed.data, packed.quant_state)  # in the dtype it was quantized from

    def store_weight(self, module: nn.Module, value: Tensor) -> None:
        import bitsandbytes as bnb

        old = module.weight
        module.weight = bnb.nn.Params4bit(
            value.to(old.quant_state.dtype), requires_grad=False, quant_type=old.quant_type,
            compress_statistics=old.compress_statistics, blocksize=old.blocksize,
        ).to(old.device)  # fmt: skip


LINEAR = Kind()
QUANTIZED_LINEAR = Kind(name="linear_quantized", quantized=True)  # lorakit.quant's NF4Linear, bitsandbytes' 8-bit
TRANSFORMERS_CONV1D = Kind(name="conv1d_transposed", transposed=True, fan_in_fan_out=True)
EMBEDDING = EmbeddingKind()
MULTIHEAD_ATTENTION = MultiheadAttentionKind()


def kind_of(module: nn.Module) -> Kind | None:
    """The kind for a module LoRA can wrap, or None."""
    name = type(module).__name__  # bitsandbytes and transformers matched by name: both stay optional
    if name in ("Linear4bit", "LinearNF4", "LinearFP4") and hasattr(module.weight, "quant_state"):
        return Bnb4bitKind()
    if getattr(module, "is_quantized", False) or name == "Linear8bitLt":  # is_quantized: lorakit.quant
        return QUANTIZED_LINEAR
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    if isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim:  # one in_proj_weight, as PEFT
        return MULTIHEAD_ATTENTION
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return ConvKind(groups=module.groups, mergeable=module.groups == 1)
    if name == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight"):
        return TRANSFORMERS_CONV1D  # GPT-2's Conv1D: a linear layer whose weight is stored (in x out)
    return None


def parameter_kind(module: nn.Module, parameter: str) -> ParameterKind:
    """The kind for `module.<parameter>`; a weight already parametrized by another adapter counts as itself."""
    weight = stored_parameter(module, parameter)
    if weight is None and parametrize.is_parametrized(module, parameter):
        raise TargetError(  # torch's weight_norm keeps two tensors, original0 (g) and original1 (v)
            f"{parameter!r} of {type(module).__name__} is computed by a torch parametrization from several "
            "tensors (weight_norm's g and v), so target_parameters cannot adapt it in place; adapt the module "
            "with target_modules instead (its LoRA acts on the output)"
        )
    if not isinstance(weight, nn.Parameter):
        raise TargetError(f"{type(module).__name__} has no parameter named {parameter!r}")
    if weight.dim() == 3:  # a fused MoE block's experts
        in_first = getattr(module, "is_transposed", False)
        return ExpertsKind(parameter=parameter, experts=weight.shape[0], in_first=in_first)
    if weight.dim() != 2:
        raise TargetError(
            f"target_parameters supports 2-D weights (out x in) and 3-D expert stacks (experts x out x in); "
            f"{parameter!r} of {type(module).__name__} has shape {tuple(weight.shape)}"
        )
    return ParameterKind(parameter=parameter)


def stored_parameter(module: nn.Module, name: str) -> Tensor | None:
    """The Parameter a module stores under `name`, also where an adapter parametrizes it (reading the name would
    compute W + dW, a new tensor each time)."""
    if parametrize.is_parametrized(module, name):
        return getattr(module.parametrizations[name], "original", None)
    return getattr(module, name, None)


def own_parameter_names(module: nn.Module) -> list[str]:
    """The module's own parameter names as the user wrote them, in the order it registered them: a weight an
    adapter already parametrizes is listed under its name (torch moves it to parametrizations.<name>.original),
    after the others, so a second adapter finds it."""
    names = [name for name, _ in module.named_parameters(recurse=False)]
    if parametrize.is_parametrized(module):
        names.extend(module.parametrizations.keys())
    return names
