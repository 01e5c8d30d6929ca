"""The server's parts alone: text deltas and stop strings, adapter roots, the padded decode batch."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from transformers.cache_utils import DynamicCache

from lorakit.serve.batch import DecodeBatch
from lorakit.serve.engine import GenerationRequest, Job
from lorakit.serve.errors import ServeError
from lorakit.serve.roots import AdapterRoots
from lorakit.serve.text import TextStream
from tests.serve.tiny import build_model, build_tokenizer, write_tiny


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def stream_all(tokenizer, text: str, stop: list[str]) -> tuple[list[str], bool]:
    stream, deltas = TextStream(tokenizer, stop), []
    for token in tokenizer(text)["input_ids"]:
        delta, stopped = stream.push(token)
        deltas.append(delta)
        if stopped:
            return deltas, True
    return [*deltas, stream.finish()], False


def test_deltas_add_up_to_the_decoded_text(tokenizer) -> None:
    text = "héllo wörld, 東京 ✓ paris"  # multi-byte characters split across byte-level tokens
    deltas, stopped = stream_all(tokenizer, text, [])
    assert "".join(deltas) == text and not stopped
    assert all("\ufffd" not in d for d in deltas)


def test_a_stop_string_cuts_the_text_and_is_never_sent(tokenizer) -> None:
    deltas, stopped = stream_all(tokenizer, "the quick brown fox jumps", ["brown f", "zzz"])
    assert stopped and "".join(deltas) == "the quick "
    assert not any("brown" in d for d in deltas)


@pytest.mark.parametrize(("ignore_eos", "min_tokens", "finished_after"), [(False, 0, 1), (False, 3, 4), (True, 0, 6)])
def test_end_token_rules(tokenizer, ignore_eos: bool, min_tokens: int, finished_after: int) -> None:
    """The end token is the greedy pick at every step: it ends the job at once, after min_tokens tokens (it is
    masked before), or never with ignore_eos (the job runs to max_tokens)."""
    eos, events = tokenizer.eos_token_id, []
    request = GenerationRequest("a", [1], 6, ignore_eos=ignore_eos, min_tokens=min_tokens)
    job = Job(request, events.append, tokenizer, {eos})
    logits = torch.zeros(len(tokenizer))
    logits[eos], logits[65] = 2.0, 1.0
    steps = next(n for n in range(1, 7) if job.accept(job.next_token(logits, greedy=int(logits.argmax()))))
    assert steps == finished_after
    assert job.tokens == [65] * min_tokens + [eos] * (steps - min_tokens)
    assert events[-1].finish_reason == ("length" if ignore_eos else "stop")


def test_roots_refuse_paths_that_leave_them(tmp_path: Path) -> None:
    _, root = write_tiny(tmp_path / "in", ["a1"])
    _, outside = write_tiny(tmp_path / "out", ["evil"])
    (root / "link").symlink_to(outside / "evil")
    roots = AdapterRoots([root])
    assert roots.resolve("a1") == (root / "a1").resolve()
    assert roots.resolve(str(root / "a1")) == (root / "a1").resolve()
    for bad in ["../out/adapters/evil", str(outside / "evil"), "link", "", "a1/../a1", "nothing"]:
        with pytest.raises(ServeError):
            roots.resolve(bad)
    with pytest.raises(ServeError, match="outside the adapter roots"):
        roots.discover()  # the symlink in the root leads out


def test_roots_find_adapters_and_tree_nodes(tmp_path: Path) -> None:
    _, root = write_tiny(tmp_path, ["a1", "a2"], tree=True)
    found = {name: parent for name, _, parent in AdapterRoots([root]).discover()}
    assert found == {"legal": None, "contracts": "legal", "a1": None, "a2": None}
    assert list(found).index("legal") < list(found).index("contracts")


def test_rows_leave_and_padding_columns_go(tokenizer) -> None:
    model = build_model(len(tokenizer), tokenizer.eos_token_id)
    batch = DecodeBatch()
    for row, length in enumerate([3, 7, 5]):
        cache = DynamicCache()
        model(input_ids=torch.arange(length)[None] + 10, cache=cache, use_cache=True)
        batch.add(row, cache)
    assert batch.mask.tolist() == [[0] * 4 + [1] * 3, [1] * 7, [0] * 2 + [1] * 5]
    batch.remove([0, 2])  # the longest row leaves: two columns were padding in both others
    assert batch.rows == [0, 2] and batch.mask.shape == (2, 5)
    assert batch.cache.layers[0].keys.shape[2] == 5


def test_rows_of_one_adapter_join_side_by_side_with_their_own_cache(tokenizer) -> None:
    model = build_model(len(tokenizer), tokenizer.eos_token_id)
    batch, own = DecodeBatch(), {}
    for row, (length, adapter) in enumerate([(3, "a"), (7, "b"), (5, "a"), (2, "c"), (4, "b")]):
        cache = DynamicCache()
        model(input_ids=torch.arange(length)[None] + 10 + row, cache=cache, use_cache=True)
        own[row] = (length, cache.layers[0].keys[0].clone())
        batch.add(row, cache, group=adapter)
    assert batch.rows == [0, 2, 1, 4, 3] and batch.groups == ["a", "a", "b", "b", "c"]
    width = batch.mask.shape[1]
    for i, row in enumerate(batch.rows):
        length, keys = own[row]
        assert batch.mask[i].tolist() == [0] * (width - length) + [1] * length
        assert torch.equal(batch.cache.layers[0].keys[i, :, width - length :], keys)
    batch.remove([0, 2, 4])
    assert batch.rows == [0, 1, 3] and batch.groups == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--adapter", "nope"], "write it as NAME=PATH"),
        (["--adapter-root", "/no/such/folder"], "is not a folder"),
        (["--adapter", "x=/tmp"], "lacks adapter_config.json"),
        (["--device", "tpu9"], "give cpu, cuda or cuda:N"),
        (["--device", "meta"], "give cpu, cuda or cuda:N"),
        (["--dtype", "int8"], "give auto, float32, bfloat16, float16"),
        *([] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA GPU")]),
    ],
)
def test_bad_serve_options_are_one_line_errors(tmp_path: Path, args: list[str], message: str) -> None:
    from typer.testing import CliRunner

    from lorakit.cli import app

    model_dir, _ = write_tiny(tmp_path, [])
    result = CliRunner().invoke(app, ["serve", str(model_dir), *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_reading_an_adapter_does_not_pause_decoding(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit import LoraModel
    from lorakit.multi import AdapterCache
    from lorakit.serve.adapters import AdapterRegistry
    from lorakit.serve.engine import Engine, GenerationRequest

    class SlowDisk(AdapterCache):
        def read(self, directory):
            time.sleep(1.0)  # a slow disk or a large adapter
            return super().read(directory)

    model_dir, root = write_tiny(tmp_path, ["a1"])
    model = LoraModel(AutoModelForCausalLM.from_pretrained(model_dir).eval())
    engine = Engine(model, AutoTokenizer.from_pretrained(model_dir), max_concurrent=2)
    registry = AdapterRegistry(engine, "model", cache=SlowDisk(device_slots=0))
    engine.start()
    try:
        job = engine.submit(GenerationRequest("__base__", [5, 6, 7], max_tokens=4000), lambda event: None)
        while len(job.tokens) < 2:
            time.sleep(0.01)
        before = len(job.tokens)
        read = registry.read("a1", root / "a1")  # in this thread, while the worker decodes
        decoded_meanwhile = len(job.tokens) - before
        registry.attach(read).result(timeout=60)
        assert decoded_meanwhile >= 5 and [a.name for a in registry.snapshot()] == ["a1"]
        assert "a1" in model.peft_config
    finally:
        job.cancel()
        engine.stop()


def _engine_tokens(model, tokenizer, requests: list) -> list:
    """Runs `requests` through an Engine over `model`; each job's tokens, or its error."""
    import threading

    from lorakit.serve.engine import Engine

    engine, results = Engine(model, tokenizer, max_concurrent=4), []
    engine.start()
    try:
        for request in requests:
            done, events = threading.Event(), []

            def emit(event, done=done, events=events) -> None:
                events.append(event)
                if event.finish_reason or event.error:
                    done.set()

            job = engine.submit(request, emit)
            assert done.wait(60), "the job never got an answer"
            results.append(events[-1].error or job.tokens)
    finally:
        engine.stop()
    return results


