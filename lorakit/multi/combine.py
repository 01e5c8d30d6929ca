"""Weighted combination of adapters into a new one: PEFT's add_weighted_adapter, same types, same results.

Three families, as in PEFT:
- cat: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...]: exactly sum_i w_i dW_i, at rank sum r_i.
- factor-wise (linear, ties, dare_linear, dare_ties, magnitude_prune): A and B are combined separately, A's terms
  weighted by sign(w s) sqrt(|w s|) and B's by sqrt(|w s|); the product B A then carries w s once per term plus
  cross terms B_i A_j, PEFT's cheap approximation. Needs equal ranks.
- delta-wise (svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd): dW = merge(w_i, dW_i), then
  truncated to rank r by SVD: B = U S, A = Vh.
The new adapter has scale 1 (lora_alpha = r) and is not active; the sources are left as they were.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lorakit.config import LoraConfig
from lorakit.errors import LorakitError
from lorakit.inject import lora_layers, saved_modules
from lorakit.layer import LoraLayer
from lorakit.targets import find_module_targets

if TYPE_CHECKING:
    from lorakit.model import LoraModel

FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DELTA_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = ("cat", *FACTOR_TYPES, *DELTA_TYPES)
_COMBINABLE_VARIANTS = ("lora", "lora_fa")  # a plain s B A delta; LoRA-FA differs only in what trains


class CombinationError(LorakitError):
    """Adapters that cannot be combined the way add_weighted_adapter was asked to."""


@dataclasses.dataclass(frozen=True)
class Combination:
    """What one call asks for, checked: the rule for each layer's factors."""

    combination_type: str
    weights: tuple[float, ...]
    rank: int
    density: float | None = None
    majority_sign_method: str = "total"
    svd_clamp: float | None = None
    svd_full_matrices: bool = True
    svd_driver: str | None = None
    generator: torch.Generator | None = None


def add_weighted_adapter(
    model: LoraModel,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    seed: int | None = None,
) -> None:
    """Adds `adapter_name` = the weighted combination of `adapters` (PEFT's semantics); checks everything first.

    seed: the dare_* types drop entries at random; a seed makes that repeatable (None: torch's global generator).
    """
    adapters, weights = _checked_names(adapters), [float(w) for w in _checked_weights(adapters, weights)]
    _check_sources(model, adapters, adapter_name)
    # one adapter can only be scaled, as in PEFT
    combination_type = "linear" if len(adapters) == 1 else _checked_type(combination_type)
    rank = _new_rank(model, adapters, combination_type, svd_rank)
    _check_density(combination_type, density, majority_sign_method)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise CombinationError(f"seed must be an integer or None (torch's global generator), got {seed!r}")
    config = _new_config(model, adapters, rank)
    plans = _layer_plans(model, adapters, config, combination_type)
    _check_svd_options(svd_clamp, svd_driver, plans)
    density, svd_clamp = (None if v is None else float(v) for v in (density, svd_clamp))
    combination = Combination(
        combination_type, tuple(weights), rank, density, majority_sign_method, svd_clamp, svd_full_matrices,
        svd_driver, _generator(plans, seed),
    )  # fmt: skip
    model.add_adapter(adapter_name, config)
    try:
        with torch.no_grad():
            for layer, present in plans:
                _fill(layer, adapter_name, present, combination)
    except BaseException:
        model.delete_adapter(adapter_name)
        raise


# -- checks, all before the model changes -----------------------------------------------------------


def _checked_names(adapters: list[str]) -> list[str]:
    """A list of names; one name as a string would be read letter by letter."""
    if isinstance(adapters, str) or not isinstance(adapters, Iterable):
        raise CombinationError(f"adapters must be a list of adapter names, got {adapters!r}; e.g. [{adapters!r}]")
    return list(adapters)


def _checked_weights(adapters: list[str], weights: list[float]) -> list[float]:
    """One finite number per adapter: Python, NumPy or one-element torch numbers, as PEFT takes them."""
    if not adapters:
        raise CombinationError("add_weighted_adapter needs at least one adapter name in `adapters`")
    if isinstance(weights, str) or not isinstance(weights, Iterable):
        raise CombinationError(f"weights must be a list of numbers, one per adapter, got {weights!r}")
    weights = list(weights)
    if len(weights) != len(adapters):
        raise CombinationError(
            f"{len(adapters)} adapters but {len(weights)} weights; pass one weight per adapter, in the same order"
        )
    bad = [w for w in weights if not _is_number(w) or not math.isfinite(float(w))]
    if bad:
        raise CombinationError(f"weights must be finite numbers, got {bad}")
    return weights


