"""`lorakit serve` as a client sees it: a real server process, spoken to with the `openai` package."""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.serve.conftest import ADAPTERS, API_KEY, Reference, Server
from tests.serve.tiny import write_tiny

PROMPTS = ["hello, how are you?", "what is the capital of france?"]
MAX_TOKENS = 12
TREE = ["legal", "contracts"]  # contracts is served as base + legal + contracts


def client(server: Server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


def chat(c: openai.OpenAI, model: str, prompt: str, **kw) -> openai.types.chat.ChatCompletion:
    messages = [{"role": "user", "content": prompt}]
    return c.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0, **kw)


def adapter_of(model: str) -> str | None:
    return None if model == "model" else model


def test_models_lists_each_adapter_with_its_parent(servers: dict[str, Server]) -> None:
    cards = {m.id: m for m in client(servers["main"]).models.list().data}
    assert set(cards) == {"model", *ADAPTERS, *TREE}
    assert all(cards[a].parent == "model" for a in [*ADAPTERS, "legal"]) and cards["model"].parent is None
    assert cards["contracts"].parent == "legal"


def test_a_parent_with_children_is_not_unloaded(servers: dict[str, Server]) -> None:
    r = httpx.post(f"{servers['main'].url}/v1/unload_lora_adapter", json={"lora_name": "legal"})
    assert r.status_code == 400 and "contracts" in r.json()["error"]["message"]


@pytest.mark.parametrize("model", ["model", *ADAPTERS, *TREE])
def test_greedy_chat_equals_the_library_generate(servers: dict[str, Server], reference: Reference, model: str) -> None:
    reply = chat(client(servers["main"]), model, PROMPTS[0])
    ids = reference.chat_ids(PROMPTS[0])
    text, n = reference.greedy(adapter_of(model), ids, MAX_TOKENS)
    assert reply.choices[0].message.content == text
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), n)
    assert reply.choices[0].finish_reason == ("length" if n == MAX_TOKENS else "stop")


def test_adapters_answer_differently(servers: dict[str, Server]) -> None:
    texts = {m: chat(client(servers["main"]), m, PROMPTS[1]).choices[0].message.content for m in ["model", *ADAPTERS]}
    assert len(set(texts.values())) == len(texts)


def test_completions_equal_generate(servers: dict[str, Server], reference: Reference) -> None:
    c = client(servers["main"])
    reply = c.completions.create(model="a2", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0)
    ids = reference.tokenizer(PROMPTS[1])["input_ids"]
    assert reply.choices[0].text == reference.greedy("a2", ids, MAX_TOKENS)[0]