def test_a_forward_that_names_its_cache_past_key_values_is_served(tokenizer) -> None:
    """transformers before the rename takes past_key_values; given `cache` it would keep no cache at all."""
    from lorakit import LoraModel
    from lorakit.serve.engine import GenerationRequest

    class OlderForward(torch.nn.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                    logits_to_keep=0):  # fmt: skip
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              cache=past_key_values, use_cache=use_cache, logits_to_keep=logits_to_keep)  # fmt: skip

    inner = build_model(len(tokenizer), tokenizer.eos_token_id)
    prompt = [5, 6, 7, 8]
    with torch.no_grad():
        expected = inner.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, 4:].tolist()
    (tokens,) = _engine_tokens(LoraModel(OlderForward(inner)), tokenizer, [GenerationRequest("__base__", prompt, 6)])
    assert tokens == expected


def test_a_job_that_fails_while_joining_the_batch_gets_an_error(tokenizer, monkeypatch) -> None:
    from lorakit import LoraModel
    from lorakit.serve.engine import GenerationRequest

    def broken_add(self, row, cache, group=None) -> None:
        raise RuntimeError("no room")

    monkeypatch.setattr(DecodeBatch, "add", broken_add)
    model = LoraModel(build_model(len(tokenizer), tokenizer.eos_token_id))
    results = _engine_tokens(model, tokenizer, [GenerationRequest("__base__", [5, 6, 7], 8)] * 2)
    assert results == ["internal error while reading the prompt; see the server log"] * 2


