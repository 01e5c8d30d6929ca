"""The adapters a server offers, by name: read from disk in the caller's thread, attached by the engine's worker.

Reading files is the slow part of loading, so it happens outside the worker, through the library's AdapterCache
(an adapter unloaded and loaded again comes from RAM); attaching (adding the modules and copying tensors that are
already in RAM) is quick and runs between two decode steps, so decoding never waits for a disk. Unloading waits
until no running or waiting request uses the adapter.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lorakit import io
from lorakit.errors import LorakitError
from lorakit.multi import AdapterCache
from lorakit.names import BASE_NAME, check_adapter_name
from lorakit.serve.engine import Engine
from lorakit.serve.errors import APIError, model_not_found


@dataclass
class ServedAdapter:
    name: str
    path: Path
    parent: str | None = None


@dataclass
class _ReadAdapter:
    """An adapter's files, read into RAM and checked, ready to attach."""

    adapter: ServedAdapter
    config: Any
    weights: dict[str, Tensor]


class AdapterRegistry:
    """name -> ServedAdapter for everything a request may name; the base model answers to `base_id`."""

    def __init__(self, engine: Engine, base_id: str, cache: AdapterCache | None = None) -> None:
        self.engine, self.base_id = engine, base_id
        self.cache = (
            cache if cache is not None else AdapterCache(device_slots=0)
        )  # read only here, never by the worker: no lock needed
        self.served: dict[str, ServedAdapter] = {}
        self._reserved: set[str] = set()
        self._unloading: set[str] = set()  # unloaded, but their modules wait for the requests that still use them
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()  # one reader at a time keeps the cache's LRU bookkeeping whole

    def route(self, model_id: str) -> str:
        """The adapter a request's `model` field names ("__base__" for the base); APIError 404 if none."""
        if model_id == self.base_id:
            return BASE_NAME
        if model_id in self.served:
            return model_id
        raise model_not_found(model_id, [self.base_id, *(a.name for a in self.snapshot())])

    def snapshot(self) -> list[ServedAdapter]:
        """The served adapters now (a copy: the worker may add one while a request lists them)."""
        with self._lock:
            return list(self.served.values())

    def read(self, name: str, path: Path, parent: str | None = None) -> _ReadAdapter:
        """Reserves `name` and reads the adapter's files (call outside the worker: this is the slow part)."""
        try:
            check_adapter_name(name)
        except LorakitError as err:
            raise APIError(400, str(err), param="lora_name") from None
        with self._lock:
            if name in self.served or name in self._reserved or name == self.base_id:
                raise APIError(400, f"the adapter {name!r} is already loaded; unload it first", param="lora_name")
            if name in self._unloading:
                raise APIError(
                    400,
                    f"the adapter {name!r} is still being unloaded (requests that use it are finishing); load it "
                    "again once its unload request has returned",
                    param="lora_name",
                )
            if parent is not None and parent not in self.served:
                raise APIError(404, f"parent adapter {parent!r} is not loaded", param="parent", code="model_not_found")
            self._reserved.add(name)
        try:
            with self._read_lock:
                config, weights = self.cache.read(path)
            return _ReadAdapter(ServedAdapter(name, path, parent), config, weights)
        except BaseException:
            self._release(name)
            raise

    def attach(self, read: _ReadAdapter) -> Future:
        """Adds the adapter to the model between two steps; it is routable once the Future is done."""
        return self.engine.between_steps(lambda: self._attach_now(read))

    def load(self, name: str, path: Path, parent: str | None = None) -> None:
        """read + attach, waiting for both (used at start-up)."""
        self.attach(self.read(name, path, parent)).result()

    def unload(self, name: str) -> Future:
        """Stops routing to `name` at once; the modules go once no request uses them."""
        with self._lock:
            if name not in self.served:
                raise model_not_found(name, [self.base_id, *self.served])
            children = [a.name for a in self.served.values() if a.parent == name]
            if children:
                raise APIError(400, f"adapter {name!r} is the parent of {children}; unload those first")
            adapter = self.served.pop(name)
            self._unloading.add(name)
        future = self.engine.between_steps(lambda: self.engine.model.delete_adapter(name), busy_name=name)
        future.add_done_callback(lambda f: self._unloaded(adapter, f))
        return future

    def _attach_now(self, read: _ReadAdapter) -> None:
        model, adapter = self.engine.model, read.adapter
        try:
            weights = _without_the_served_base(model, adapter, read.weights)
            read.config.inference_mode = True
            model.add_adapter(adapter.name, read.config, adapter_dtype=_serving_dtype(model), parent=adapter.parent)
            try:
                io.load_weights(model.model, adapter.name, model.peft_config[adapter.name], weights)
            except Exception:
                model.delete_adapter(adapter.name)
                raise
            with self._lock:
                self.served[adapter.name] = adapter
        finally:
            self._release(adapter.name)

    def _release(self, name: str) -> None:
        with self._lock:
            self._reserved.discard(name)

    def _unloaded(self, adapter: ServedAdapter, future: Future) -> None:
        """The unload is over: the name is free again, or, if deleting failed, the adapter is served again."""
        with self._lock:
            self._unloading.discard(adapter.name)
            if future.exception() is not None:
                self.served[adapter.name] = adapter


def _without_the_served_base(model: Any, adapter: ServedAdapter, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """The adapter's tensors without the base embedding tables its folder may carry (PEFT's and lorakit's
    save_embedding_layers): loading one copies it into the base every adapter shares, so a table that differs from
    the served one (a vocabulary changed in training) is refused; an equal one is left out."""
    served = io.base_weights_in_file(model.model, weights)
    changed = [k for k, t in served.items() if not torch.equal(weights[k].to(t.device, t.dtype), t)]
    if changed:
        raise APIError(
            400,
            f"the adapter {adapter.name!r} carries base-layer tensors that differ from the served model's "
            f"({changed[:2]}): it was trained with a changed vocabulary or embedding, which one base shared by every "
            "adapter cannot serve; serve it on its own base (merge_and_unload, then save that model)",
            param="lora_path",
        )
    return {k: t for k, t in weights.items() if k not in served}


def _serving_dtype(model: Any) -> torch.dtype | None:
    """The base's dtype for a half-precision base (factors in it, as vLLM serves them: no fp32 pass per layer);
    None (the library's default, fp32 factors) otherwise."""
    embeddings = model.model.get_input_embeddings() if hasattr(model.model, "get_input_embeddings") else None
    dtype = getattr(getattr(embeddings, "weight", None), "dtype", None)
    return dtype if dtype in (torch.bfloat16, torch.float16) else None
