"""The HTTP layer: OpenAI's routes over the engine, vLLM's adapter routes, errors in OpenAI's shape.

Every failure reaches the client as {"error": {"message", "type", "param", "code"}} with its status; a stack
trace only ever goes to the server's log.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import traceback
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from lorakit.errors import LorakitError
from lorakit.serve.adapters import AdapterRegistry
from lorakit.serve.engine import Engine, Event, GenerationRequest
from lorakit.serve.errors import APIError
from lorakit.serve.prompts import encode_chat, encode_completions
from lorakit.serve.protocol import (
    ChatRequest,
    ChatShape,
    CompletionRequest,
    CompletionShape,
    LoadAdapterRequest,
    UnloadAdapterRequest,
    _Sampling,
    envelope,
    new_id,
    usage,
)
from lorakit.serve.roots import AdapterRoots
from lorakit.serve.text import token_bytes

DISCONNECT_CHECK_S = 0.25  # how often a request asks whether its client is still there, whatever else happens


@dataclass
class ServerSettings:
    base_id: str
    max_model_len: int
    api_key: str | None = None


def create_app(engine: Engine, registry: AdapterRegistry, roots: AdapterRoots, settings: ServerSettings) -> FastAPI:
    """The FastAPI application; the engine starts and stops with it."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="lorakit serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    _add_error_handlers(app)
    auth = [Depends(_key_check(settings.api_key))]
    tokenizer = engine.tokenizer

    def token_text(token: int) -> str:  # one token alone, as logprobs list it
        return tokenizer.decode([token])

    bytes_of = token_bytes(tokenizer)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **engine.stats(), "adapters": len(registry.served)}

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        base = {"id": settings.base_id, "object": "model", "owned_by": "lorakit", "parent": None, "root": None}
        base["max_model_len"] = settings.max_model_len
        cards = [base] + [
            {
                "id": a.name,
                "object": "model",
                "owned_by": "lorakit",
                "parent": a.parent or settings.base_id,
                "root": str(a.path),
            }
            for a in registry.snapshot()
        ]
        return {"object": "list", "data": [{"created": 0, **card} for card in cards]}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(body: ChatRequest, request: Request) -> Any:
        adapter = registry.route(body.model)
        ids = encode_chat(tokenizer, [{"role": m.role, "content": m.text()} for m in body.messages])
        limit = body.max_completion_tokens or body.max_tokens
        job = _generation(body, adapter, ids, limit, settings)
        return await _respond(engine, request, body, [job], ChatShape(token_text, bytes_of), new_id("chatcmpl"))

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        if body.max_tokens == 0 and not body.echo:
            raise APIError(
                400,
                "max_tokens is 0, which asks for nothing without echo: set max_tokens to 1 or more, or send echo: true "
                "to get the prompt (and with logprobs, its tokens' logprobs) alone",
                param="max_tokens",
            )
        adapter = registry.route(body.model)
        prompts = encode_completions(tokenizer, body.prompt)
        jobs = [_generation(body, adapter, ids, body.max_tokens, settings) for ids in prompts]
        echo = [_prompt_text(tokenizer, body.prompt, i, ids) for i, ids in enumerate(prompts)] if body.echo else None
        return await _respond(engine, request, body, jobs, CompletionShape(token_text, echo), new_id("cmpl"))

    @app.post("/v1/load_lora_adapter", dependencies=auth)
    async def load_adapter(body: LoadAdapterRequest) -> PlainTextResponse:
        try:
            path = roots.resolve(body.lora_path)
        except LorakitError as err:
            raise APIError(400, str(err), param="lora_path") from None
        read = await asyncio.to_thread(registry.read, body.lora_name, path, body.parent)
        await asyncio.wrap_future(registry.attach(read))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=auth)
    async def unload_adapter(body: UnloadAdapterRequest) -> PlainTextResponse:
        await asyncio.wrap_future(registry.unload(body.lora_name))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return app