def test_serving_forwards_keep_cudnn_attention_off_and_restore_it() -> None:
    """cuDNN's attention builds a plan per key length (a new one every decode step); the server's forwards run
    without it, and the process-wide choice is back as it was afterwards."""
    from lorakit.serve.routing import forward_rows

    seen = {}

    class Recorder(torch.nn.Module):
        def forward(self, **inputs):
            seen["cudnn"] = torch.backends.cuda.cudnn_sdp_enabled()
            seen["others"] = torch.backends.cuda.mem_efficient_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
            seen["rows"] = inputs["adapter_names"]
            return type("Out", (), {"logits": torch.zeros(2, 3, 5)})()

    before = torch.backends.cuda.cudnn_sdp_enabled()
    logits = forward_rows(Recorder(), ["a", "__base__"], input_ids=torch.zeros(2, 3, dtype=torch.long))
    assert seen == {"cudnn": False, "others": True, "rows": ["a", "__base__"]}
    assert logits.shape == (2, 5)
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_a_tiny_temperature_is_greedy(tokenizer) -> None:
    """Logits divided by 1.5e-38 overflow to inf and their softmax is NaN: below GREEDY_BELOW the argmax is taken."""
    from lorakit.serve.sampling import generator_for, next_token

    logits = torch.linspace(-3.0, 40.0, len(tokenizer)).roll(7)
    for temperature in (1.5e-38, 1e-30, 5e-6):
        assert next_token(logits, temperature, 0.9, generator_for(0)) == int(logits.argmax())
    job = Job(GenerationRequest("a", [1], 4, temperature=1.5e-38), lambda event: None, tokenizer, set())
    assert job.next_token(logits, greedy=3) == 3  # the batch's argmax, as for temperature 0


def _run_together(model, tokenizer, requests: list) -> list:
    """(each request's last event, its job), the requests submitted at once: they are decoded in one batch."""
    import threading

    from lorakit.serve.engine import Engine

    engine, ends = Engine(model, tokenizer, max_concurrent=len(requests)), {}
    done = threading.Semaphore(0)

    def emit(i: int, event) -> None:
        if event.finish_reason or event.error:
            ends[i] = event
            done.release()

    jobs = [engine.submit(request, lambda event, i=i: emit(i, event)) for i, request in enumerate(requests)]
    engine.start()
    try:
        for _ in jobs:
            assert done.acquire(timeout=60), "a job never got an answer"
    finally:
        engine.stop()
    return [ends[i] for i in range(len(jobs))], jobs


