"""The HTTP layer without a server process: request bodies, choices, clients that leave (an in-process app over the
tiny model, or a stand-in engine)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from fastapi.testclient import TestClient

from lorakit import LoraModel
from lorakit.serve.adapters import AdapterRegistry
from lorakit.serve.app import ServerSettings, _generation, _respond, _submit_choices, create_app
from lorakit.serve.engine import Engine, Event, GenerationRequest
from lorakit.serve.errors import APIError
from lorakit.serve.protocol import ChatRequest, CompletionRequest, CompletionShape
from lorakit.serve.roots import AdapterRoots
from tests.serve.tiny import build_model, build_tokenizer

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def http() -> TestClient:
    """The app over the tiny base model (served as "model"), 2 rows + 2 waiting at most, a context of 64 tokens."""
    tokenizer = build_tokenizer()
    engine = Engine(LoraModel(build_model(len(tokenizer), tokenizer.eos_token_id)), tokenizer, 2, 2)
    settings = ServerSettings(base_id="model", max_model_len=64)
    app = create_app(engine, AdapterRegistry(engine, "model"), AdapterRoots([]), settings)
    with TestClient(app) as client:  # starts and stops the engine
        yield client


def test_null_means_the_fields_default(http: TestClient) -> None:
    """OpenAI marks these nullable and the openai client sends null for an option given as None."""
    chat = {"model": "model", "messages": HI, "max_tokens": 3}
    for field in ("temperature", "top_p", "n", "stream", "logprobs", "top_logprobs", "seed", "stop", "stream_options",
                  "max_completion_tokens", "max_tokens"):  # fmt: skip
        r = http.post("/v1/chat/completions", json={**chat, field: None})
        assert r.status_code == 200, (field, r.text)
    completion = {"model": "model", "prompt": "hi", "max_tokens": 3}
    for field in ("echo", "logprobs", "temperature", "top_p", "n", "stream", "seed", "stop"):
        r = http.post("/v1/completions", json={**completion, field: None})
        assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None, (field, r.text)
    r = http.post("/v1/completions", json={**completion, "max_tokens": None, "temperature": 0})
    assert r.json()["usage"]["completion_tokens"] == 16  # completions' default


def test_seeds_are_signed_64_bit(http: TestClient) -> None:
    """vLLM's range; seed + choice index past it (n > 1) still samples, modulo 2**64."""
    body = {"model": "model", "prompt": "hi", "max_tokens": 2, "temperature": 1.0}
    for seed in (2**64, 2**63, -(2**63) - 1):
        r = http.post("/v1/completions", json={**body, "seed": seed})
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text
    for seed in (2**63 - 1, -(2**63)):
        r = http.post("/v1/completions", json={**body, "seed": seed, "n": 2})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2, r.text


def test_malformed_json_is_named_as_such(http: TestClient) -> None:
    r = http.post("/v1/chat/completions", content=b'{"model": "a1", "messages": [',
                  headers={"content-type": "application/json"})  # fmt: skip
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] is None and error["type"] == "invalid_request_error"
    assert error["message"].startswith("request body is not valid JSON: ")


def test_more_choices_than_the_server_ever_takes_is_a_400(http: TestClient) -> None:
    """prompts x n past max-concurrent + max-queue (4 here) could never run: not a 429 to retry forever."""
    r = http.post("/v1/completions", json={"model": "model", "prompt": ["hi"] * 3, "n": 2, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n" and "at most 4" in r.json()["error"]["message"]
    assert http.get("/health").json()["waiting"] == 0
    r = http.post("/v1/completions", json={"model": "model", "prompt": ["hi"] * 2, "n": 2, "max_tokens": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 4


def test_without_max_tokens_a_completion_may_fill_the_context() -> None:
    """As OpenAI and vLLM: no max_tokens means up to the context, not a cap of the server's."""
    settings = ServerSettings(base_id="model", max_model_len=2000)
    body = ChatRequest(model="model", messages=HI)
    assert _generation(body, "__base__", [1] * 30, None, settings).max_tokens == 1970
    assert _generation(body, "__base__", [1] * 30, 5, settings).max_tokens == 5
    with pytest.raises(APIError) as full:
        _generation(body, "__base__", [1] * 2000, None, settings)
    assert full.value.code == "context_length_exceeded"


class _StandIn:
    """An engine that takes jobs without running them: each job either gets a token's event every millisecond
    (`flowing`) or nothing (it waits in the queue); submit number `fail_at` raises."""

    max_concurrent, max_queue = 4, 4

    def __init__(self, flowing: bool = False, fail_at: int | None = None) -> None:
        self.flowing, self.fail_at, self.jobs = flowing, fail_at, []

    def submit(self, request: GenerationRequest, emit) -> _StandInJob:
        if len(self.jobs) == self.fail_at:
            raise ValueError("Overflow when unpacking long")
        job = _StandInJob()
        self.jobs.append(job)
        if self.flowing:
            threading.Thread(target=job.decode, args=(emit,), daemon=True).start()
        return job


class _StandInJob:
    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def decode(self, emit) -> None:
        while not self.cancelled.wait(0.001):
            emit(Event(text="x", completion_tokens=1))


class _GoneClient:
    async def is_disconnected(self) -> bool:
        return True


def _answer(engine: _StandIn, body: CompletionRequest) -> tuple[object, float]:
    """(_respond's result, seconds it took) for `body` whose client has gone; a streamed body is read to its end."""

    async def respond() -> tuple[object, float]:
        started = time.monotonic()
        request = GenerationRequest("__base__", [1], 4000)
        result = await _respond(engine, _GoneClient(), body, [request], CompletionShape(str), "cmpl-1")
        if body.stream:
            result = [chunk async for chunk in result.body_iterator]
        return result, time.monotonic() - started

    async def within_5_s() -> tuple[object, float]:
        task = asyncio.ensure_future(respond())
        if not (await asyncio.wait({task}, timeout=5))[0]:
            for job in engine.jobs:  # stop the events (a cancellation may be lost in wait_for on Python 3.11)
                job.cancel()
            task.cancel()
            await asyncio.wait({task}, timeout=5)
            pytest.fail("the request did not notice in 5 s that its client had gone")
        return task.result()

    return asyncio.run(within_5_s())


def test_a_gone_client_is_noticed_while_its_request_decodes() -> None:
    """Events arrive every millisecond (a request decoding), yet the client's absence is noticed within a second."""
    engine = _StandIn(flowing=True)
    result, took = _answer(engine, CompletionRequest(model="m", prompt="x", max_tokens=4000))
    assert result is None and took < 2 and all(job.cancelled.is_set() for job in engine.jobs)


def test_a_gone_client_is_noticed_while_its_stream_waits_in_the_queue() -> None:
    """No event comes (the job waits for a row), nothing has been streamed yet: the stream ends and withdraws it."""
    engine = _StandIn()
    chunks, took = _answer(engine, CompletionRequest(model="m", prompt="x", max_tokens=4000, stream=True))
    assert chunks == [] and took < 2 and engine.jobs[0].cancelled.is_set()


def test_a_failing_choice_withdraws_the_choices_submitted_before_it() -> None:
    """Whatever fails (a 429 for a full server, or a bug), no earlier choice is left decoding for nobody."""
    engine = _StandIn(fail_at=2)
    with pytest.raises(ValueError):
        _submit_choices(engine, [GenerationRequest("__base__", [1], 4, seed=7)], 3, lambda i, event: None)
    assert len(engine.jobs) == 2 and all(job.cancelled.is_set() for job in engine.jobs)