def _generation(
    body: _Sampling, adapter: str, ids: list[int], max_tokens: int | None, settings: ServerSettings
) -> GenerationRequest:
    """The engine's request; without max_tokens, up to the model's context (as OpenAI and vLLM do); 400 if prompt +
    max_tokens exceed the context (a prompt may fill it when max_tokens is 0: echo's scoring)."""
    room = settings.max_model_len - len(ids)
    if max_tokens is None:
        max_tokens = max(room, 1)
    if max_tokens > room:
        raise APIError(
            400,
            f"This model's maximum context length is {settings.max_model_len} tokens; the prompt has {len(ids)} "
            f"and max_tokens asks for {max_tokens}. Shorten the prompt or lower max_tokens.",
            param="messages" if isinstance(body, ChatRequest) else "prompt",
            code="context_length_exceeded",
        )
    stop = body.stop_list()
    if len(stop) > 8 or any(len(s) > 256 for s in stop):
        raise APIError(400, "give at most 8 stop strings of at most 256 characters each", param="stop")
    if body.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens ({body.min_tokens}) is above max_tokens ({max_tokens})", param="min_tokens")
    if isinstance(body, ChatRequest) and body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    return GenerationRequest(
        adapter,
        ids,
        max_tokens,
        body.temperature,
        body.top_p,
        body.seed,
        stop,
        body.ignore_eos,
        body.min_tokens,
        logprobs=body.logprobs_top(),
        prompt_logprobs=body.logprobs if isinstance(body, CompletionRequest) and body.echo else None,
    )


def _prompt_text(tokenizer: Any, prompt: str | list, index: int, ids: list[int]) -> str:
    """What echo writes back for prompt `index`: the text as the client sent it, or the text of its token ids."""
    if isinstance(prompt, str):
        return prompt
    return prompt[index] if isinstance(prompt[index], str) else tokenizer.decode(ids)


