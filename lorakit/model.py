"""LoraModel: a base model with named adapters; which are active, trainable, merged; save and load."""

from __future__ import annotations

import dataclasses
import re
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from lorakit import after_step, card, io, merge, packed, status
from lorakit.config import LoraConfig
from lorakit.errors import AdapterFileError, LorakitError
from lorakit.inject import inject_adapter, lora_layers, remove_adapter, saved_modules
from lorakit.kbit import inputs_require_grad
from lorakit.layer import LoraLayer
from lorakit.names import check_adapter_name
from lorakit.saved import SavedModule
from lorakit.state import AdapterState, Routing
from lorakit.targets import TASK_HEADS

if TYPE_CHECKING:
    from lorakit.multi.cache import AdapterCache


class LoraModel(nn.Module):
    """Wraps `model` (kept as `.model`, its modules adapted in place); forward passes straight through."""

    # transformers reads this on the model it trains to tell a quantized base with trainable adapters (which it
    # trains) from a bare quantized one (which it refuses); PEFT's loaded adapters set it, and so do ours
    _hf_peft_config_loaded = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.state = AdapterState()  # read by every adapted layer: active, trainable, enabled, tree, routing
        self.adapter_cache: AdapterCache | None = None  # when set, load_adapter / hotswap_adapter read folders from RAM
        for param in model.parameters():
            param.requires_grad_(False)
        self._show_base_signature()
        self.register_state_dict_post_hook(_unshared_state)

    def _show_base_signature(self) -> None:
        """transformers.Trainer keeps only the dataset columns named in model.forward's signature (it looks through
        PEFT's class, not ours), so this instance's forward is the base model's call under the base's signature.
        It holds the base and a weak reference to this wrapper: no reference cycle, so `del model` frees memory.
        adapter_names (PEFT's keyword) routes row i of the batch to adapter_names[i] for this call."""
        base, owner = self.model, weakref.ref(self)

        def forward(*args, adapter_names: list[str] | None = None, **kwargs):
            if adapter_names is None:
                owner()._unrouted()
                return base(*args, **kwargs)
            lora = owner()
            routing = lora._routing(adapter_names, _batch_size(args, kwargs))
            state = lora.state
            with state.routed(routing):  # routed() without its own block: a decode step's host time
                out = base(*args, **kwargs)
            if torch.is_grad_enabled():  # activation checkpointing reruns the forward in backward
                state.replay_in_backward(out, routing)
            return out

        forward.__wrapped__ = base.forward
        self.__dict__["forward"] = forward

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "forward"}  # rebuilt for the copy's own base

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._show_base_signature()
        self._register_after_step()  # a copy's Delta-LoRA factors update the copy's weights

    def forward(self, *args, adapter_names: list[str] | None = None, labels: torch.Tensor | None = None, **kwargs):
        """`labels` is named because transformers.Trainer finds the label columns in the class's signature (PEFT's
        class is looked through, ours is not); without it evaluate() and predict() compute no loss."""
        if labels is not None:
            kwargs["labels"] = labels
        return self.__dict__["forward"](*args, adapter_names=adapter_names, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The base's generate; adapter_names routes each input row (and the beams or samples it expands to)."""
        if adapter_names is None:
            with torch.no_grad():  # generate records no gradients: its compiled steps may read the pack
                self._unrouted()
            return self.model.generate(*args, **kwargs)
        with self.routed(adapter_names, _batch_size(args, kwargs)):
            return self.model.generate(*args, **kwargs)

    def _unrouted(self) -> None:
        """An unrouted call starts: compiled inference steps read the live adapter from one buffer (lorakit.packed)."""
        if self.state.pack_wanted and not torch.compiler.is_compiling():  # a compiled LoraModel: never traced
            packed.prepare(self.state, lambda: lora_layers(self.model))

    @contextmanager
    def routed(self, adapter_names: list[str], batch_size: int | None = None) -> Iterator[None]:
        """Inside the block, row i of every batch the model runs uses adapter_names[i] ("__base__": no adapter; a
        tree node: its whole path) instead of the active adapters; trains too (each adapter gets its rows' grads)."""
        with self.state.routed(self._routing(adapter_names, batch_size)):
            yield

    def _routing(self, adapter_names: list[str], batch_size: int | None) -> Routing:
        """The checked Routing of `adapter_names` for a batch of `batch_size` rows (None: not known)."""
        routing = self.state.routing_for(adapter_names)
        if batch_size is not None and batch_size != routing.batch_size:
            raise LorakitError(
                f"adapter_names has {routing.batch_size} entries but the batch has {batch_size} rows; give one "
                "adapter name (or '__base__') per row"
            )
        if not routing._cache.get("routable"):  # a Routing lives only while the adapters it names are unchanged
            self._check_routable(list(routing.rows))
            routing._cache["routable"] = True
        return routing

    def _check_routable(self, names: list[str]) -> None:
        """Refuses what no row can be routed to. Merged adapters are refused by each layer holding them as the
        forward reaches it: walking every module here would cost more than a decode step's LoRA math."""
        on_weight = [n for n in names if self.peft_config[n].target_parameters]
        if on_weight:
            raise LorakitError(
                f"adapters {on_weight} use target_parameters: they change the weight every row shares, so they "
                "cannot be routed per row; use set_adapter() for them, or serve them in their own batches"
            )

    def __getattr__(self, name: str):
        """What this wrapper does not hold is the base model's, as PEFT's PeftModel passes it on: code written for
        PEFT reads model.device, model.dtype, model.generation_config or calls model.gradient_checkpointing_enable()
        on the wrapper. Only names that would act on the whole base in place of the adapters are refused."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("model")
            if base is None or name.startswith("__") or name in _NOT_PASSED_ON:
                raise
            if name in _REFUSED:
                raise AttributeError(f"LoraModel.{name}: {_REFUSED[name]}") from None
            return getattr(base, name)

    def _get_name(self) -> str:
        """The base model's class name: transformers.Trainer reads it (through PEFT's wrapper, not ours) to shift a
        causal LM's labels under label smoothing. The repr still starts with LoraModel."""
        return self.model._get_name()

    def __repr__(self) -> str:
        return type(self).__name__ + super().__repr__().removeprefix(self._get_name())

    @property
    def config(self):
        """The base model's (transformers) config, for code that expects model.config."""
        return getattr(self.model, "config", None)

    @property
    def peft_type(self) -> str:
        """The active adapter's kind in PEFT's words ("LORA", "VERA", ...)."""
        return getattr(self.peft_config[self.active_adapter], "peft_type", "LORA")

    @property
    def active_peft_config(self) -> LoraConfig:
        return self.peft_config[self.active_adapter]

    @property
    def modules_to_save(self) -> set[str] | None:
        """The names trained in full over every adapter, the task's head among them, as PEFT's attribute holds them."""
        names = set()
        for config in self.peft_config.values():
            names.update(getattr(config, "modules_to_save", None) or ())
            names.update(TASK_HEADS.get(getattr(config, "task_type", None), ()))
        return names or None

    @property
    def targeted_module_names(self) -> list[str]:
        """The paths of the modules that carry an adapter (PEFT's list; weights adapted by target_parameters are in
        targeted_parameter_names)."""
        return [path for path, layer in lora_layers(self.model) if not layer.acts_on_weight]

    @property
    def base_model_torch_dtype(self) -> torch.dtype | None:
        return getattr(self.model, "dtype", None)

    @property
    def base_model(self) -> LoraModel:
        """This model, which plays both PEFT roles (PeftModel and its tuner): `model.base_model.model` is the base."""
        return self

    def get_base_model(self) -> nn.Module:
        """The wrapped base model (its modules adapted in place), as PEFT's get_base_model returns it."""
        return self.model

    @property
    def active_adapters(self) -> list[str]:
        """The adapters whose contributions add up, ancestors first (a tree node brings its path)."""
        return list(self.state.active)

    @property
    def active_adapter(self) -> str:
        return self.active_adapters[0]

    @property
    def merged_adapters(self) -> list[str]:
        """Adapters merged into the weights of at least one layer."""
        return sorted({n for _, layer in lora_layers(self.model) for n in layer.merged_adapters})

    # -- adapters by name ------------------------------------------------------------------------
    def add_adapter(
        self,
        adapter_name: str,
        peft_config: LoraConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
        *,
        adapter_dtype: torch.dtype | None = None,
        parent: str | None = None,
    ) -> None:
        """Adds adapter `adapter_name`, inactive and frozen unless it is the first (set_adapter activates it).

        low_cpu_mem_usage: accepted as PEFT's; no effect (the factors are small and created in place).
        autocast_adapter_dtype: as in PEFT, fp16/bf16 layers get fp32 factors; False keeps each layer's dtype.
        parent: makes it a tree node, a LoRA on top of `parent`: the model at the node is the base plus every delta
        on the path root .. node, and set_adapter(name) activates that path while only the node trains."""
        name, config = adapter_name, io.as_config(peft_config)  # a PEFT config object is read as its file would be
        check_adapter_name(name)
        if name in self.peft_config:
            raise LorakitError(f"adapter {name!r} exists already; delete_adapter({name!r}) first")
        self._check_new_config(name, config, parent)
        config = dataclasses.replace(config)  # the model's own copy: injection may record facts in it
        self.state.add(name, parent)
        try:
            inject_adapter(self.model, name, config, adapter_dtype)
        except Exception:
            self.state.remove(name)
            raise
        self.peft_config[name] = config
        if not autocast_adapter_dtype and adapter_dtype is None:
            self._keep_base_dtype(name)
        self._attach_state()
        self._register_after_step()
        if not self.state.active:
            self.state.activate([name])
            self._set_trainable()
        else:
            self._set_trainable([name])  # the others' flags are unchanged

    def _keep_base_dtype(self, name: str) -> None:
        """PEFT's autocast_adapter_dtype=False: adapter `name`'s factors in its layer's own (floating) dtype."""
        for _, layer in lora_layers(self.model):
            if name in layer.adapters and layer.stored_weight.is_floating_point():
                layer.adapters[name].to(layer.stored_weight.dtype)

    def _check_new_config(self, name: str, config: LoraConfig, parent: str | None) -> None:
        biased = [n for n, c in self.peft_config.items() if c.bias != "none"]
        if config.bias != "none" and biased:
            raise LorakitError(
                f"adapter {biased[0]!r} already trains the biases (bias={self.peft_config[biased[0]].bias!r}), which "
                f"all adapters share; add {name!r} with bias='none' (PEFT allows one adapter with bias)"
            )
        if parent is not None and (config.use_dora or self._is_dora(parent)):
            raise LorakitError(
                f"DoRA rescales the whole weight W + dW, so it is not a delta that adds up along a tree path; "
                f"{name!r} cannot be a DoRA node or the child of one ({parent!r}): use plain LoRA nodes"
            )

    def _is_dora(self, name: str) -> bool:
        config = self.peft_config.get(name)
        return bool(config is not None and getattr(config, "use_dora", False))

    def set_adapter(self, names: str | list[str], inference_mode: bool = False) -> None:
        """Makes `names` active (their contributions add up; a tree node brings its whole path); only `names`
        themselves train, so a node's ancestors stay frozen. As in PEFT, they train even if loaded frozen, unless
        inference_mode=True."""
        names = [names] if isinstance(names, str) else list(names)
        self.state.check_known(names)
        path = self.state.paths(names)
        for _, saved in saved_modules(self.model):
            saved.copy_for(path)  # raises, before any change, if two of them own a copy of one module
        merged = self.merged_adapters  # a walk over the layers
        if merged:  # as PEFT: a merged adapter would stay in every output whatever is active
            warnings.warn(
                f"adapters {merged} are merged: unmerging them before setting the active adapters",
                UserWarning,
                stacklevel=2,
            )
            self.unmerge_adapter()
        self.state.activate(names)
        for name in names:
            self.peft_config[name].inference_mode = inference_mode
        self._set_trainable()

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """PEFT's: the named adapters' parameters take gradients or not, active or not, until the next
        set_adapter or add_adapter sets them from the active adapters again."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.state.check_known(names)
        self._train_adapters(dict.fromkeys(names, requires_grad))

    def delete_adapter(self, name: str) -> None:
        if name not in self.peft_config:  # PEFT's words first: code written for PEFT may match them
            raise LorakitError(f"Adapter {name} does not exist; known adapters: {sorted(self.peft_config)}")
        children = self.state.children(name)
        if children:
            raise LorakitError(f"adapter {name!r} is the parent of {children}; delete those children first")
        if name in self.merged_adapters:
            raise LorakitError(f"adapter {name!r} is merged into the weights; unmerge_adapter() before deleting it")
        remove_adapter(self.model, name)
        del self.peft_config[name]
        self.state.remove(name)
        if not self.peft_config:  # the last one: the model goes back to its own modules
            merge.unload(self.model)
        elif not self.state.active:
            first = next(iter(self.peft_config))
            self.set_adapter(first, inference_mode=self.peft_config[first].inference_mode)  # frozen stays frozen
        self._set_trainable()

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Runs the base model alone inside the block (merged adapters are unmerged, then re-merged); adapters
        get requires_grad=False inside (as in PEFT) and their previous flags back after."""
        self._warn_trained_biases()
        merged = self.merged_adapters
        merge.unmerge_adapters(self.model)
        flags = [(p, p.requires_grad) for module in self._adapter_hosts() for p in _adapter_parameters(module)]
        for param, _ in flags:
            param.requires_grad_(False)
        self.state.enabled = False
        try:
            yield
        finally:
            self.state.enabled = True
            for param, flag in flags:
                param.requires_grad_(flag)
            if merged:
                merge.merge_adapters(self.model, merged)

    def disable_adapter_layers(self) -> None:
        """PEFT's: the base model alone until enable_adapter_layers() (merged adapters are unmerged now); the
        adapters get requires_grad=False."""
        self._warn_trained_biases(stacklevel=3)
        merge.unmerge_adapters(self.model)
        for module in self._adapter_hosts():
            for param in _adapter_parameters(module):
                param.requires_grad_(False)
        self.state.enabled = False

    def enable_adapter_layers(self) -> None:
        """PEFT's: the active adapters count again and train as set_adapter set them. Unlike PEFT 0.21, an adapter
        loaded frozen (is_trainable=False, inference_mode) stays frozen."""
        self.state.enabled = True
        self._set_trainable()

    def _warn_trained_biases(self, stacklevel: int = 5) -> None:  # 5: the caller's `with` line, through contextlib
        for name in self.state.active:
            bias = self.peft_config[name].bias
            if bias != "none":
                warnings.warn(
                    f"Careful, disabling adapter layers with bias configured to be '{bias}' does not produce the "
                    "same output as the base model would without adaption (the trained biases stay).",
                    stacklevel=stacklevel,
                )

    # -- merging ---------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Folds the active adapters (or `adapter_names`) into the base weights; warns, as PEFT does, where some or
        all of them are merged already."""
        names = self._with_paths(adapter_names)
        self._warn_merged_already(names)
        merge.merge_adapters(self.model, names, safe=safe_merge)

    def _with_paths(self, names: list[str] | None) -> list[str]:
        """The active adapters, or `names` with their tree ancestors: a node means the model at that node."""
        if isinstance(names, str):  # PEFT's TypeError: read as a list, a name would be its letters
            raise TypeError(f"adapter_names should be a list of strings, got {names!r}; pass [{names!r}]")
        return self.active_adapters if names is None else self.state.paths(names)

    def _warn_merged_already(self, names: list[str]) -> None:
        """PEFT's warnings (its words) when merging adapters of which some are in the weights already."""
        merged = self.merged_adapters
        if not merged:
            return
        new = [n for n in names if n not in merged]
        if new:
            message = (
                f"Already following adapters were merged {','.join(merged)}. You are now additionally merging "
                f"{','.join(new)}."
            )
        else:
            message = "All adapters are already merged, nothing to do."
        warnings.warn(message, UserWarning, stacklevel=3)

    def unmerge_adapter(self) -> None:
        """Takes every merged adapter out of the base weights; warns, as PEFT does, when none is merged."""
        if not self.merged_adapters:
            warnings.warn("Already unmerged. Nothing to do.", UserWarning, stacklevel=2)
            return
        merge.unmerge_adapters(self.model)

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """The base model's own class with the adapters folded in; no LoRA module left, no extra latency.

        progressbar: accepted as PEFT's (same order of arguments); lorakit shows no bar, merging takes milliseconds."""
        names = self._with_paths(adapter_names)
        self._warn_merged_already(names)
        return merge.merge_and_unload(self.model, names, safe=safe_merge)

    def unload(self) -> nn.Module:
        """The base model's own class as it was before any adapter."""
        return merge.unload(self.model)

    def add_weighted_adapter(
        self,
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
        """PEFT's weighted combination into a new, inactive adapter (types and rules: lorakit.multi.combine).

        seed: makes the random dare_* types repeatable (None: torch's global generator, as PEFT)."""
        from lorakit.multi import combine  # multi builds on this module, so it is imported when used

        combine.add_weighted_adapter(
            self, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp, svd_full_matrices,
            svd_driver, density, majority_sign_method, seed,
        )  # fmt: skip

    # -- files -----------------------------------------------------------------------------------
    def save_pretrained(
        self,
        directory: str | Path,
        safe_serialization: bool = True,
        selected_adapters: list[str] | str | None = None,
        save_embedding_layers: str | bool = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | Path | None = None,
        convert_pissa_to_lora: str | Path | None = None,
    ) -> None:
        """PEFT's layout: 'default' in `directory`, every other adapter in `directory/<name>` (PEFT's arguments,
        in its order).

        safe_serialization: True (safetensors) is the only format lorakit writes; False (a pickle) is refused.
        convert_pissa_to_lora: PEFT's old name, removed in PEFT 0.21 (which ignores it): refused, naming the new one.

        path_initial_model_for_weight_conversion: as in PEFT, the folder saved right after a PiSSA / OLoRA init;
        the adapter is then written as a plain LoRA against the original base weight.
        is_main_process: as in PEFT; with a model sharded by FSDP every rank calls this (the shards are gathered
        from all of them) and only the main process writes.
        save_embedding_layers: as in PEFT, whether the base tables of adapted input / output embeddings are saved
        whole beside the factors ("auto": where target_modules names embed_tokens or lm_head).
        """
        _check_save_options(safe_serialization, convert_pissa_to_lora)
        if selected_adapters is None:
            names = list(self.peft_config)
        else:  # []: none, as PEFT; one name as a string: that adapter
            names = [selected_adapters] if isinstance(selected_adapters, str) else list(selected_adapters)
        self.state.check_known(names)  # before anything is written
        for name in names:  # as PEFT: where the base came from, so AutoLoraModel (or PEFT's Auto classes) can load it
            config = self.peft_config[name]
            if getattr(config, "base_model_name_or_path", "") is None:
                config.base_model_name_or_path = self.model.__dict__.get("name_or_path") or None
        for name in names:
            target = Path(directory) if name == "default" else Path(directory) / name
            initial = path_initial_model_for_weight_conversion
            io.save_adapter(
                self.model, name, self.peft_config[name], target, initial, is_main_process, save_embedding_layers
            )
        if names and any(self.state.parents.values()) and is_main_process:
            self._save_tree_manifest(Path(directory), names)
        if names and is_main_process:
            card.write_card(directory, self.model, {n: self.peft_config[n] for n in names})

    def _save_tree_manifest(self, directory: Path, names: list[str]) -> None:
        """lorakit_tree.json next to the node folders: who is whose parent (each folder holds its own delta)."""
        from lorakit.multi import tree  # multi builds on this module, so it is imported when used

        missing = sorted({p for n in names for p in self.state.path(n)} - set(names))
        if missing:
            raise LorakitError(f"saving tree nodes {names} needs their ancestors {missing} too; select them as well")
        tree.write_manifest(directory, {n: self.state.parents[n] for n in names})

    def load_adapter(
        self,
        directory: str | Path,
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        *,
        parent: str | None = None,
        config: LoraConfig | None = None,
        subfolder: str | None = None,
    ) -> _IncompatibleKeys:
        """Adds the adapter saved in `directory` under `adapter_name` (a tree node below `parent`, if given);
        nothing changes if it does not fit. A whole saved tree: lorakit.multi.tree.load_tree.

        Returns PEFT's load result: its missing_keys and unexpected_keys are empty, as a file whose keys do not fit
        the adapter is refused. As in PEFT, loading frozen (is_trainable=False) puts the whole model in eval mode.

        PEFT's arguments, in its order: torch_device, ephemeral_gpu_offload and low_cpu_mem_usage are accepted and
        change nothing (the factors are created on their layer's device, and loading copies into them);
        autocast_adapter_dtype as in add_adapter; key_mapping renames the file's keys by regex as PEFT does
        (default: the base model's _checkpoint_conversion_mapping); config replaces adapter_config.json;
        subfolder: the adapter is in directory/subfolder."""
        check_adapter_name(adapter_name)  # before reading files, so a bad name costs nothing
        directory = Path(directory) / subfolder if subfolder else directory
        if self.adapter_cache is not None:
            read_config, weights = self.adapter_cache.read(directory)
        else:
            read_config, weights = io.read_config(directory), io.read_weights(directory)
        if config is not None:
            _check_projection_key(directory, read_config, config)
        config = dataclasses.replace(config) if config is not None else read_config
        config.inference_mode = not is_trainable
        if key_mapping is None:
            key_mapping = getattr(self.model, "_checkpoint_conversion_mapping", None)
        weights = remap_keys(weights, key_mapping)
        self.add_adapter(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype, parent=parent)
        try:
            io.load_weights(self.model, adapter_name, self.peft_config[adapter_name], weights)
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        if is_trainable and parent is None:  # as PEFT: it trains while inactive, until the next set_adapter
            self._train_adapters({adapter_name: True})
        if not is_trainable:
            self.eval()  # as PEFT: dropout off, so a model loaded for inference gives repeatable outputs
        return _IncompatibleKeys(missing_keys=[], unexpected_keys=[])

    def hotswap_adapter(self, source: str | Path, adapter_name: str, rank: int | None = None) -> None:
        """Copies `source` (a loaded adapter's name, else a folder) into adapter `adapter_name` in place: fixed
        shapes (rank padded to `rank`), scale folded into B, so a compiled model does not recompile.
        Rules and limits: lorakit.multi.cache."""
        from lorakit.multi import cache  # multi builds on this module, so it is imported when used

        cache.hotswap_adapter(self, source, adapter_name, rank)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        directory: str | Path,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: LoraConfig | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        **kwargs,
    ) -> LoraModel:
        """Loads a lorakit or PEFT adapter folder onto `model`; frozen unless is_trainable. PEFT's arguments, in its
        order, meaning what they mean in load_adapter; of PEFT's **kwargs, torch_device and subfolder are taken,
        device_map is accepted and changes nothing (PEFT uses it only to dispatch a base offloaded to cpu or disk),
        and the hub's (revision, token, cache_dir, ...) are refused: lorakit reads local folders only."""
        allowed = {"torch_device", "subfolder", "device_map"}
        hub = sorted(k for k, v in kwargs.items() if k not in allowed and v is not None)
        if hub:
            raise LorakitError(
                f"from_pretrained got {hub}: lorakit reads local adapter folders only; download the adapter first "
                "(huggingface_hub.snapshot_download(repo_id, revision=...)) and pass its folder"
            )
        lora_model = cls(model)
        lora_model.load_adapter(
            directory, adapter_name, is_trainable, kwargs.get("torch_device"), autocast_adapter_dtype,
            ephemeral_gpu_offload, low_cpu_mem_usage, key_mapping, config=config, subfolder=kwargs.get("subfolder"),
        )  # fmt: skip
        return lora_model

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        """PEFT's: `model`'s input embeddings give outputs that require grad (unless it is quantized), so that
        reentrant activation checkpointing passes gradients on to the adapters inside its segments."""
        quantized = ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized")
        if not any(getattr(model, flag, False) for flag in quantized) and hasattr(model, "get_input_embeddings"):
            inputs_require_grad(model)
        return model

    # -- status ----------------------------------------------------------------------------------
    def get_layer_status(self) -> list[status.LayerStatus]:
        """PEFT's: every adapted layer (and module saved per adapter) with its adapters' state."""
        return status.layer_status(self.model, self.state.enabled, self.active_adapters, self._peft_types())

    def get_model_status(self) -> status.ModelStatus:
        """PEFT's: the layers' statuses folded together, "irregular" where layers disagree."""
        counts = self.get_nb_trainable_parameters()
        return status.model_status(self.model, self.state.enabled, self.active_adapters, self._peft_types(), counts)

    def _peft_types(self) -> dict[str, str]:
        return {name: config.peft_type for name, config in self.peft_config.items()}

    # -- parameters ------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) over every parameter, as PEFT counts: a modules_to_save module counts twice in the
        total (its frozen original and its trained copy are both in the model), a 4-bit weight twice its storage."""
        counts = [(status.stored_numel(p), p.requires_grad) for p in self.parameters()]
        return sum(n for n, trains in counts if trains), sum(n for n, _ in counts)

    def print_trainable_parameters(self) -> None:
        """PEFT's line, character for character."""
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def _adapter_hosts(self) -> Iterator[LoraLayer | SavedModule]:
        yield from (layer for _, layer in lora_layers(self.model))
        yield from (saved for _, saved in saved_modules(self.model))

    def _register_after_step(self) -> None:
        """A variant that acts after each optimizer step (Delta-LoRA) gets it from any optimizer over this model."""
        if any(a.variant.changes_base_weight for _, layer in lora_layers(self.model) for a in layer.adapters.values()):
            after_step.register(self)

    def _attach_state(self) -> None:
        """Every layer and saved module reads this model's state (a newly wrapped one came with its own)."""
        for module in self._adapter_hosts():
            module.state = self.state

    def _set_trainable(self, names: list[str] | None = None) -> None:
        """requires_grad of adapters `names` (all when None) from the state and their configs."""
        names = self.peft_config if names is None else names
        state = self.state
        self._train_adapters({n: n in state.trainable and not self.peft_config[n].inference_mode for n in names})

    def _train_adapters(self, trains: dict[str, bool]) -> None:
        """requires_grad of each named adapter's parameters (and the biases its config trains), one walk for all."""
        layers = [layer for _, layer in lora_layers(self.model)]
        saved_copies = [saved for _, saved in saved_modules(self.model)]
        for name, train in trains.items():
            config = self.peft_config[name]
            for layer in layers:
                if name in layer.adapters:
                    layer.adapters[name].requires_grad_(train)
                    if config.bias == "lora_only" and layer.bias is not None and train:
                        layer.bias.requires_grad_(True)
            for saved in saved_copies:
                if name in saved.copies:
                    saved.copies[name].requires_grad_(train)
            if config.bias == "all" and train:
                for path, param in self.model.named_parameters():
                    if path.rsplit(".", 1)[-1] == "bias" and ".original_module." not in path:  # PEFT's rule, as saved
                        param.requires_grad_(True)


