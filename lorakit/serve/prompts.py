"""A request's prompt as token ids: the tokenizer's chat template for chat, plain encoding for completions."""

from __future__ import annotations

from typing import Any

from lorakit.serve.errors import APIError


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The ids `generate` would get for this conversation: the chat template with the assistant's turn opened. A
    conversation the template refuses (many raise_exception on roles that do not alternate) is a 400 with its reason."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
    from jinja2 import TemplateError  # transformers renders templates with jinja2: it is there when a template is

    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as err:
        raise APIError(400, f"the model's chat template refuses these messages: {err}", param="messages") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


MAX_PROMPTS = 64  # prompts in one completions request; each takes n rows of the batch


def encode_completions(tokenizer: Any, prompt: Any) -> list[list[int]]:
    """A completions request's prompts as token ids: a string, token ids, or a list of either (OpenAI's batch)."""
    prompts = [prompt] if isinstance(prompt, str) or _token_ids(prompt) else prompt
    if not isinstance(prompts, list) or not all(isinstance(p, str) or _token_ids(p) for p in prompts):
        message = "prompt must be a string, a list of token ids, or a list of those (strings or token-id lists)"
        raise APIError(400, message, param="prompt")
    if not prompts or len(prompts) > MAX_PROMPTS:
        raise APIError(400, f"give 1 to {MAX_PROMPTS} prompts, not {len(prompts)}", param="prompt")
    return [_encode(tokenizer, p) for p in prompts]


def _token_ids(value: Any) -> bool:
    """A non-empty list of ints (JSON true/false are not token ids)."""
    return isinstance(value, list) and bool(value) and all(type(v) is int for v in value)


def _encode(tokenizer: Any, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, list):
        if any(not 0 <= p < len(tokenizer) for p in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {len(tokenizer)})", param="prompt")
        return list(prompt)
    ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise APIError(400, "the prompt is empty", param="prompt")
    return ids
