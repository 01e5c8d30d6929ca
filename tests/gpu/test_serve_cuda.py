"""On CUDA only (skipped elsewhere): the serving engine with the model on the GPU gives, row for row, what the
library's own generate gives there, with requests for several adapters and the base decoded together."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from lorakit import LoraModel
from lorakit.serve.adapters import AdapterRegistry
from lorakit.serve.engine import Engine, Event, GenerationRequest
from tests.serve.tiny import write_tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ADAPTERS = ["a1", "a2", "a3"]


def _served(tmp_path: Path, dtype: torch.dtype) -> tuple[LoraModel, Engine, AdapterRegistry, Path]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, root = write_tiny(tmp_path, ADAPTERS)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval().to("cuda", dtype)
    model = LoraModel(base)
    engine = Engine(model, AutoTokenizer.from_pretrained(model_dir), max_concurrent=8)
    registry = AdapterRegistry(engine, "model")
    for name in ADAPTERS:
        registry.load(name, root / name)
    return model, engine, registry, root


def _run(engine: Engine, requests: list[GenerationRequest]) -> list[list[int]]:
    done = [threading.Event() for _ in requests]
    jobs = []
    for request, event in zip(requests, done, strict=True):

        def emit(e: Event, event: threading.Event = event) -> None:
            if e.finish_reason or e.error:
                event.set()

        jobs.append(engine.submit(request, emit))
    for event in done:
        assert event.wait(120)
    return [job.tokens for job in jobs]


def _generate(model: LoraModel, adapter: str, ids: list[int], max_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids], device="cuda"), adapter_names=[adapter], max_new_tokens=max_tokens, do_sample=False
        )
    return out[0, len(ids) :].tolist()


def test_mixed_rows_on_the_gpu_equal_generate_alone(tmp_path: Path) -> None:
    model, engine, _, _ = _served(tmp_path, torch.float32)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [20, 21], [30, 31, 32, 33]]
    names = ["a1", "a2", "__base__", "a3", "a1", "a2"]
    requests = [GenerationRequest(n, prompts[i % 4], max_tokens=12 + i) for i, n in enumerate(names)]
    engine.start()
    try:
        got = _run(engine, requests)
    finally:
        engine.stop()
    for request, tokens in zip(requests, got, strict=True):
        assert tokens == _generate(model, request.adapter, request.prompt_ids, request.max_tokens), request.adapter


def test_a_bf16_base_gets_bf16_factors_and_the_same_tokens_as_generate(tmp_path: Path) -> None:
    model, engine, _, _ = _served(tmp_path, torch.bfloat16)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.bfloat16}
    engine.start()
    try:
        (tokens,) = _run(engine, [GenerationRequest("a2", [5, 6, 7, 8], max_tokens=10)])
    finally:
        engine.stop()
    assert tokens == _generate(model, "a2", [5, 6, 7, 8], 10)
