"""Which modules and weights an adapter goes on: PEFT's matching rules, with errors that name the fix."""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Iterator

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import TargetError
from lorakit.kinds import MULTIHEAD_ATTENTION, Kind, kind_of, own_parameter_names, parameter_kind, stored_parameter
from lorakit.layer import LoraLayer
from lorakit.saved import SavedModule

# model_type -> default target_modules: PEFT 0.21's table (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING), entry
# for entry, so a config without target_modules adapts what it adapts in PEFT, and a model PEFT has no default for
# asks for target_modules here too. A str entry is a regex on the whole path.
DEFAULT_TARGETS: dict[str, list[str] | str] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}

# model_type -> module names whose weights a fused kernel reads directly, so a LoRA term on their output never runs
# on that path: Mamba's CUDA kernels (mamba_inner_fn, mamba_split_conv1d_scan_combined) take out_proj's and conv1d's
# weights. PEFT 0.21 refuses LoRA on them for these model types (tuners_utils._check_lora_target_modules_mamba).
FUSED_KERNEL_WEIGHTS = {
    model_type: ("out_proj", "conv1d") for model_type in ("mamba", "mamba2", "falcon_mamba", "falcon_h1", "nemotron_h")
}

# Task types whose heads train in full, as PEFT adds them to modules_to_save.
TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"], "QUESTION_ANS": ["qa_outputs"]}


def logical_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) as the user wrote the model: a LoraLayer or SavedModule stands for what it wraps."""

    def walk(prefix: str, module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(child, LoraLayer):  # weight layers nest (one per adapted weight): the module is below
                below, base = f"{path}.base_layer", child.base_layer
                while isinstance(base, LoraLayer):
                    below, base = f"{below}.base_layer", base.base_layer
                yield path, base
                yield from walk(below, base)
            elif isinstance(child, SavedModule):
                yield path, child.original_module
            else:
                yield path, child
                yield from walk(path, child)

    yield from walk("", model)


def find_module_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, Kind]]:
    """(path, kind) for every module the config's target_modules select."""
    targets = _resolve_target_names(model, config)
    if targets is None:
        return []
    saved = set(modules_to_save(config))
    head = _output_head(model) if targets == "all-linear" else None
    found, unsupported, clashes = [], [], []
    for path, module in logical_modules(model):
        if _within_saved(path, saved) or not _selected(path, module, targets, head, config):
            continue
        if saved_name_matches(path, saved):
            clashes.append(path)
        kind = _kind_in_place(model, path, module)
        if kind is None:
            unsupported.append(f"{path} ({type(module).__name__})")
        else:
            found.append((path, kind))
    if clashes:
        raise TargetError(_saved_clash(clashes, targets, config))
    if unsupported:
        raise TargetError(
            "target_modules selects modules LoRA cannot wrap: " + ", ".join(unsupported) + ". "
            "Supported: Linear, Embedding, Conv1d/2d/3d (grouped too), transformers Conv1D, nn.MultiheadAttention "
            "(one in_proj_weight); to adapt a weight of "
            "another module use target_parameters=['<module>.<parameter>']"
        )
    if not found and not config.target_parameters:
        raise TargetError(_nothing_matched(model, targets))
    if isinstance(targets, list):
        # PEFT lists modules saved whole and excluded ones among the targets it writes: they matched something
        passed_over = [p for p, _ in logical_modules(model) if _within_saved(p, saved) or _excluded(p, config)]
        _warn_unused_names(targets, [p for p, _ in found] + passed_over)
    with_companions = [target for path, kind in found for target in _with_companions(model, path, kind)]
    return list(dict.fromkeys(with_companions))  # "attn" and "out_proj" both named: out_proj once


