"""The engine: one worker thread owns the model and runs continuous batching.

Requests wait in a queue; between two decode steps the worker applies adapter changes, drops finished or
abandoned rows, prefills waiting requests (each alone) into free rows, then runs one decode step for every row
at once, each row routed to its own adapter. So a long request never holds short ones back, and an adapter
that is being read from disk (in another thread) does not pause the others.
"""

from __future__ import annotations

import inspect
import sys
import threading
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache

from lorakit.serve.batch import DecodeBatch
from lorakit.serve.errors import APIError, over_capacity
from lorakit.serve.routing import forward_rows
from lorakit.serve.sampling import (
    TokenLogprob,
    generator_for,
    is_greedy,
    next_token,
    prompt_logprobs,
    token_logprob,
)
from lorakit.serve.text import TextStream


@dataclass
class GenerationRequest:
    """What to generate: `adapter` is an adapter or tree-node name, or "__base__" for the base model."""

    adapter: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k likeliest tokens'
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (completions' echo)


@dataclass
class Event:
    """What a job reports: new text, and at the end a finish reason ("stop" / "length") or an error; with
    logprobs asked for, the tokens generated since the last event (the end token is not part of the text: left out)."""

    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None  # once, before any text, when the request asks for them


class Job:
    """One request inside the engine: its tokens, text, random stream and whether its client still waits."""

    def __init__(
        self, request: GenerationRequest, emit: Callable[[Event], None], tokenizer: Any, eos: set[int],
        withdraw: Callable[[Job], None] = lambda job: None,
    ) -> None:  # fmt: skip
        self.request, self.emit, self.eos, self._withdraw = request, emit, eos, withdraw
        self.text = TextStream(tokenizer, request.stop)
        self.generator = generator_for(request.seed)
        self.tokens: list[int] = []
        self.scored: list[TokenLogprob] = []  # logprobs not yet reported
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        """The client is gone: a waiting job leaves the queue at once, a running row is dropped before the next step."""
        self.cancelled.set()
        self._withdraw(self)

    def next_token(self, logits: Tensor, greedy: int | None = None) -> int:
        """This row's next token: `greedy` (the batch's argmax, picked on the device in one go) when the request
        is greedy and may end now, else picked from the row's logits on the host with the request's own stream."""
        masked = bool(self.eos) and len(self.tokens) < self.request.min_tokens
        if greedy is not None and is_greedy(self.request.temperature) and not masked:
            return greedy
        logits = logits.to("cpu", torch.float32, copy=masked)  # the caller's logits stay as they are
        if masked:
            logits[list(self.eos)] = float("-inf")
        return next_token(logits, self.request.temperature, self.request.top_p, self.generator)

    def after_prefill(self, logits: Tensor) -> bool:
        """The first token from the prompt's last logits; a job asking for none (max_tokens 0: echo's scoring, whose
        prompt logprobs came from the prefill) ends here with "length" and no token. True when the job is finished."""
        if self.request.max_tokens == 0:
            return self._finish("", "length")
        return self.choose(logits)

    def choose(self, logits: Tensor, greedy: int | None = None) -> bool:
        """Picks, scores (when asked) and accepts this row's next token; True when the job is finished."""
        token = self.next_token(logits, greedy)
        top = self.request.logprobs
        return self.accept(token, None if top is None else token_logprob(logits, token, top))

    def accept(self, token: int, scored: TokenLogprob | None = None) -> bool:
        """Adds the next token and reports it; True when the job is finished."""
        self.tokens.append(token)
        if token in self.eos and not self.request.ignore_eos:
            return self._finish(self.text.finish(), "stop")
        if scored is not None:
            self.scored.append(scored)
        delta, stopped = self.text.push(token)
        if stopped:
            return self._finish(delta, "stop")
        if len(self.tokens) >= self.request.max_tokens:
            return self._finish(delta + self.text.finish(), "length")
        if delta:
            self.emit(Event(text=delta, completion_tokens=len(self.tokens), logprobs=self._take_scored()))
        return False

    def fail(self, message: str) -> None:
        self.emit(Event(error=message, completion_tokens=len(self.tokens)))

    def _finish(self, text: str, reason: str) -> bool:
        self.emit(Event(text, reason, len(self.tokens), logprobs=self._take_scored()))
        return True

    def _take_scored(self) -> list[TokenLogprob]:
        scored, self.scored = self.scored, []
        return scored


@dataclass
class _Op:
    """A change to the model run by the worker between steps; waits while a job still uses `busy_name`."""

    run: Callable[[], Any]
    future: Future
    busy_name: str | None = None


class Engine:
    """Owns `model` (a LoraModel) on its worker thread; other threads only submit jobs and operations."""

    def __init__(self, model: Any, tokenizer: Any, max_concurrent: int = 16, max_queue: int = 64) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_concurrent, self.max_queue = max_concurrent, max_queue
        self.eos = _eos_ids(model, tokenizer)
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._ops: list[_Op] = []
        self.device = next(model.parameters()).device
        self._cache_keyword = _cache_keyword(model)
        self._batch = DecodeBatch(self.device)
        self._stopping = False
        self._counts = {"finished": 0, "cancelled": 0}
        self._thread = threading.Thread(target=self._run, name="lorakit-serve-engine", daemon=True)

    # -- called from other threads -------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stops taking jobs, lets the running ones finish (up to `timeout` s), fails the rest, joins the worker."""
        with self._cond:
            self._stopping = True
            for job in self._waiting:
                job.fail("the server is shutting down")
            self._waiting.clear()
            self._cond.notify_all()
        self._thread.join(timeout)
        for job in list(self._batch.rows):
            job.cancel()

    def submit(self, request: GenerationRequest, emit: Callable[[Event], None]) -> Job:
        """Queues a job; APIError 429 past max_concurrent running + max_queue waiting, 503 while shutting down."""
        job = Job(request, emit, self.tokenizer, self.eos, withdraw=self._withdraw)
        with self._cond:
            if self._stopping:
                raise APIError(503, "the server is shutting down", type="service_unavailable")
            if len(self._batch) + len(self._waiting) >= self.max_concurrent + self.max_queue:
                raise over_capacity(len(self._batch), len(self._waiting))
            self._waiting.append(job)
            self._cond.notify_all()
        return job

    def between_steps(self, run: Callable[[], Any], busy_name: str | None = None) -> Future:
        """Runs `run` on the worker between two decode steps (after no job uses `busy_name`); its Future."""
        op = _Op(run, Future(), busy_name)
        with self._cond:
            if not self._thread.is_alive():  # no worker (before start or after stop): nothing decodes, run now
                _complete(op)
                return op.future
            self._ops.append(op)
            self._cond.notify_all()
        return op.future

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"running": len(self._batch), "waiting": len(self._waiting), **self._counts}

    def _withdraw(self, job: Job) -> None:
        """A cancelled job still waiting leaves the queue now, so its place goes to the next request at once."""
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                self._counts["cancelled"] += 1

    def _count(self, key: str, n: int = 1) -> None:
        with self._cond:  # other threads count withdrawn jobs
            self._counts[key] += n

    # -- the worker ----------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while self._wait_for_work():
                try:
                    self._apply_ops()
                    self._drop_cancelled()
                    self._admit()
                    if len(self._batch):
                        self._decode_step()
                except Exception:  # a bug must not kill the worker: fail the rows, log, go on
                    traceback.print_exc(file=sys.stderr)
                    for job in self._batch.rows:
                        job.fail("internal error while generating; see the server log")
                    self._batch.remove([])

    def _wait_for_work(self) -> bool:
        with self._cond:
            while not (self._waiting or len(self._batch) or self._ops or self._stopping):
                self._cond.wait()
            return not (self._stopping and not len(self._batch) and not self._ops)

    def _apply_ops(self) -> None:
        with self._cond:
            busy = {job.request.adapter for job in (*self._batch.rows, *self._waiting)}
            ready = [op for op in self._ops if op.busy_name not in busy]
            self._ops = [op for op in self._ops if op.busy_name in busy]
        for op in ready:
            _complete(op)

    def _drop_cancelled(self) -> None:
        keep = [i for i, job in enumerate(self._batch.rows) if not job.cancelled.is_set()]
        if len(keep) < len(self._batch):
            self._count("cancelled", len(self._batch) - len(keep))
            self._batch.remove(keep)

    def _admit(self) -> None:
        """Prefills waiting jobs into free rows, each alone, so its prompt is computed as `generate` would."""
        while len(self._batch) < self.max_concurrent:
            with self._cond:
                if not self._waiting:
                    return
                job = self._waiting.popleft()
            if job.cancelled.is_set():
                self._count("cancelled")
                continue
            try:  # whatever goes wrong, this job (no longer waiting, not yet a row) gets an answer
                cache = DynamicCache()
                ids = torch.tensor([job.request.prompt_ids], device=self.device)
                inputs = {"input_ids": ids, self._cache_keyword: cache, "use_cache": True}
                top = job.request.prompt_logprobs
                logits = forward_rows(self.model, [job.request.adapter], every_position=top is not None, **inputs)
                if top is not None:
                    job.emit(Event(prompt_logprobs=prompt_logprobs(logits[0], job.request.prompt_ids, top)))
                    logits = logits[:, -1]
                if job.after_prefill(logits[0]):
                    self._count("finished")
                else:
                    self._batch.add(job, cache, group=job.request.adapter)
            except Exception:
                traceback.print_exc(file=sys.stderr)
                job.fail("internal error while reading the prompt; see the server log")

    def _decode_step(self) -> None:
        jobs = self._batch.rows
        inputs = self._batch.step_inputs([job.tokens[-1] for job in jobs])
        inputs[self._cache_keyword] = inputs.pop("cache")
        logits = forward_rows(self.model, [job.request.adapter for job in jobs], **inputs)
        greedy = logits.argmax(-1).tolist()  # one transfer for the whole batch; sampled rows copy their own row
        keep = [i for i, job in enumerate(jobs) if not _choose(job, logits[i], greedy[i])]
        if len(keep) < len(jobs):
            self._count("finished", len(jobs) - len(keep))
            self._batch.remove(keep)


def _choose(job: Job, logits: Tensor, greedy: int) -> bool:
    """job.choose, but a failure (a bug, logits no token can be sampled from) ends this row alone, never its batch."""
    try:
        return job.choose(logits, greedy)
    except Exception:
        traceback.print_exc(file=sys.stderr)
        job.fail("internal error while picking the next token; see the server log")
        return True


def _complete(op: _Op) -> None:
    try:
        op.future.set_result(op.run())
    except Exception as err:
        op.future.set_exception(err)


def _cache_keyword(model: Any) -> str:
    """The forward's key/value-cache argument: transformers renamed past_key_values to cache, and an older
    forward would take `cache` into its **kwargs and silently keep no cache."""
    base = getattr(model, "model", model)
    parameters = inspect.signature(base.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The tokens that end a generation: the model's generation config first (what `generate` stops on)."""
    config = getattr(model, "generation_config", None) or getattr(
        getattr(model, "model", None), "generation_config", None
    )
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
