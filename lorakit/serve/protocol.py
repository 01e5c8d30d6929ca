"""OpenAI's request and response shapes for /v1/completions and /v1/chat/completions (the fields we honour).

Unknown fields are ignored, as OpenAI-compatible servers do, so clients that send extra options still work;
known fields are checked (type and range) and a bad one is answered with 400 naming it.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

MAX_CHOICES = 16  # n: each choice takes a row of the batch, so one request cannot claim the whole server


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: StrictInt = Field(1, ge=1, le=MAX_CHOICES, description="choices, each decoded as its own row")
    seed: StrictInt | None = None
    stop: str | list[str] | None = Field(None)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    # vLLM's extra sampling fields: keep going past the end-of-sequence token, or forbid it for the first tokens
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = Field(0, ge=0)

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


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[StrictInt]
    max_tokens: StrictInt | None = Field(16, ge=1)  # OpenAI's default for completions


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
    """How chat results are written: a message at the end, deltas while streaming."""

    object, chunk_object = "chat.completion", "chat.completion.chunk"

    def choice(self, text: str, finish_reason: str | None, index: int = 0) -> dict[str, Any]:
        message = {"role": "assistant", "content": text}
        return {"index": index, "message": message, "finish_reason": finish_reason, "logprobs": None}

    def chunk_choice(
        self, text: str | None, finish_reason: str | None, first: bool = False, index: int = 0
    ) -> dict[str, Any]:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}


class CompletionShape:
    object, chunk_object = "text_completion", "text_completion"

    def choice(self, text: str, finish_reason: str | None, index: int = 0) -> dict[str, Any]:
        return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}

    def chunk_choice(
        self, text: str | None, finish_reason: str | None, first: bool = False, index: int = 0
    ) -> dict[str, Any]:
        return self.choice(text or "", finish_reason, index)


def envelope(kind: str, rid: str, model: str, choices: list[dict], usage_: dict | None = None) -> dict[str, Any]:
    return {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage_,
    }