def _kind_in_place(model: nn.Module, path: str, module: nn.Module) -> Kind | None:
    """kind_of, but a layer its parent reads without calling it is adapted on its weight: nn.MultiheadAttention
    hands out_proj's weight to the attention function, so a LoRA term on out_proj's output would never run."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if isinstance(parent, nn.MultiheadAttention) and name == "out_proj":
        return MULTIHEAD_ATTENTION.companions()[0][1]
    return kind_of(module)


def _with_companions(model: nn.Module, path: str, kind: Kind) -> list[tuple[str, Kind]]:
    """The target and the child weights its kind adapts with it (MHA's out_proj), children first: wrapping the
    parent moves them below its base_layer, where a file names them (PEFT's attn.base_layer.out_proj)."""
    below = f"{path}.base_layer" if isinstance(model.get_submodule(path), LoraLayer) else path
    return [(f"{below}.{child}", child_kind) for child, child_kind in kind.companions()] + [(path, kind)]


def check_fused_kernel_targets(model: nn.Module, config: LoraConfig, paths: list[str]) -> None:
    """Refuses LoRA on a module whose weight a fused kernel of this model reads directly (Mamba's out_proj and
    conv1d), as PEFT does: the kernel would skip the unmerged term."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    names = FUSED_KERNEL_WEIGHTS.get(model_type, ())
    hit = [p for p in paths if p.rsplit(".", 1)[-1] in names]
    if hit and getattr(config, "peft_type", "LORA") == "LORA":
        found = sorted({p.rsplit(".", 1)[-1] for p in hit})
        raise TargetError(
            f"LoRA cannot go on {found} of a {model_type} model ({_few(hit)}): its fused CUDA kernels read those "
            "weights directly, so the adapter would be skipped there (PEFT refuses them too). Remove them from "
            f"target_modules / target_parameters, or (with all-linear, which selects out_proj) set "
            f"exclude_modules={found}"
        )


def _few(paths: list[str], n: int = 3) -> str:
    return ", ".join(paths[:n]) + (f" and {len(paths) - n} more" if len(paths) > n else "")


def find_parameter_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, Kind]]:
    """(module path, kind) for every weight the config's target_parameters select."""
    found = []
    for target in config.target_parameters or []:
        hits = [
            (path, parameter_kind(module, name))
            for path, module in logical_modules(model)
            for name in own_parameter_names(module)
            if _suffix_match(f"{path}.{name}", target)
        ]
        if not hits:
            params = [f"{p}.{n}" for p, m in logical_modules(model) for n in own_parameter_names(m)]
            close = difflib.get_close_matches(target, params, n=5, cutoff=0.4)
            raise TargetError(
                f"target_parameters entry {target!r} matches no parameter of the model"
                + (f"; close: {close}" if close else "")
            )
        found.extend(hits)
    return found


def find_token_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, list[int]]]:
    """(embedding path, token ids) for trainable_token_indices: a list means the input embedding."""
    wanted = getattr(config, "trainable_token_indices", None)
    if wanted is None:
        return []
    if isinstance(wanted, list):
        getter = getattr(model, "get_input_embeddings", None)
        embedding = getter() if callable(getter) else None
        while isinstance(getattr(embedding, "base_layer", None), nn.Module):  # wrapped by an earlier adapter
            embedding = embedding.base_layer
        path = next((p for p, m in logical_modules(model) if m is embedding), None)
        if path is None:
            raise TargetError(
                "trainable_token_indices as a list needs a model with get_input_embeddings(); "
                "name the embedding instead: trainable_token_indices={'<embedding name>': [ids]}"
            )
        wanted = {path: wanted}
    return [_one_embedding(model, name, ids) for name, ids in wanted.items()]


def _one_embedding(model: nn.Module, name: str, ids: list[int]) -> tuple[str, list[int]]:
    """The embedding `name` selects, checked. It is looked up among the logical modules, since an earlier adapter
    may have wrapped it (a LoRA on it, or token rows that parametrize its weight)."""
    found = [(p, m) for p, m in logical_modules(model) if _suffix_match(p, name) and isinstance(m, nn.Embedding)]
    if len(found) != 1:
        which = "matches no nn.Embedding" if not found else f"matches several: {[p for p, _ in found]}"
        raise TargetError(f"trainable_token_indices names {name!r}, which {which}; name one embedding by its path")
    path, embedding = found[0]
    weight = stored_parameter(embedding, "weight")
    tied = [  # modules below it hold the weight where an earlier adapter parametrizes it: not a tie
        p
        for p, m in logical_modules(model)
        if p != path and not p.startswith(f"{path}.") and any(w is weight for w in m.parameters(False))
    ]
    if tied:
        raise TargetError(
            f"{path} shares its weight with {tied} (tied embeddings); trainable tokens on a tied table are not "
            "supported in lorakit: untie them (model.config.tie_word_embeddings=False and a copy of the weight) "
            "or train these tokens with PEFT"
        )
    rows = embedding.num_embeddings
    if max(ids) >= rows:
        raise TargetError(f"token ids {[i for i in ids if i >= rows]} are outside {path}'s table of {rows} rows")
    return path, ids


def modules_to_save(config: LoraConfig) -> list[str]:
    return list(config.modules_to_save or []) + TASK_HEADS.get(config.task_type or "", [])


def saved_name_matches(path: str, names) -> bool:
    """PEFT's rule for modules_to_save: the path ends with the name as text, not only at a dot ("classifier" is
    DistilBERT's pre_classifier too, "norm" every layer's input_layernorm), unlike target_modules' names."""
    return any(path.endswith(name) for name in names)


def default_targets(model: nn.Module) -> list[str] | str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        targets = DEFAULT_TARGETS[model_type]
        return targets if isinstance(targets, str) else list(targets)
    raise TargetError(
        f"no default target_modules for this model (model_type={model_type!r}); pass target_modules, "
        "e.g. target_modules='all-linear' or the names that `lorakit inspect` suggests"
    )


def _resolve_target_names(model: nn.Module, config: LoraConfig) -> list[str] | str | None:
    if config.target_modules is not None:
        return config.target_modules
    if config.target_parameters:
        return None
    return default_targets(model)