def test_streaming_gives_the_non_streaming_text(servers: dict[str, Server]) -> None:
    c = client(servers["main"])
    whole = chat(c, "a3", PROMPTS[1]).choices[0]
    chunks = list(chat(c, "a3", PROMPTS[1], stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.finish_reason
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    done = c.completions.create(model="a3", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    streamed = c.completions.create(model="a3", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == done.choices[0].text


def test_16_concurrent_requests_over_4_adapters_and_the_base(servers: dict[str, Server], reference: Reference) -> None:
    c = client(servers["main"])
    jobs = [(["model", *ADAPTERS][i % 5], PROMPTS[i % 2]) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda job: chat(c, *job).choices[0].message.content, jobs))
    for (model, prompt), got in zip(jobs, replies, strict=True):
        assert got == reference.greedy(adapter_of(model), reference.chat_ids(prompt), MAX_TOKENS)[0], model


def test_stop_sequence_ends_the_text_before_it(servers: dict[str, Server]) -> None:
    c = client(servers["main"])
    full = chat(c, "a1", PROMPTS[0]).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    reply = chat(c, "a1", PROMPTS[0], stop=[stop]).choices[0]
    assert reply.message.content == full[: full.index(stop)] and reply.finish_reason == "stop"


def test_sampling_with_a_seed_repeats(servers: dict[str, Server]) -> None:
    c = client(servers["main"])
    kw = {"max_tokens": MAX_TOKENS, "temperature": 1.0}
    runs = [c.completions.create(model="a4", prompt=PROMPTS[0], seed=s, **kw).choices[0].text for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_n_choices_are_decoded_as_rows_of_their_own(servers: dict[str, Server]) -> None:
    """n greedy choices are the one greedy text n times; sampled with a seed, choice i is the request alone with
    seed + i, streamed or not; usage counts every choice's tokens."""
    c = client(servers["main"])
    one = chat(c, "a2", PROMPTS[0])
    many = chat(c, "a2", PROMPTS[0], n=3)
    assert [ch.index for ch in many.choices] == [0, 1, 2]
    assert {ch.message.content for ch in many.choices} == {one.choices[0].message.content}
    assert many.usage.prompt_tokens == one.usage.prompt_tokens
    assert many.usage.completion_tokens == 3 * one.usage.completion_tokens
    kw = {"model": "a4", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 1.0}
    alone = [c.completions.create(seed=s, **kw).choices[0].text for s in (7, 8)]
    assert alone[0] != alone[1]
    sampled = c.completions.create(seed=7, n=2, **kw)
    assert [ch.text for ch in sorted(sampled.choices, key=lambda ch: ch.index)] == alone
    chunks = list(c.completions.create(seed=7, n=2, stream=True, stream_options={"include_usage": True}, **kw))
    streamed = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert [streamed[0], streamed[1]] == alone
    assert chunks[-1].usage.completion_tokens == sampled.usage.completion_tokens
    chat_chunks = list(chat(c, "a2", PROMPTS[0], n=2, stream=True))
    texts = {0: "", 1: ""}
    for chunk in chat_chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == {0: one.choices[0].message.content, 1: one.choices[0].message.content}


def test_logprobs_are_the_models_own_in_both_shapes(servers: dict[str, Server], reference: Reference) -> None:
    """Each generated token's logprob and top_logprobs are the library model's log-softmax at that step (before
    temperature), likeliest first; streamed chunks list the same entries; completions use the legacy shape."""
    c = client(servers["main"])
    reply = chat(c, "a2", PROMPTS[0], logprobs=True, top_logprobs=3).choices[0]
    ids = reference.chat_ids(PROMPTS[0])
    content = reply.logprobs.content
    generated, expected = reference.greedy_logprobs("a2", ids, MAX_TOKENS)
    generated = [t for t in generated if t != reference.tokenizer.eos_token_id]  # the end token is not listed
    assert "".join(e.token for e in content) == reply.message.content
    for step, (entry, token) in enumerate(zip(content, generated, strict=True)):
        assert entry.logprob == pytest.approx(expected[step, token].item(), abs=1e-4)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the likeliest
        best = expected[step].topk(3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
    joined = b"".join(bytes(e.bytes) for e in content)  # each token's own bytes: split characters join up again
    assert joined.decode(errors="replace") == reply.message.content
    chunks = list(chat(c, "a2", PROMPTS[0], logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for ch in chunks for choice in ch.choices if choice.logprobs for e in choice.logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    done = c.completions.create(model="a2", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0.7, seed=3,
                                logprobs=2)  # fmt: skip
    legacy = done.choices[0].logprobs
    listed = done.usage.completion_tokens - (done.choices[0].finish_reason == "stop")  # the end token is not
    assert len(legacy.tokens) == len(legacy.token_logprobs) == len(legacy.top_logprobs) == listed
    assert all(lp <= 0 for lp in legacy.token_logprobs)
    assert legacy.text_offset == [sum(len(t) for t in legacy.tokens[:i]) for i in range(len(legacy.tokens))]
    assert all(len(top) <= 2 and max(top.values()) >= lp - 1e-6 for top, lp in zip(
        legacy.top_logprobs, legacy.token_logprobs, strict=True))  # fmt: skip
    assert chat(c, "a2", PROMPTS[0]).choices[0].logprobs is None
    body = {"model": "a2", "messages": HI, "top_logprobs": 2}  # without logprobs: true
    r = httpx.post(f"{servers['main'].url}/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_echo_writes_the_prompt_back_with_its_own_logprobs(servers: dict[str, Server], reference: Reference) -> None:
    """echo: the prompt's text before the completion; with logprobs, each prompt token's log-probability given the
    tokens before it (none for the first), as the library model computes them; streamed the same."""
    c = client(servers["main"])
    kw = {"model": "a2", "prompt": PROMPTS[1], "max_tokens": 3, "temperature": 0}
    plain = c.completions.create(**kw).choices[0]
    echoed = c.completions.create(echo=True, logprobs=1, **kw).choices[0]
    assert echoed.text == PROMPTS[1] + plain.text
    ids = reference.tokenizer(PROMPTS[1])["input_ids"]
    legacy = echoed.logprobs
    assert legacy.token_logprobs[0] is None and legacy.top_logprobs[0] is None
    expected = reference.prompt_logprobs("a2", ids)
    assert legacy.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=1e-4)
    assert all(len(top) == 1 for top in legacy.top_logprobs[1:])
    assert len(legacy.tokens) == len(ids) + 3 - (echoed.finish_reason == "stop")
    for logprobs in (1, None):
        chunks = list(c.completions.create(echo=True, logprobs=logprobs, stream=True, **kw))
        assert "".join(ch.choices[0].text for ch in chunks) == echoed.text
    assert c.completions.create(echo=True, **kw).choices[0].text == echoed.text


def test_echo_with_max_tokens_0_scores_the_prompt_alone(servers: dict[str, Server], reference: Reference) -> None:
    """max_tokens 0 with echo, as scoring clients ask: the prompt's text and its tokens' logprobs (those sent with
    max_tokens 1), no completion token, finish_reason length; streamed the same; a batch with n=2 echoes each prompt
    in each of its choices; a prompt may fill the context. Without echo, 400 naming max_tokens."""
    c, url = client(servers["main"]), servers["main"].url
    kw = {"model": "a2", "echo": True, "logprobs": 2, "temperature": 0}
    ids = reference.tokenizer(PROMPTS[1])["input_ids"]
    one = c.completions.create(prompt=PROMPTS[1], max_tokens=1, **kw)
    scored = c.completions.create(prompt=PROMPTS[1], max_tokens=0, **kw)
    (choice,) = scored.choices
    assert choice.text == PROMPTS[1] and choice.finish_reason == "length"
    assert scored.usage.completion_tokens == 0 and scored.usage.prompt_tokens == len(ids) == one.usage.prompt_tokens
    legacy, prefix = choice.logprobs.model_dump(), {k: v[: len(ids)] for k, v in one.choices[0].logprobs}
    assert legacy == prefix and len(legacy["tokens"]) == len(ids) and legacy["token_logprobs"][0] is None
    assert legacy["token_logprobs"][1:] == pytest.approx(reference.prompt_logprobs("a2", ids), abs=1e-4)
    options = {"stream": True, "stream_options": {"include_usage": True}}
    chunks = list(c.completions.create(prompt=PROMPTS[1], max_tokens=0, **options, **kw))
    parts = [ch.choices[0] for ch in chunks if ch.choices]
    assert "".join(p.text for p in parts) == PROMPTS[1] and parts[-1].finish_reason == "length"
    assert [lp for p in parts if p.logprobs for lp in p.logprobs.token_logprobs] == legacy["token_logprobs"]
    assert chunks[-1].usage.completion_tokens == 0
    for stream in (False, True):  # echo without logprobs: the prompt's text alone
        out = c.completions.create(prompt=PROMPTS[1], model="a2", echo=True, max_tokens=0, stream=stream)
        text = "".join(ch.choices[0].text for ch in out) if stream else out.choices[0].text
        assert text == PROMPTS[1]
    batch = c.completions.create(prompt=PROMPTS, n=2, max_tokens=0, **kw)
    alone = [c.completions.create(prompt=p, max_tokens=0, **kw).choices[0] for p in PROMPTS]
    assert [ch.text for ch in batch.choices] == [p for p in PROMPTS for _ in range(2)]
    assert [ch.logprobs for ch in batch.choices] == [a.logprobs for a in alone for _ in range(2)]
    assert {ch.finish_reason for ch in batch.choices} == {"length"} and batch.usage.completion_tokens == 0
    context = httpx.get(f"{url}/v1/models").json()["data"][0]["max_model_len"]
    full = {"model": "a2", "prompt": [5] * context, "echo": True}
    assert httpx.post(f"{url}/v1/completions", json={**full, "max_tokens": 0}).status_code == 200
    assert httpx.post(f"{url}/v1/completions", json={**full, "max_tokens": 1}).status_code == 400
    r = httpx.post(f"{url}/v1/completions", json={"model": "a2", "prompt": PROMPTS[1], "max_tokens": 0})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "max_tokens" and "echo" in error["message"]


def test_a_batch_of_prompts_gets_its_choices_in_order(servers: dict[str, Server], reference: Reference) -> None:
    """prompt as a list (strings or token-id lists, as scoring clients send): choice j of prompt p has index
    p * n + j and equals that prompt sent alone; usage counts each prompt once."""
    c = client(servers["main"])
    kw = {"model": "a3", "max_tokens": MAX_TOKENS, "temperature": 0}
    alone = [c.completions.create(prompt=p, **kw) for p in PROMPTS]
    ids = [reference.tokenizer(p)["input_ids"] for p in PROMPTS]
    for prompt in (PROMPTS, ids):
        batch = c.completions.create(prompt=prompt, n=2, **kw)
        assert [ch.index for ch in batch.choices] == [0, 1, 2, 3]
        assert [ch.text for ch in batch.choices] == [a.choices[0].text for a in alone for _ in range(2)]
        assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
        assert batch.usage.completion_tokens == 2 * sum(a.usage.completion_tokens for a in alone)
    echoed = c.completions.create(prompt=ids, echo=True, logprobs=0, **kw)
    for choice, prompt, a in zip(echoed.choices, PROMPTS, alone, strict=True):
        assert choice.text == reference.tokenizer.decode(reference.tokenizer(prompt)["input_ids"]) + a.choices[0].text
        assert choice.logprobs.token_logprobs[0] is None
    chunks = list(c.completions.create(prompt=PROMPTS, stream=True, **kw))
    streamed = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert [streamed[0], streamed[1]] == [a.choices[0].text for a in alone]
    for bad in (["x"] * 65, [], [[]], [True, False], {"text": "x"}, [[1, -1]], 7):
        r = httpx.post(f"{servers['main'].url}/v1/completions", json={**kw, "prompt": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", (bad, r.text)


def test_load_and_unload_at_run_time(servers: dict[str, Server], reference: Reference, tmp_path) -> None:
    c, url = client(servers["main"]), servers["main"].url
    root = servers_root(servers)
    shutil.copytree(root / "a1", root / "late")  # a new folder in the root, after start-up
    try:
        r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": "late"})
        assert r.status_code == 200, r.text
        assert "late" in {m.id for m in c.models.list().data}
        expected = reference.greedy("a1", reference.chat_ids(PROMPTS[0]), MAX_TOKENS)[0]
        assert chat(c, "late", PROMPTS[0]).choices[0].message.content == expected
        again = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": "late"})
        assert again.status_code == 400 and "already loaded" in again.json()["error"]["message"]
        assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 200
        with pytest.raises(openai.NotFoundError):
            chat(c, "late", PROMPTS[0])
        assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 404
    finally:
        shutil.rmtree(root / "late")


def servers_root(servers: dict[str, Server]):
    cards = httpx.get(f"{servers['main'].url}/v1/models").json()["data"]
    from pathlib import Path

    return Path(next(card["root"] for card in cards if card["id"] == "a1")).parent


def test_paths_outside_the_roots_are_refused(servers: dict[str, Server], tmp_path) -> None:
    url, root = servers["main"].url, servers_root(servers)
    _, outside = write_tiny(tmp_path, ["evil"])
    (root / "link").symlink_to(outside / "evil")
    pickled = root / "pickled"
    pickled.mkdir()
    shutil.copy(root / "a1" / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    try:
        for path in ["../adapters/a1", str(outside / "evil"), "link", "/etc", "pickled", "missing"]:
            r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
            assert r.status_code == 400, (path, r.text)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert "x" not in {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
    finally:
        (root / "link").unlink()
        shutil.rmtree(pickled)


HI = [{"role": "user", "content": "hi"}]
BAD = [
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": "a1", "messages": []}, 400, "messages"),
    ({"model": "a1", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"model": "a1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "a1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "a1", "messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 400, "temperature"),
    ({"model": "a1", "messages": [{"role": "user", "content": "hi"}], "n": 17}, 400, "n"),
    ({"model": "a1", "messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n"),
    ({"model": "a1", "messages": HI, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ({"model": "a1", "messages": [{"role": "user", "content": "hi " * 5000}]}, 400, "messages"),
    ({"model": "a1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}, 400, "messages"),
    ({"model": "a1", "messages": HI, "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens"),
    ({"model": "a1", "messages": HI, "ignore_eos": "yes"}, 400, "ignore_eos"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD)
def test_bad_requests_get_openai_errors(servers: dict[str, Server], body: dict, status: int, param: str) -> None:
    r = httpx.post(f"{servers['main'].url}/v1/chat/completions", json=body)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and "Traceback" not in r.text


def test_malformed_json_and_unknown_routes(servers: dict[str, Server]) -> None:
    url = servers["main"].url
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(f"{url}/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()


def test_an_aborted_stream_frees_its_row(servers: dict[str, Server]) -> None:
    url = servers["main"].url
    cancelled = httpx.get(f"{url}/health").json()["cancelled"]
    body = {"model": "a1", "prompt": "hello", "max_tokens": 4000, "temperature": 1.0, "stream": True}
    body["ignore_eos"] = True  # a sampled end token must not finish it before the checks
    with httpx.stream("POST", f"{url}/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # the role chunk, sent before the job may have left the queue
        health = httpx.get(f"{url}/health").json()
        assert health["running"] + health["waiting"] == 1
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        health = httpx.get(f"{url}/health").json()
        if health["running"] == 0 and health["waiting"] == 0 and health["cancelled"] == cancelled + 1:
            return
        time.sleep(0.1)
    pytest.fail(f"the aborted stream still holds a row: {health}")


def test_api_key_is_required(servers: dict[str, Server]) -> None:
    with pytest.raises(openai.AuthenticationError) as err:
        client(servers["limited"], "wrong").models.list()
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    assert len(client(servers["limited"], API_KEY).models.list().data) == 7
    assert httpx.get(f"{servers['limited'].url}/health").status_code == 200  # probes need no key


def test_past_the_limits_requests_get_429(servers: dict[str, Server]) -> None:
    url, headers = servers["limited"].url, {"authorization": f"Bearer {API_KEY}"}
    body = {"model": "a1", "prompt": "hello", "max_tokens": 4000, "temperature": 1.0, "stream": True}
    body["ignore_eos"] = True  # a sampled end token must not finish it before the checks
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as running:
        lines = running.iter_lines()  # held: a dropped iterator closes the connection, which cancels the request
        next(lines)
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as waiting:
            assert waiting.status_code == 200 and httpx.get(f"{url}/health").json()["waiting"] == 1
            over = httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, headers=headers)
            assert over.status_code == 429 and over.json()["error"]["code"] == "rate_limit_exceeded"


def test_more_choices_than_the_server_ever_takes_get_400_and_leave_nothing_behind(servers: dict[str, Server]) -> None:
    url, headers = servers["limited"].url, {"authorization": f"Bearer {API_KEY}"}  # 1 running + 1 waiting at most
    body = {"model": "a1", "prompt": "hello", "max_tokens": 4, "n": 3}
    r = httpx.post(f"{url}/v1/completions", json=body, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"  # a 429 would be retried for ever
    deadline = time.monotonic() + 20
    while (health := httpx.get(f"{url}/health").json())["running"] + health["waiting"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert health["running"] + health["waiting"] == 0
    ok = httpx.post(f"{url}/v1/completions", json={**body, "n": 2}, headers=headers)
    assert ok.status_code == 200 and [c["index"] for c in ok.json()["choices"]] == [0, 1]


def test_sigterm_lets_a_running_stream_finish(servers: dict[str, Server]) -> None:
    server = servers["limited"]
    headers = {"authorization": f"Bearer {API_KEY}"}
    body = {"model": "a2", "prompt": "hello", "max_tokens": 40, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers) as r:
        lines = r.iter_lines()
        next(lines)
        server.process.send_signal(15)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] in ("length", "stop")
    assert server.stop() in (0, -15)  # uvicorn re-raises the SIGTERM it handled once it has shut down
    assert "Traceback" not in server.log.read_text()