def _is_number(value: object) -> bool:
    if isinstance(value, Tensor):
        return value.numel() == 1 and not value.dtype.is_complex and value.dtype != torch.bool
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _checked_type(combination_type: str) -> str:
    if combination_type not in COMBINATION_TYPES:
        raise CombinationError(f"unknown combination_type {combination_type!r}; choose one of {COMBINATION_TYPES}")
    return combination_type


def _check_sources(model: LoraModel, adapters: list[str], adapter_name: str) -> None:
    unknown = [a for a in adapters if a not in model.peft_config]
    if unknown:
        raise CombinationError(f"unknown adapter(s) {unknown}; loaded: {sorted(model.peft_config)}")
    if adapter_name in model.peft_config:
        raise CombinationError(
            f"adapter {adapter_name!r} exists already; pick another adapter_name or delete_adapter({adapter_name!r})"
        )
    for name in dict.fromkeys(adapters):
        config = model.peft_config[name]
        if not isinstance(config, LoraConfig) or config.use_dora or config.variant not in _COMBINABLE_VARIANTS:
            kind = "DoRA" if getattr(config, "use_dora", False) else getattr(config, "variant", config.peft_type)
            raise CombinationError(
                f"adapter {name!r} is a {kind} adapter; only plain LoRA deltas s*B*A can be combined "
                "(a magnitude vector, shared projections or an updated base weight have no weighted sum)"
            )
        if config.target_parameters:
            raise CombinationError(
                f"adapter {name!r} uses target_parameters; add_weighted_adapter combines target_modules adapters "
                "only (as PEFT)"
            )
    trained_in_full = sorted({p for p, s in saved_modules(model.model) for a in adapters if a in s.copies})
    if trained_in_full:
        raise CombinationError(
            f"the adapters train {trained_in_full} in full (modules_to_save / a task head); full modules cannot "
            "be weighted and summed like low-rank deltas; combine adapters saved without modules_to_save"
        )


def _configured_rank(config: LoraConfig) -> int:
    """The largest rank an adapter can have in any layer (PEFT's rule)."""
    return max([config.r, *config.rank_pattern.values()])


def _new_rank(model: LoraModel, adapters: list[str], combination_type: str, svd_rank: int | None) -> int:
    ranks = [_configured_rank(model.peft_config[a]) for a in adapters]
    if combination_type in FACTOR_TYPES:
        if len(set(ranks)) != 1:
            raise CombinationError(
                f"combination_type={combination_type!r} combines A and B factor by factor, so every adapter "
                f"needs the same rank; got {dict(zip(adapters, ranks, strict=True))}; use 'cat' or an '*svd' type"
            )
        return ranks[0]
    if combination_type == "cat":
        return sum(ranks)
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise CombinationError(f"svd_rank must be a positive integer or None, got {svd_rank!r}")
    return svd_rank or max(ranks)


def _check_density(combination_type: str, density: float | None, majority_sign_method: str) -> None:
    if majority_sign_method not in ("total", "frequency"):
        raise CombinationError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    if combination_type in ("cat", "linear", "svd"):
        return
    if not _is_number(density) or not 0.0 <= float(density) <= 1.0:
        raise CombinationError(
            f"combination_type={combination_type!r} prunes each adapter to a `density` in [0, 1] "
            f"(the fraction of entries kept); got density={density!r}"
        )
    if combination_type.startswith("dare") and density == 0.0:
        raise CombinationError("dare_* rescales the kept entries by 1/density; density must be > 0")


def _check_svd_options(svd_clamp: float | None, svd_driver: str | None, plans) -> None:
    if svd_clamp is not None and (not _is_number(svd_clamp) or not 0.0 <= float(svd_clamp) <= 1.0):
        raise CombinationError(f"svd_clamp is a quantile in [0, 1] (or None: no clamping), got {svd_clamp!r}")
    layer, present = plans[0]
    if svd_driver is not None and not layer.adapters[present[0][1]].lora_A.is_cuda:
        raise CombinationError(
            f"svd_driver={svd_driver!r} picks a cuSOLVER method, which exists for CUDA tensors only; "
            "pass svd_driver=None for adapters on the CPU"
        )