def test_a_row_that_cannot_pick_its_token_fails_alone(tokenizer, monkeypatch) -> None:
    """A failure while sampling one row (a bug, logits no token can be sampled from) fails that request alone; the
    rows decoded with it go on."""
    from lorakit import LoraModel
    from lorakit.serve import engine as engine_module

    calls = []

    def fails_on_the_third_call(logits, temperature, top_p, generator) -> int:
        calls.append(temperature)
        if len(calls) == 3:  # the sampled row's second decode step, next to the greedy row
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return int(logits.argmax())

    monkeypatch.setattr(engine_module, "next_token", fails_on_the_third_call)
    model = LoraModel(build_model(len(tokenizer), tokenizer.eos_token_id))
    greedy, sampled = GenerationRequest("__base__", [5, 6, 7], 8), GenerationRequest("__base__", [8, 9], 8, 0.7)
    (greedy_end, sampled_end), (greedy_job, _) = _run_together(model, tokenizer, [greedy, sampled])
    assert sampled_end.error and "internal error" in sampled_end.error
    assert greedy_end.error is None and greedy_end.finish_reason == "length" and len(greedy_job.tokens) == 8


def test_a_cancelled_waiting_job_gives_its_place_up_at_once(tokenizer) -> None:
    """A request abandoned while queued leaves the queue when it is cancelled, not when the worker reaches it."""
    from lorakit import LoraModel
    from lorakit.serve.engine import Engine
    from lorakit.serve.errors import APIError

    engine = Engine(LoraModel(build_model(len(tokenizer), tokenizer.eos_token_id)), tokenizer, 1, 1)  # not started
    request = GenerationRequest("__base__", [5, 6], 4)
    engine.submit(request, lambda event: None)
    abandoned = engine.submit(request, lambda event: None)
    with pytest.raises(APIError) as full:
        engine.submit(request, lambda event: None)
    assert full.value.status == 429
    abandoned.cancel()
    abandoned.cancel()  # twice: counted once
    assert engine.stats() == {"running": 0, "waiting": 1, "finished": 0, "cancelled": 1}
    engine.submit(request, lambda event: None)  # the freed place
    assert engine.stats()["waiting"] == 2


def test_any_int_seeds_a_stream_modulo_2_to_the_64() -> None:
    from lorakit.serve.sampling import generator_for

    def draws(seed: int) -> list[float]:
        return torch.rand(4, generator=generator_for(seed)).tolist()

    assert draws(2**64 + 5) == draws(5) and draws(-1) == draws(2**64 - 1) and draws(5) != draws(6)


def test_chat_logprobs_bytes_are_each_tokens_own(tokenizer) -> None:
    """A character split across byte-level tokens: each piece's text is U+FFFD, its bytes are its own, so the
    entries' bytes joined are the text's UTF-8; an added token's bytes are its text's."""
    from lorakit.serve.protocol import ChatShape
    from lorakit.serve.sampling import TokenLogprob
    from lorakit.serve.text import token_bytes

    text = "héllo wörld, 東京 ✓"
    ids = tokenizer(text)["input_ids"]
    shape = ChatShape(lambda t: tokenizer.decode([t]), token_bytes(tokenizer))
    content = shape.logprobs([TokenLogprob(t, -1.0, [(t, -1.0)]) for t in ids])["content"]
    assert any(entry["token"] == "\ufffd" for entry in content)  # pieces of a character
    assert b"".join(bytes(entry["bytes"]) for entry in content) == text.encode()
    assert [entry["top_logprobs"][0]["bytes"] for entry in content] == [entry["bytes"] for entry in content]
    assert token_bytes(tokenizer)(tokenizer.eos_token_id) == b"<|im_end|>"


