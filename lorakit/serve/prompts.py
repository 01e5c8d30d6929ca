"""A request's prompt as token ids: the tokenizer's chat template for chat, plain encoding for completions."""

from __future__ import annotations

from typing import Any

from lorakit.serve.errors import APIError


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The ids `generate` would get for this conversation: the chat template with the assistant's turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_completion(tokenizer: Any, prompt: str | list) -> list[int]:
    """A completion prompt: a string, a list of one string, or token ids."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        if any(not 0 <= p < len(tokenizer) for p in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {len(tokenizer)})", param="prompt")
        return list(prompt)
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise APIError(400, "give one prompt per request (a string or a list of one string)", param="prompt")
        prompt = prompt[0]
    ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise APIError(400, "the prompt is empty", param="prompt")
    return ids
