"""A job asking for no tokens (completions' max_tokens 0 with echo): its prefill is the only forward it takes."""

from __future__ import annotations

import threading

import pytest
import torch

from lorakit import LoraModel
from lorakit.serve.engine import Engine, Event, GenerationRequest
from lorakit.serve.sampling import prompt_logprobs
from tests.serve.tiny import build_model, build_tokenizer


def test_a_job_for_no_tokens_ends_after_its_prefill_with_the_prompts_logprobs() -> None:
    tokenizer = build_tokenizer()
    inner = build_model(len(tokenizer), tokenizer.eos_token_id)
    forwards: list[int] = []
    inner.register_forward_hook(lambda module, args, kwargs, out: forwards.append(1), with_kwargs=True)
    prompt = [5, 6, 7, 8, 9]
    with torch.inference_mode():
        expected = prompt_logprobs(inner(torch.tensor([prompt])).logits[0], prompt, 2)
    forwards.clear()
    engine, events, done = Engine(LoraModel(inner), tokenizer), [], threading.Event()

    def emit(event: Event) -> None:
        events.append(event)
        if event.finish_reason or event.error:
            done.set()

    engine.start()
    try:
        job = engine.submit(GenerationRequest("__base__", prompt, 0, prompt_logprobs=2, logprobs=2), emit)
        assert done.wait(60), "the job never finished"
    finally:
        engine.stop()
    assert len(forwards) == 1 and job.tokens == []
    scored, end = events
    got = scored.prompt_logprobs
    assert [s.token for s in got] == prompt and got[0].logprob is None and got[0].top is None
    for s, e in zip(got[1:], expected[1:], strict=True):
        assert s.logprob == pytest.approx(e.logprob, abs=1e-5) and [t for t, _ in s.top] == [t for t, _ in e.top]
    assert (end.text, end.finish_reason, end.completion_tokens, end.logprobs) == ("", "length", 0, [])
    assert engine.stats()["finished"] == 1