def test_sentencepiece_byte_tokens_are_their_byte() -> None:
    """Not byte-level (Llama 2, Mistral): a byte-fallback token is its byte, any other token its text."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    from lorakit.serve.text import token_bytes

    vocab = {"<unk>": 0, "▁hi": 1, "<0xE6>": 2, "<0x9D>": 3, "<0xB1>": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    bytes_of = token_bytes(PreTrainedTokenizerFast(tokenizer_object=backend))
    assert [bytes_of(t) for t in (2, 3, 4)] == [b"\xe6", b"\x9d", b"\xb1"] and bytes_of(1) == b"hi"


def test_a_conversation_the_chat_template_refuses_is_a_400() -> None:
    from lorakit.serve.errors import APIError
    from lorakit.serve.prompts import encode_chat

    strict = build_tokenizer()
    strict.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    assert encode_chat(strict, [{"role": "user", "content": "hi"}])
    with pytest.raises(APIError) as refused:
        encode_chat(strict, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert refused.value.status == 400 and refused.value.param == "messages"
    assert "Conversation roles must alternate" in refused.value.message


def test_a_name_whose_unload_still_waits_is_refused_in_words_a_client_knows(tmp_path: Path) -> None:
    """Unloading waits for the requests that use the adapter; loading the name again meanwhile says so (not the
    library's delete_adapter message), and once the unload is done the name loads again."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit import LoraModel
    from lorakit.serve.adapters import AdapterRegistry
    from lorakit.serve.engine import Engine
    from lorakit.serve.errors import APIError

    model_dir, root = write_tiny(tmp_path, ["a1"])
    model = LoraModel(AutoModelForCausalLM.from_pretrained(model_dir).eval())
    engine = Engine(model, AutoTokenizer.from_pretrained(model_dir), max_concurrent=2)
    registry = AdapterRegistry(engine, "model")
    registry.load("a1", root / "a1")
    engine.start()
    job = engine.submit(GenerationRequest("a1", [5, 6, 7], max_tokens=4000), lambda event: None)
    try:
        unloading = registry.unload("a1")
        with pytest.raises(APIError) as refused:
            registry.read("a1", root / "a1")
        assert refused.value.status == 400 and "still being unloaded" in refused.value.message
        assert "delete_adapter" not in refused.value.message
        job.cancel()
        unloading.result(timeout=60)
        registry.load("a1", root / "a1")
        assert [a.name for a in registry.snapshot()] == ["a1"]
    finally:
        job.cancel()
        engine.stop()


def test_an_adapter_that_carries_another_embedding_table_is_refused_and_the_base_kept(tmp_path: Path) -> None:
    """A folder of an adapted embed_tokens carries the base table (save_embedding_layers): equal to the served one
    it loads as any adapter; changed in training, loading it would copy it into the base every adapter shares, so
    it is refused and the served table stays as it was."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit import LoraConfig, LoraModel, get_lora_model
    from lorakit.serve.adapters import AdapterRegistry
    from lorakit.serve.engine import Engine
    from lorakit.serve.errors import APIError

    model_dir, _ = write_tiny(tmp_path, [])
    config = LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    get_lora_model(AutoModelForCausalLM.from_pretrained(model_dir), config).save_pretrained(tmp_path / "same")
    changed = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        changed.get_input_embeddings().weight.add_(1.0)
    get_lora_model(changed, config).save_pretrained(tmp_path / "changed")
    model = LoraModel(AutoModelForCausalLM.from_pretrained(model_dir).eval())
    table = model.model.get_input_embeddings().weight.detach().clone()
    registry = AdapterRegistry(Engine(model, AutoTokenizer.from_pretrained(model_dir), max_concurrent=2), "model")
    registry.load("same", tmp_path / "same")
    with pytest.raises(APIError) as refused:
        registry.load("changed", tmp_path / "changed")
    assert refused.value.status == 400 and "base-layer tensors" in refused.value.message
    assert [a.name for a in registry.snapshot()] == ["same"]
    assert torch.equal(model.model.get_input_embeddings().base_layer.weight, table)