def _new_config(model: LoraModel, adapters: list[str], rank: int) -> LoraConfig:
    """The first adapter's config with rank r, scale 1 and the union of every adapter's target_modules."""
    configs = [model.peft_config[a] for a in adapters]
    targets = [c.target_modules for c in configs]
    if all(t == targets[0] for t in targets):
        union = targets[0]
    elif all(isinstance(t, list) for t in targets):
        union = sorted({name for t in targets for name in t})
    elif all(isinstance(t, str) and t != "all-linear" for t in targets):
        union = "|".join(f"({t})" for t in targets)
    else:
        raise CombinationError(
            f"the adapters' target_modules are {targets}: a mix of name lists, regexes and 'all-linear' has no "
            "common form (PEFT refuses it too); combine adapters whose target_modules are of one kind"
        )
    # rsLoRA off: PEFT keeps it, which scales its combination by sqrt(r) instead of 1. The first adapter's init
    # where it is a random one, as PEFT: the new factors draw what PEFT's draw, so dare_* with seed=None under one
    # torch.manual_seed gives PEFT's masks; an init from W (PiSSA, OLoRA, ...) would rewrite the shared base
    init = configs[0].init_lora_weights
    return dataclasses.replace(
        configs[0], r=rank, lora_alpha=rank, target_modules=union, rank_pattern={}, alpha_pattern={},
        use_rslora=False, init_lora_weights=init if isinstance(init, bool) or init == "gaussian" else True,
    )  # fmt: skip


def _layer_plans(
    model: LoraModel, adapters: list[str], config: LoraConfig, combination_type: str
) -> list[tuple[LoraLayer, list[tuple[int, str]]]]:
    """For each layer the new adapter will sit on: (layer, [(index into adapters, name) of those present])."""
    layers = dict(lora_layers(model.model))
    plans = []
    for path, _ in find_module_targets(model.model, config):
        layer = layers.get(path)
        present = [(i, a) for i, a in enumerate(adapters) if layer is not None and a in layer.adapters]
        if not present:
            raise CombinationError(
                f"{path} matches the combined target_modules but none of {adapters} adapts it (their "
                "exclude_modules / layers_to_transform differ); combine adapters with the same layer selection"
            )
        ranks = {layer.adapters[a].r for _, a in present}
        if combination_type in FACTOR_TYPES and len(ranks) > 1:
            raise CombinationError(
                f"{path}: the adapters have ranks {sorted(ranks)} here (rank_pattern); {combination_type!r} needs "
                "equal ranks in every layer; use 'cat' or an '*svd' type instead"
            )
        plans.append((layer, present))
    return plans


def _generator(plans: list[tuple[LoraLayer, list[tuple[int, str]]]], seed: int | None) -> torch.Generator | None:
    """A generator on the adapters' device (dare's masks are drawn there), seeded; None: torch's global one."""
    if seed is None:
        return None
    layer, present = plans[0]
    return torch.Generator(device=layer.adapters[present[0][1]].lora_A.device).manual_seed(seed)


# -- the arithmetic, one layer at a time -----------------------------------------------------------


def _fill(layer: LoraLayer, name: str, present: list[tuple[int, str]], how: Combination) -> None:
    """Writes the combined factors into adapter `name` of `layer`: A (r x in ...), B (out x r ...)."""
    target = layer.adapters[name]
    sources = [layer.adapters[a] for _, a in present]
    weights = [how.weights[i] for i, _ in present]
    if how.combination_type == "cat":
        lora_A = torch.cat([a.lora_A * (w * a.scale) for a, w in zip(sources, weights, strict=True)])
        lora_B = torch.cat([a.lora_B for a in sources], dim=1)
    elif how.combination_type in FACTOR_TYPES:
        lora_A, lora_B = _factor_wise(sources, weights, how)
    else:
        lora_A, lora_B = _delta_wise(layer, sources, weights, how)
    _place(target.lora_A, lora_A, dim=0)
    _place(target.lora_B, lora_B, dim=1)


def _place(param: Tensor, value: Tensor, dim: int) -> None:
    """param <- value in its first value.shape[dim] ranks, zeros after (a smaller combined rank)."""
    param.zero_()
    param.narrow(dim, 0, value.shape[dim]).copy_(value)


