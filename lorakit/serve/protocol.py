"""OpenAI's request and response shapes for /v1/completions and /v1/chat/completions (the fields we honour).

Unknown fields are ignored, as OpenAI-compatible servers do, so clients that send extra options still work;
known fields are checked (type and range) and a bad one is answered with 400 naming it. A field sent as null takes
its default, as OpenAI reads its nullable fields (the `openai` client sends null for an option given as None).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from lorakit.serve.sampling import TokenLogprob

MAX_CHOICES = 16  # n: each choice takes a row of the batch, so one request cannot claim the whole server
MAX_LOGPROBS = 20  # the likeliest tokens listed per generated token (vLLM's default limit)
SEED_RANGE = (-(2**63), 2**63 - 1)  # a signed 64-bit int, what vLLM accepts


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: StrictInt = Field(1, ge=1, le=MAX_CHOICES, description="choices, each decoded as its own row")
    seed: StrictInt | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | list[str] | None = Field(None)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    # vLLM's extra sampling fields: keep going past the end-of-sequence token, or forbid it for the first tokens
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = Field(0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def nulls_mean_defaults(cls, data: Any) -> Any:
        """The body without its null fields, so that each takes its default."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def logprobs_top(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: Any  # a string, token ids, or a list of either: checked by prompts.encode_completions, naming the form
    # OpenAI's default for completions; 0 only with echo: the prompt's logprobs alone, as scoring clients ask
    max_tokens: StrictInt | None = Field(16, ge=0)
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = False  # the prompt's text (and with logprobs, its tokens' logprobs) before the completion

    def logprobs_top(self) -> int | None:
        return self.logprobs


class LoadAdapterRequest(BaseModel):
    """vLLM's body for /v1/load_lora_adapter; `parent` (ours) makes the adapter a tree node under it."""

    lora_name: str
    lora_path: str
    parent: str | None = None


class UnloadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # vLLM clients may send lora_int_id

    lora_name: str


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class ChatShape:
    """How chat results are written: a message at the end, deltas while streaming; logprobs as chat's `content`
    list. `text_of` turns a token id into its text, `bytes_of` into its own bytes (text.token_bytes: a piece of a
    character split across tokens has its text U+FFFD but its real bytes)."""

    object, chunk_object = "chat.completion", "chat.completion.chunk"
    echo: list[str] | None = None

    def __init__(self, text_of: Callable[[int], str], bytes_of: Callable[[int], bytes]) -> None:
        self.text_of, self.bytes_of = text_of, bytes_of

    def choice(self, text: str, finish_reason: str | None, index: int = 0, logprobs: dict | None = None) -> dict:
        message = {"role": "assistant", "content": text}
        return {"index": index, "message": message, "finish_reason": finish_reason, "logprobs": logprobs}

    def chunk_choice(
        self, text: str | None, finish_reason: str | None, first: bool = False, index: int = 0,
        logprobs: dict | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}

    def logprobs(self, scored: list[TokenLogprob], index: int = 0) -> dict[str, Any]:
        def entry(token: int, logprob: float) -> dict[str, Any]:
            return {"token": self.text_of(token), "logprob": logprob, "bytes": list(self.bytes_of(token))}

        return {"content": [
            {**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top]} for s in scored
        ]}  # fmt: skip


class CompletionShape:
    """Completions: `text` in choices and chunks; logprobs in the legacy shape (tokens, token_logprobs,
    top_logprobs, text_offset: each token's offset into the generated text)."""

    object, chunk_object = "text_completion", "text_completion"

    def __init__(self, text_of: Callable[[int], str], echo: list[str] | None = None) -> None:
        self.text_of = text_of
        self.echo = echo  # each prompt's text, written before its choices' completions (echo: true)
        self.offsets: dict[int, int] = {}  # per choice: characters of token text listed so far (streaming)

    def choice(self, text: str, finish_reason: str | None, index: int = 0, logprobs: dict | None = None) -> dict:
        return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}

    def chunk_choice(
        self, text: str | None, finish_reason: str | None, first: bool = False, index: int = 0,
        logprobs: dict | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        return self.choice(text or "", finish_reason, index, logprobs)

    def logprobs(self, scored: list[TokenLogprob], index: int = 0) -> dict[str, Any]:
        tokens = [self.text_of(s.token) for s in scored]
        offsets, at = [], self.offsets.get(index, 0)
        for text in tokens:
            offsets.append(at)
            at += len(text)
        self.offsets[index] = at
        return {
            "tokens": tokens,
            "token_logprobs": [s.logprob for s in scored],
            "top_logprobs": [None if s.top is None else self._top(s.top) for s in scored],
            "text_offset": offsets,
        }

    def _top(self, top: list[tuple[int, float]]) -> dict[str, float]:
        """{text: logprob}, likeliest first; tokens whose texts are equal (bytes of one character) keep the first."""
        listed: dict[str, float] = {}
        for token, logprob in top:
            listed.setdefault(self.text_of(token), logprob)
        return listed


def envelope(kind: str, rid: str, model: str, choices: list[dict], usage_: dict | None = None) -> dict[str, Any]:
    return {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage_,
    }