_NOT_PASSED_ON = frozenset({"_is_hf_initialized"})  # transformers' loading code sets it on the wrapper itself
_REFUSED = {
    "push_to_hub": "it would upload the whole base model; lorakit has no hub: save_pretrained(folder) writes the "
    "adapter files (PEFT's format), upload that folder with huggingface_hub's upload_folder",
}


def _check_projection_key(directory: str | Path, saved: object, given: object) -> None:
    """A VeRA folder saved without its shared projections holds only the key that recreates them: a config passed
    in with another key would recreate another pair, and every output would silently change."""
    if getattr(saved, "save_projection", True) or not hasattr(given, "projection_prng_key"):
        return
    if given.projection_prng_key != saved.projection_prng_key:
        raise AdapterFileError(
            f"{directory} was saved without its VeRA projections, which only projection_prng_key="
            f"{saved.projection_prng_key} recreates; the config passed has {given.projection_prng_key}: leave the key "
            "as saved (or drop config=)"
        )


def _check_save_options(safe_serialization: bool, convert_pissa_to_lora: str | Path | None) -> None:
    if not safe_serialization:
        raise LorakitError(
            "safe_serialization=False asks for adapter_model.bin, a pickle file, which lorakit never writes (loading "
            "one can run code); PEFT and lorakit both read the safetensors file: leave safe_serialization=True"
        )
    if convert_pissa_to_lora is not None:
        raise LorakitError(
            "convert_pissa_to_lora was renamed path_initial_model_for_weight_conversion (PEFT 0.21 silently ignores "
            "the old name, saving an unconverted adapter); pass save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)"
        )