def _selected(path: str, module: nn.Module, targets, head: nn.Module | None, config: LoraConfig) -> bool:
    if targets == "all-linear":
        hit = _is_plain_matmul(module) and module is not head
    elif isinstance(targets, str):
        hit = re.fullmatch(targets, path) is not None
    else:
        hit = _matches_any(path, targets)
    if not hit:
        return False
    if _excluded(path, config):
        return False
    named_in_full = isinstance(targets, list) and path in targets  # adapted whatever layers_to_transform says (PEFT)
    if named_in_full or not config.layers_to_transform:  # [] filters nothing (PEFT)
        return True
    return _layer_index(path, config) in config.layers_to_transform


def _excluded(path: str, config: LoraConfig) -> bool:
    excluded = config.exclude_modules
    if excluded is None:
        return False
    return bool(re.fullmatch(excluded, path) if isinstance(excluded, str) else _matches_any(path, excluded))


def _is_plain_matmul(module: nn.Module) -> bool:
    kind = kind_of(module)
    return kind is not None and kind.is_plain_matmul


def _layer_index(path: str, config: LoraConfig) -> int | None:
    """The first numbered segment after a name (the block: T5's decoder.block.1.layer.0, an expert inside
    layers.1.experts.3), or the one after `layers_pattern`, which may open the path; PEFT's rule."""
    patterns = config.layers_pattern
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(\d+)\.", path)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", path)
            if match:
                break
    return int(match.group(1)) if match else None


def _within_saved(path: str, saved: set[str]) -> bool:
    """The module is a modules_to_save module named at a dot, or lies inside one: it trains in full there, so PEFT
    gives it no LoRA (all-linear with task_type SEQ_CLS names classifier.dense, and the classifier is saved whole). A
    module that a name ends only as text (DistilBERT's pre_classifier for "classifier") is not: see _saved_clash."""
    parts = path.split(".")
    inside = any(saved_name_matches(".".join(parts[:end]), saved) for end in range(1, len(parts)))
    return inside or _matches_any(path, saved)


def _saved_clash(paths: list[str], targets, config: LoraConfig) -> str:
    """The error for LoRA targets that modules_to_save also takes, by the text-suffix rule alone. PEFT wraps such a
    module with LoRA, then fails to save it whole (TypeError); training it in full instead would drop the LoRA asked
    for, and write a file PEFT cannot load."""
    how = [
        f"{p} (modules_to_save {_saving_names(p, config)}; target_modules {_selector(p, targets, config)})"
        for p in paths
    ]
    names = sorted({p.rsplit(".", 1)[-1] for p in paths})
    named = config.target_modules is not None and not isinstance(config.target_modules, str)
    return (
        f"{', '.join(how)}: selected for LoRA and, as modules_to_save names match the end of a path as text (PEFT's "
        "rule), also to be trained in full; a module cannot be both, and PEFT refuses this too. Keep it out of LoRA "
        f"with exclude_modules={names} (it then trains in full){', or drop it from target_modules' if named else ''}"
        ", or give modules_to_save a name that ends only the paths meant"
    )


def _saving_names(path: str, config: LoraConfig) -> str:
    """The modules_to_save names that take `path`, each said to come from task_type where the task adds it."""
    task = f" from task_type={config.task_type!r}"
    added = [n for n in TASK_HEADS.get(config.task_type or "", []) if n not in (config.modules_to_save or [])]
    return ", ".join(repr(n) + (task if n in added else "") for n in modules_to_save(config) if path.endswith(n))


def _selector(path: str, targets, config: LoraConfig) -> str:
    """What in target_modules selected `path`: the names that end it, the regex, all-linear, or the defaults."""
    if config.target_modules is None:
        return f"default {targets!r}"
    if isinstance(targets, str):
        return repr(targets)
    return repr([t for t in targets if _suffix_match(path, t)])


def _suffix_match(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)


def _matches_any(path: str, names) -> bool:
    return any(_suffix_match(path, name) for name in names)


def _output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def _adaptable_names(model: nn.Module) -> list[str]:
    names = set()
    for path, module in logical_modules(model):
        if kind_of(module) is not None:
            names.add(path.rsplit(".", 1)[-1])
    return sorted(names)


def _nothing_matched(model: nn.Module, targets) -> str:
    candidates = _adaptable_names(model)
    names = [targets] if isinstance(targets, str) else targets
    close = list(dict.fromkeys(c for n in names for c in difflib.get_close_matches(n, candidates, n=3, cutoff=0.5)))
    hint = f" Did you mean {close}?" if close else ""
    return (
        f"target_modules {targets!r} matches no module LoRA can adapt.{hint} "
        f"Adaptable module names in this model: {candidates}"
    )


def _warn_unused_names(targets: list[str], found_paths: list[str]) -> None:
    unused = [t for t in targets if not any(_suffix_match(p, t) for p in found_paths)]
    if unused:
        warnings.warn(f"target_modules entries matched nothing and were ignored: {unused}", stacklevel=3)