async def _respond(
    engine: Engine, request: Request, body: _Sampling, job_requests: list[GenerationRequest], shape: Any, rid: str
) -> Any:
    """Choices of every prompt: choice j of prompt p has index p * n + j, as OpenAI numbers a batch's choices."""
    events = _Events(request)
    jobs = _submit_choices(engine, job_requests, body.n, events.emit)
    prompt_tokens = sum(len(r.prompt_ids) for r in job_requests)
    scoring = job_requests[0].logprobs is not None
    echo = [shape.echo[i // body.n] for i in range(len(jobs))] if shape.echo else None  # per choice

    def cancel_all() -> None:
        for job in jobs:
            job.cancel()  # frees the rows at once if the client went away; a no-op for finished jobs

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        options = (prompt_tokens, include_usage, scoring, echo)
        stream = _stream(events, len(jobs), shape, rid, body.model, options, cancel_all)
        # background: also when the client leaves before the stream's first chunk (the generator never ran)
        return StreamingResponse(stream, media_type="text/event-stream", background=BackgroundTask(cancel_all))
    texts: list[list[str]] = [[echo[i]] if echo else [] for i in range(len(jobs))]
    scored: list[list] = [[] for _ in jobs]
    choices: list[dict | None] = [None] * len(jobs)
    completion_tokens = 0
    try:
        while None in choices:
            if (got := await events.next()) is None:  # the client is gone
                return None
            i, event = got
            if event.error:
                raise APIError(500, event.error, type="server_error")
            texts[i].append(event.text)
            scored[i].extend(event.prompt_logprobs or ())  # they come first
            scored[i].extend(event.logprobs)
            if event.finish_reason:
                logprobs = shape.logprobs(scored[i], i) if scoring else None
                choices[i] = shape.choice("".join(texts[i]), event.finish_reason, i, logprobs)
                completion_tokens += event.completion_tokens
        return envelope(shape.object, rid, body.model, choices, usage(prompt_tokens, completion_tokens))
    finally:
        cancel_all()


def _submit_choices(
    engine: Engine, job_requests: list[GenerationRequest], n: int, emit: Callable[[int, Event], None]
) -> list[Any]:
    """One engine job per choice of each prompt. With a seed, choice j samples with seed + j: reproducible, yet the
    choices differ (greedy choices are all the same text). 400 for more choices than the server ever takes at once;
    a failure for a later choice (a 429: the server is full now) withdraws the earlier ones."""
    wanted, most = len(job_requests) * n, engine.max_concurrent + engine.max_queue
    if wanted > most:
        raise APIError(
            400,
            f"this request asks for {wanted} completions (prompts x n) and this server takes at most {most} requests "
            "at once (--max-concurrent + --max-queue); send fewer prompts or a smaller n",
            param="n",
        )
    jobs: list[Any] = []
    try:
        for job_request in job_requests:
            for j in range(n):
                seed = None if job_request.seed is None else job_request.seed + j
                jobs.append(engine.submit(replace(job_request, seed=seed), partial(emit, len(jobs))))
    except BaseException:
        for job in jobs:
            job.cancel()
        raise
    return jobs


class _Events:
    """The events of one request's jobs, in the order the engine reports them, and whether its client is still there,
    asked every DISCONNECT_CHECK_S whether events flow (the jobs decode) or not (they wait in the queue)."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()  # (choice index, event)
        self.check_at = self.loop.time() + DISCONNECT_CHECK_S

    def emit(self, i: int, event: Event) -> None:  # called on the engine's thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, event))

    async def next(self) -> tuple[int, Event] | None:
        """The next (choice index, event); None once the client has disconnected."""
        while True:
            if self.loop.time() >= self.check_at:
                if await self.request.is_disconnected():
                    return None
                self.check_at = self.loop.time() + DISCONNECT_CHECK_S
            if not self.queue.empty():  # while decoding: no timer per event
                return self.queue.get_nowait()
            try:
                return await asyncio.wait_for(self.queue.get(), timeout=self.check_at - self.loop.time())
            except asyncio.TimeoutError:  # TimeoutError itself only from Python 3.11
                continue


async def _stream(
    events: _Events, n: int, shape: Any, rid: str, model: str, options: tuple[int, bool, bool, list | None],
    cancel_all: Callable[[], None],
) -> AsyncIterator[str]:  # fmt: skip
    """Server-sent events: one chunk per text delta (each naming its choice, with its tokens' logprobs when asked
    for), a chunk with each choice's finish reason, then [DONE] once every choice has finished.
    options: (prompt tokens, whether a usage chunk ends the stream, whether logprobs were asked for, each choice's
    echoed prompt or None)."""
    prompt_tokens, include_usage, scoring, echo = options

    def sse(choices: list[dict], use: dict | None = None) -> str:
        return f"data: {json.dumps(envelope(shape.chunk_object, rid, model, choices, use))}\n\n"

    try:
        if isinstance(shape, ChatShape):
            for i in range(n):
                yield sse([shape.chunk_choice(None, None, first=True, index=i)])
        elif echo and not scoring:  # the prompt's text first; with logprobs, once they come
            for i in range(n):
                yield sse([shape.chunk_choice(echo[i], None, index=i)])
        running, completion_tokens = n, 0
        while running:
            if (got := await events.next()) is None:  # the client is gone (also while the jobs wait in the queue)
                return
            i, event = got
            if event.error:
                yield f"data: {json.dumps(APIError(500, event.error, type='server_error').body())}\n\n"
                break
            if event.prompt_logprobs is not None:
                logprobs = shape.logprobs(event.prompt_logprobs, i)
                yield sse([shape.chunk_choice(echo[i] if echo else "", None, index=i, logprobs=logprobs)])
            if event.text or event.finish_reason or event.logprobs:
                logprobs = shape.logprobs(event.logprobs, i) if scoring else None
                yield sse([shape.chunk_choice(event.text, event.finish_reason, index=i, logprobs=logprobs)])
            if event.finish_reason:
                running -= 1
                completion_tokens += event.completion_tokens
        else:
            if include_usage:
                yield sse([], usage(prompt_tokens, completion_tokens))
        yield "data: [DONE]\n\n"
    finally:
        cancel_all()  # a client that disconnects mid-stream lands here: its rows are dropped before the next step


def _key_check(api_key: str | None) -> Any:
    async def check(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(
                401,
                "Incorrect or missing API key; send 'Authorization: Bearer <key>'",
                type="authentication_error",
                code="invalid_api_key",
            )

    return check


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(LorakitError)
    async def lorakit_error(_: Request, err: LorakitError) -> JSONResponse:
        return JSONResponse(APIError(400, str(err)).body(), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":  # its loc holds a character offset, not a field
            reason = first.get("ctx", {}).get("error", "")
            message = f"request body is not valid JSON: {reason} (at character {first['loc'][-1]})"
            return JSONResponse(APIError(400, message).body(), status_code=400)
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = f"{param}: {first['msg']}" if param else str(first["msg"])
        return JSONResponse(APIError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(err.status_code, str(err.detail), type=kind).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, err: Exception) -> JSONResponse:
        traceback.print_exception(err, file=sys.stderr)
        body = APIError(500, "internal server error; see the server log", type="server_error").body()
        return JSONResponse(body, status_code=500)