def _adapter_parameters(module: LoraLayer | SavedModule) -> Iterator[nn.Parameter]:
    container = module.adapters if isinstance(module, LoraLayer) else module.copies
    yield from container.parameters()


def _unshared_state(model: LoraModel, state: dict, prefix: str, _metadata: dict) -> None:
    """A tensor held under several names (tied input and output embeddings) gets its own copy under each name after
    the first, as safetensors refuses shared memory: transformers.Trainer writes a LoraModel's checkpoints with
    safetensors' save_file(model.state_dict()). Every name stays, so any state dict loads as before."""
    first: dict[int, str] = {}
    for name, tensor in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)):
        key = prefix + name
        if first.setdefault(id(tensor), key) != key and key in state and state[key] is not tensor:  # not keep_vars
            state[key] = state[key].clone()


def remap_keys(weights: dict[str, torch.Tensor], key_mapping: dict[str, str] | None) -> dict[str, torch.Tensor]:
    """PEFT's key_mapping: the first regex that matches a key (after its base_model[.model]. prefix) renames it."""
    if not key_mapping:
        return weights
    out = {}
    for key, value in weights.items():
        prefix = next((p for p in ("base_model.model.", "base_model.") if key.startswith(p)), "")
        rest = key.removeprefix(prefix)
        for pattern, replacement in key_mapping.items():
            renamed, count = re.subn(pattern, replacement, rest)
            if count:
                rest = renamed
                break
        out[prefix + rest] = value
    return out


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    """Rows of the batch: the first dimension of the first tensor argument (input_ids, pixel_values, x, ...)."""
    first = kwargs.get("input_ids")
    if isinstance(first, torch.Tensor) and first.dim():  # a decode step's: no tuple of every argument built
        return first.shape[0]
    first = kwargs.get("inputs_embeds")
    for value in (first, *args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim():
            return value.shape[0]
    return None


def get_lora_model(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
    *,
    adapter_dtype: torch.dtype | None = None,
) -> LoraModel:
    """Freezes `model`, adds adapter `adapter_name` from `config` and makes it active and trainable.

    PEFT's get_peft_model arguments, in its order: mixed=True (PEFT's mixed adapter types) is refused;
    autocast_adapter_dtype and low_cpu_mem_usage as in LoraModel.add_adapter; revision (the base model's hub
    revision, which PEFT writes into adapter_config.json) is accepted and not recorded: lorakit never downloads.
    adapter_dtype: the factors' dtype; default fp32 (fp64 for fp64 models), as PEFT does.
    """
    if mixed:
        raise LorakitError(
            "mixed=True builds PEFT's PeftMixedModel (adapters of different PEFT types together); lorakit mixes "
            "LoRA variants in one LoraModel already: call get_lora_model without mixed"
        )
    lora_model = LoraModel(model)
    lora_model.add_adapter(adapter_name, config, low_cpu_mem_usage, autocast_adapter_dtype, adapter_dtype=adapter_dtype)
    return lora_model