def _factor_wise(sources, weights: list[float], how: Combination) -> tuple[Tensor, Tensor]:
    weights_A, weights_B = [], []
    for adapter, weight in zip(sources, weights, strict=True):
        scaled = weight * adapter.scale  # split as sqrt over both factors; the sign goes to A only
        weights_A.append(math.copysign(math.sqrt(abs(scaled)), scaled))
        weights_B.append(math.sqrt(abs(scaled)))
    merge = _MERGES[how.combination_type]
    lora_A = merge([a.lora_A.detach() for a in sources], weights_A, how)
    lora_B = merge([a.lora_B.detach() for a in sources], weights_B, how)
    return lora_A, lora_B


def _delta_wise(layer: LoraLayer, sources, weights: list[float], how: Combination) -> tuple[Tensor, Tensor]:
    """dW = merge(w_i, dW_i) as an (out x in) matrix, then its best rank-r factors: B = U S, A = Vh."""
    deltas = [a.delta_weight().detach() for a in sources]
    delta = _MERGES[how.combination_type.removesuffix("_svd")](deltas, weights, how)
    if layer.kind.transposed:  # embeddings and GPT-2's Conv1D store (in x out)
        delta = delta.T
    matrix = delta.flatten(1)  # a conv's kernel dims go with `in`, as A's do
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=how.svd_full_matrices, driver=how.svd_driver)
    k = min(how.rank, S.numel())
    lora_B, lora_A = U[:, :k] @ torch.diag(S[:k]), Vh[:k]
    if how.svd_clamp is not None:
        high = torch.quantile(torch.cat([lora_B.flatten(), lora_A.flatten()]), how.svd_clamp)
        lora_B, lora_A = lora_B.clamp(-high, high), lora_A.clamp(-high, high)
    out_f, in_shape = delta.shape[0], delta.shape[1:]
    return lora_A.reshape(k, *in_shape), lora_B.reshape(out_f, k, *(1 for _ in in_shape[1:]))


# -- PEFT's merge rules over stacked task tensors (w: one weight per tensor) ---------------------------


def _stacked(tensors: list[Tensor], weights: list[float]) -> tuple[Tensor, Tensor]:
    stack = torch.stack(tensors)  # (n, ...)
    w = torch.tensor(weights, dtype=stack.dtype, device=stack.device).reshape(-1, *(1 for _ in tensors[0].shape))
    return stack, w


def _weighted_sum(tensors: list[Tensor], weights: list[float], how: Combination) -> Tensor:
    stack, w = _stacked(tensors, weights)
    return (stack * w).sum(0)


def _magnitude_pruned(tensor: Tensor, density: float) -> Tensor:
    """Keeps the int(density * numel) entries of largest magnitude, zeros the rest."""
    if density >= 1:
        return tensor
    keep = torch.topk(tensor.abs().flatten(), k=int(density * tensor.numel())).indices
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    mask[keep] = 1
    return tensor * mask.reshape(tensor.shape)


def _random_pruned(tensor: Tensor, density: float, generator: torch.Generator | None) -> Tensor:
    """DARE: keeps each entry with probability density and rescales it by 1/density (same expectation)."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def _disjoint_mean(tensors: list[Tensor], weights: list[float], how: Combination) -> Tensor:
    """TIES: elect each entry's sign (from the unweighted tensors), average the weighted entries that agree."""
    stack, w = _stacked(tensors, weights)
    votes = stack.sum(0) if how.majority_sign_method == "total" else stack.sign().sum(0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(stack.dtype)
    agree = stack.sign() == elected
    total = (stack * w * agree).sum(0)
    return total / agree.sum(0).clamp(min=1)


def _pruned(prune: Callable[[Tensor, Combination], Tensor], merge: Callable) -> Callable:
    def combine(tensors: list[Tensor], weights: list[float], how: Combination) -> Tensor:
        return merge([prune(t, how) for t in tensors], weights, how)

    return combine


def _by_magnitude(t: Tensor, how: Combination) -> Tensor:
    return _magnitude_pruned(t, how.density)


def _at_random(t: Tensor, how: Combination) -> Tensor:
    return _random_pruned(t, how.density, how.generator)


_MERGES: dict[str, Callable[[list[Tensor], list[float], Combination], Tensor]] = {
    "linear": _weighted_sum,
    "svd": _weighted_sum,
    "magnitude_prune": _pruned(_by_magnitude, _weighted_sum),
    "ties": _pruned(_by_magnitude, _disjoint_mean),
    "dare_linear": _pruned(_at_random, _weighted_sum),
    "dare_ties": _pruned(_at_random, _disjoint_mean),
}
