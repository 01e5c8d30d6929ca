"""The next token from one row's logits: greedy at temperature 0, else sampled with the request's own seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Temperatures below this are greedy, as in vLLM: dividing the logits by a tinier one overflows them to inf, and the
# softmax of those is NaN, which no token can be sampled from.
GREEDY_BELOW = 1e-5


def is_greedy(temperature: float) -> bool:
    return temperature < GREEDY_BELOW


def generator_for(seed: int | None) -> torch.Generator:
    """A per-request random stream, so a seeded request samples the same tokens whatever it is batched with; any int
    seeds it, taken modulo 2**64 (torch's seeds are 64-bit)."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed % 2**64)
    return generator


def next_token(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """argmax at temperature 0 or below GREEDY_BELOW (what `generate(do_sample=False)` picks); else nucleus sampling at
    `temperature`."""
    logits = logits.float()
    if is_greedy(temperature):
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the `top` likeliest tokens' (id, log-probability), likeliest first; None for
    a prompt's first token, which nothing precedes."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] | None


def token_logprob(logits: Tensor, token: int, top: int) -> TokenLogprob:
    """From the row's raw logits: the model's distribution before temperature and top_p, as OpenAI reports it."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best = logprobs.topk(top) if top else None
    pairs = list(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best is not None else []
    return TokenLogprob(token, float(logprobs[token]), pairs)


def prompt_logprobs(logits: Tensor, ids: list[int], top: int) -> list[TokenLogprob]:
    """Each prompt token's log-probability given the tokens before it, from the prefill's logits at every position
    ([T, vocab]); the first token has none."""
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)  # position i predicts token i + 1
    chosen = logprobs.gather(1, torch.tensor(ids[1:], device=logprobs.device)[:, None])[:, 0].tolist()
    best = logprobs.topk(top) if top else None
    tops = (
        [list(zip(i, v, strict=True)) for i, v in zip(best.indices.tolist(), best.values.tolist(), strict=True)]
        if best is not None
        else [[] for _ in chosen]
    )
    first = TokenLogprob(ids[0], None, None)
    return [first, *(TokenLogprob(t, lp, pairs) for t, lp, pairs in zip(ids[1:], chosen, tops, strict=True))]
