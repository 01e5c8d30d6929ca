"""Everything a server needs, put together: the LoraModel, the engine, the adapters, the FastAPI app."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI

from lorakit import LoraModel
from lorakit.errors import LorakitError
from lorakit.serve.adapters import AdapterRegistry
from lorakit.serve.app import ServerSettings, create_app
from lorakit.serve.engine import Engine
from lorakit.serve.errors import APIError, ServeError
from lorakit.serve.roots import AdapterRoots


def build_server(
    base: Any,
    tokenizer: Any,
    base_id: str,
    adapters: dict[str, Path] | None = None,
    roots: list[Path] | None = None,
    api_key: str | None = None,
    max_concurrent: int = 16,
    max_queue: int = 64,
    max_model_len: int | None = None,
) -> tuple[FastAPI, AdapterRegistry]:
    """The app serving `base` (a transformers causal LM) as `base_id`, the named adapters and those under the
    roots; the engine's worker starts with the app."""
    model = base if isinstance(base, LoraModel) else LoraModel(base)
    model.eval()
    engine = Engine(model, tokenizer, max_concurrent=max_concurrent, max_queue=max_queue)
    registry = AdapterRegistry(engine, base_id)
    adapter_roots = AdapterRoots(list(roots or []))
    named = [(name, Path(path), None) for name, path in (adapters or {}).items()]
    for name, path, parent in adapter_roots.discover() + named:  # before the worker starts: attached at once
        _load_at_start(registry, name, path, parent)
    limit = max_model_len or getattr(model.config, "max_position_embeddings", None) or 2048
    settings = ServerSettings(base_id=base_id, max_model_len=limit, api_key=api_key)
    return create_app(engine, registry, adapter_roots, settings), registry


def _load_at_start(registry: AdapterRegistry, name: str, path: Path, parent: str | None) -> None:
    try:
        registry.load(name, path, parent)
    except (APIError, LorakitError) as err:
        message = err.message if isinstance(err, APIError) else str(err)
        raise ServeError(f"adapter {name} ({path}): {message}") from None
