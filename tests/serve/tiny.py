"""A tiny chat model built offline: a byte-level BPE tokenizer with a chat template and a seeded random Llama.

Weights are drawn with a wide spread (std 0.2, not transformers' 0.02) so that logits are far apart and greedy
choices are not near-ties: token-for-token comparisons then test the server, not float rounding. The end token is
(almost) never chosen, so a request's length is its max_tokens and the capacity tests can hold rows busy; ending
on the end token is covered by the real-model test.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lorakit import LoraConfig, get_lora_model

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is the capital of france? paris is the capital of france.",
    "hello, how are you today? i am fine, thank you.",
    "lorakit serves many adapters over one base model",
] * 20


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def build_model(vocab_size: int, eos_id: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.2, eos_token_id=eos_id,
        bos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # the end token's logit stays near 0, far below the top ones: requests run to max_tokens
        model.lm_head.weight[eos_id] = 0.0
    return model


def write_tiny(folder: Path, adapters: list[str], tree: bool = False) -> tuple[Path, Path]:
    """(model folder, adapter root): the model with its tokenizer, one random LoRA per name under the root, and
    with `tree` a saved tree in root/tree: node "contracts" on top of node "legal"."""
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), tokenizer.eos_token_id)
    model_dir, root = folder / "model", folder / "adapters"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    for i, name in enumerate(adapters):
        lora = get_lora_model(build_model(len(tokenizer), tokenizer.eos_token_id), config, adapter_name=name)
        _spread(lora, seed=100 + i)
        lora.save_pretrained(root, selected_adapters=[name])
    if tree:
        lora = get_lora_model(build_model(len(tokenizer), tokenizer.eos_token_id), config, adapter_name="legal")
        lora.add_adapter("contracts", config, parent="legal")
        _spread(lora, seed=99)
        lora.save_pretrained(root / "tree")
    return model_dir, root


def _spread(model: torch.nn.Module, seed: int) -> None:
    """Factors of the adapter's own seed, large enough that each adapter changes the greedy text visibly."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.3)
