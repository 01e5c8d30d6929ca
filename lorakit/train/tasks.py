"""What differs between tasks, and nothing else: how rows become tensors, which model head, how a batch is scored.

Each task turns a batch into one `Scores` (summed loss, counted items, correct items), which serves both the
training step (mean loss) and evaluation (sums over the eval set), so the two can never disagree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit import LoraModel, models
from lorakit.errors import ConfigError, LorakitError
from lorakit.head_loss import CHUNK_ROWS, chunk_rows, head_loss
from lorakit.train.config import DataSection, TrainConfig
from lorakit.train.data import Split, check_columns, check_filled, label_ids, load_split

Example = dict[str, Any]
Batch = dict[str, Tensor]
IGNORE = -100  # the label id cross-entropy skips (padding, non-first sub-words)


@dataclass
class Scores:
    loss_sum: Tensor  # keeps its graph in training
    count: int
    correct: int

    def mean_loss(self) -> Tensor:
        return self.loss_sum / max(self.count, 1)


@dataclass
class Prepared:
    """A task's data, ready for batching, and what the model head needs to know about it."""

    train: list[Example]
    eval: list[Example]
    classes: list[Any] | None
    collate: Callable[[list[Example]], Batch]


def prepare(config: TrainConfig) -> Prepared:
    """Reads, checks and encodes the data of `config`; raises ConfigError (nothing written) on bad input."""
    folder = _folder(config.model.source)
    if folder is not None:
        _check_model_folder(folder, config.task)
    elif config.task == "classification" and not models.is_factory(config.model.source):
        raise ConfigError(
            "task 'classification' takes a model from a factory: model.source = 'package.module:function'"
        )
    split = load_split(config.data, config.seed)
    return _PREPARE[config.task](config, split)


def build_model(config: TrainConfig, prepared: Prepared) -> nn.Module:
    """The base model with the head the task needs; seeded, so a fresh head is the same in every run."""
    torch.manual_seed(config.seed)
    source = config.model.source
    if models.is_factory(source):
        return _as_config_error(models.call_factory, source)
    return _as_config_error(models.load_model, source, _PEFT_TASK[config.task], **_head(config.task, prepared.classes))


def check_outputs(model: nn.Module, prepared: Prepared, device: torch.device) -> None:
    """Every class id fits the model's output: one forward pass on one example, before the run folder exists."""
    if prepared.classes is None:
        return
    batch = {k: v.to(device) for k, v in prepared.collate(prepared.train[:1]).items()}
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
    n_out = (out if isinstance(out, Tensor) else out.logits).shape[-1]
    if len(prepared.classes) > n_out:
        raise ConfigError(
            f"the data has {len(prepared.classes)} classes {prepared.classes[:12]} but the model outputs {n_out} "
            "scores; give the model one output per class, or set data.labels (with data.other_labels = 'drop')"
        )


def majority_baseline(task: str, prepared: Prepared) -> dict[str, float]:
    """Accuracy of always answering the eval set's most common label: the number a trained model must beat."""
    if task == "causal-lm" or not prepared.eval:
        return {}
    labels = []
    for example in prepared.eval:
        value = example["labels"]
        labels += [v for v in value if v != IGNORE] if isinstance(value, list) else [int(value)]
    if not labels:
        return {}
    return {"accuracy": max(labels.count(c) for c in set(labels)) / len(labels)}


def score(task: str, model: nn.Module, batch: Batch, fused: FusedHead | None = None) -> Scores:
    """Loss sum, item count and correct count of one batch (through `fused`'s chunked head when given)."""
    if fused is not None:
        return fused.score(batch)
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs)
    return score_logits(task, out if isinstance(out, Tensor) else out.logits, labels)


def score_logits(task: str, logits: Tensor, labels: Tensor) -> Scores:
    """Loss sum, item count and correct count of a batch's logits (parallel jobs score their rows' slice)."""
    if task == "causal-lm":  # predict token t+1 from tokens <= t
        logits, labels = logits[:, :-1], labels[:, 1:]
    logits = logits.reshape(-1, logits.shape[-1]).float()
    labels = labels.reshape(-1)
    valid = labels != IGNORE
    loss_sum = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    correct = int(((logits.argmax(-1) == labels) & valid).sum())
    return Scores(loss_sum, int(valid.sum()), correct)


@dataclass
class FusedHead:
    """A causal LM split at its output head (run.fused_head_loss): the decoder's hidden states go through the head
    and the loss chunk by chunk, so the batch's tokens x vocabulary fp32 logits never exist at once."""

    decoder: nn.Module
    head: nn.Module
    chunk_rows: int = CHUNK_ROWS
    compiled: bool | None = None  # compile a plain linear head's per-chunk loss (None: on CUDA; see head_loss)

    def score(self, batch: Batch) -> Scores:
        labels = batch["labels"][:, 1:]  # predict token t+1 from tokens <= t
        hidden = self.decoder(**{k: v for k, v in batch.items() if k != "labels"})[0][:, :-1]  # (B, S-1, H)
        valid = labels != IGNORE  # only scored rows go through the head
        loss_sum, correct = head_loss(hidden[valid], self.head, labels[valid], IGNORE, self.chunk_rows, self.compiled)
        return Scores(loss_sum, int(valid.sum()), correct)


def fused_head(config: TrainConfig, model: nn.Module, prepared: Prepared, world: int) -> FusedHead | None:
    """The split model when run.fused_head_loss asks for it and its head gives the model's own logits on the first
    training example; else None, with the reason printed ("auto") or a ConfigError ("on")."""
    mode = config.run.fused_head_loss
    if mode == "off" or config.task != "causal-lm":
        return None
    if world > 1 and config.run.distributed != "ddp":  # FSDP2 gathers parameters in hooks of the model's forward
        reason = f"it runs under torchrun with run.distributed = 'ddp' only, not {config.run.distributed!r}"
    else:
        split = _split(model)
        reason = _differs(model, split, prepared) if split else "the model has no decoder and output head to split"
        if reason is None:
            split.compiled = False if config.run.compile == "off" else None  # off: nothing compiles, the head too
            return split
    if mode == "on":
        raise ConfigError(f"run.fused_head_loss = 'on' but {reason}; set run.fused_head_loss = 'auto' or 'off'")
    if world == 1:
        print(f"fused head loss off ({reason}): the loss is computed from the model's full logits", flush=True)
    return None


def _split(model: nn.Module) -> FusedHead | None:
    """transformers' causal LMs: base_model is the decoder (final norm included), the output embeddings the head."""
    base = model.model if isinstance(model, LoraModel) else model
    decoder = getattr(base, "base_model", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(decoder, nn.Module) or decoder is base or not isinstance(head, nn.Module):
        return None
    vocab = getattr(getattr(base, "config", None), "vocab_size", None)
    device = next(head.parameters(), torch.empty(0)).device  # the loop moved the model to its device already
    return FusedHead(decoder, head, chunk_rows(vocab, device) if isinstance(vocab, int) else CHUNK_ROWS)


def _differs(model: nn.Module, split: FusedHead, prepared: Prepared) -> str | None:
    """Why head(decoder(x)) is not the model's logits (a soft cap or scale after the head), or None when it is."""
    if not prepared.train:
        return "there is no training example to check it on"
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in prepared.collate(prepared.train[:1]).items() if k != "labels"}
    was_training = model.training
    model.eval()  # dropout would make the two passes differ
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
            mine = split.head(split.decoder(**inputs)[0])
    except Exception as err:  # a decoder that cannot run alone is a model the split does not fit, not an error
        return f"its decoder does not run alone ({models.first_line(err)})"
    finally:
        model.train(was_training)
    tolerance = 1e-4 if mine.dtype == torch.float32 else 2e-2  # bf16 logits hold 3 significant digits
    if mine.shape != logits.shape:
        return "the model changes its logits after the output head"
    largest = logits.float().abs().max().clamp_min(1e-6)
    if (mine.float() - logits.float()).abs().max() > tolerance * largest:
        return "the model changes its logits after the output head"
    return None


def metrics(task: str, loss_sum: float, count: int, correct: int) -> dict[str, float]:
    loss = loss_sum / max(count, 1)
    out = {"loss": loss, "accuracy": correct / max(count, 1)}
    if task == "causal-lm":
        out["perplexity"] = math.exp(min(loss, 50.0))
    return out


def primary_metric(task: str) -> tuple[str, bool]:
    """(name, higher is better) of the number a run is judged by."""
    return ("perplexity", False) if task == "causal-lm" else ("accuracy", True)


# -- models from folders ---------------------------------------------------------------------------------------------
_PEFT_TASK = {"seq-cls": "SEQ_CLS", "token-cls": "TOKEN_CLS", "causal-lm": "CAUSAL_LM", "classification": None}


def _folder(source: str) -> Path | None:
    return _as_config_error(models.model_folder, source)


def _as_config_error(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Model loading errors are a config's errors: they name model.source's value and the fix."""
    try:
        return function(*args, **kwargs)
    except ConfigError:
        raise
    except LorakitError as err:
        raise ConfigError(f"model.source: {err}") from None


def _head(task: str, classes: list[Any] | None) -> dict[str, Any]:
    if classes is None:
        return {}
    return {
        "num_labels": len(classes),
        "id2label": dict(enumerate(map(str, classes))),
        "label2id": {str(c): i for i, c in enumerate(classes)},
    }


def _check_model_folder(folder: Path, task: str) -> None:
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"{folder} is not a model folder (no config.json); set model.source to a folder written by "
            "transformers' save_pretrained, or to a factory 'package.module:function'"
        )
    if task == "classification":
        raise ConfigError(
            "task 'classification' takes a model from a factory: model.source = 'package.module:function'"
        )


def _tokenizer(config: TrainConfig) -> Any:
    source = config.model.tokenizer or config.model.source
    folder = _folder(source)
    from transformers import AutoTokenizer

    if folder is None and not models.is_factory(source) and models.hub_enabled():
        where: str | Path = source  # a hub id
    elif folder is None or not folder.is_dir():
        raise ConfigError(f"task {config.task!r} needs a tokenizer: set model.tokenizer to a folder that has one")
    else:
        where = folder
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=isinstance(where, Path))
    except Exception as err:
        raise ConfigError(
            f"no tokenizer loads from {where} ({models.first_line(err)}); set model.tokenizer to a folder with one"
        ) from None
    if tokenizer.pad_token is None:  # GPT-2 style tokenizers have none; padding is masked out of the loss anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# -- encoding per task -----------------------------------------------------------------------------------------------
def _check_rows(split: Split, data: DataSection, columns: list[str], filled: list[str]) -> None:
    """Train and eval rows all have `columns`, and no empty, null or NaN cell in `filled` (texts and labels)."""
    for rows, where in ((split.train, data.path), (split.eval, data.eval_path or data.path)):
        if rows:
            check_columns(rows, columns, where)
            check_filled(rows, filled, where)


def _prepare_seq_cls(config: TrainConfig, split: Split) -> Prepared:
    data = config.data
    _check_rows(split, data, [data.text_column, data.label_column], [data.text_column, data.label_column])
    classes, split = label_ids(split, data)
    tokenizer = _tokenizer(config)

    def encode(rows: list[Example]) -> list[Example]:
        texts = [str(r[data.text_column]) for r in rows]
        enc = tokenizer(texts, truncation=data.truncation, max_length=data.max_length) if texts else {"input_ids": []}
        return [{**{k: enc[k][i] for k in enc}, "labels": r[data.label_column]} for i, r in enumerate(rows)]

    return Prepared(encode(split.train), encode(split.eval), classes, _text_collate(tokenizer, config, per_token=False))


def _prepare_token_cls(config: TrainConfig, split: Split) -> Prepared:
    data = config.data
    _check_rows(split, data, [data.text_column, data.label_column], [data.text_column, data.label_column])
    seen = sorted({str(t) for rows in (split.train, split.eval) for r in rows for t in r[data.label_column]})
    classes = list(data.labels) if data.labels is not None else seen
    index = {str(c): i for i, c in enumerate(classes)}
    outside = [t for t in seen if t not in index]
    if outside:
        raise ConfigError(f"tag(s) {outside[:5]} are not in data.labels {classes}; add them to data.labels")
    tokenizer = _tokenizer(config)

    def encode(rows: list[Example]) -> list[Example]:
        out = []
        for r in rows:
            enc = tokenizer(list(r[data.text_column]), is_split_into_words=True, truncation=data.truncation,
                            max_length=data.max_length)  # fmt: skip
            words, previous, labels = enc.word_ids(), None, []
            for word in words:  # a word's tag goes on its first sub-word; the rest are ignored, as in HF's recipe
                first = word is not None and word != previous
                labels.append(index[str(r[data.label_column][word])] if first else IGNORE)
                previous = word
            out.append({**dict(enc), "labels": labels})
        return out

    return Prepared(encode(split.train), encode(split.eval), classes, _text_collate(tokenizer, config, per_token=True))


def _prepare_causal_lm(config: TrainConfig, split: Split) -> Prepared:
    """Plain text (every token is learned), or with data.prompt_column an instruction and its answer: the pair is
    written with the tokenizer's chat template and only the answer's tokens are learned and scored."""
    data = config.data
    columns = [data.text_column] + ([data.prompt_column] if data.prompt_column else [])
    _check_rows(split, data, columns, columns)
    tokenizer = _tokenizer(config)

    def encode(rows: list[Example]) -> list[Example]:
        if data.prompt_column:
            return [_encode_chat(tokenizer, str(r[data.prompt_column]), str(r[data.text_column]), data) for r in rows]
        texts = [str(r[data.text_column]) for r in rows]
        if not texts:
            return []
        enc = tokenizer(texts, truncation=data.truncation, max_length=data.max_length)
        return [{"input_ids": ids, "attention_mask": mask, "labels": list(ids)}
                for ids, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True)]  # fmt: skip

    return Prepared(encode(split.train), encode(split.eval), None, _text_collate(tokenizer, config, per_token=True))


def _encode_chat(tokenizer: Any, prompt: str, answer: str, data: Any) -> Example:
    """The prompt as a user turn (chat template, generation prompt included) and the answer after it; labels only
    on the answer and its end-of-turn token, so the model learns to answer, not to repeat questions."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        tail = answer + _end_of_turn(tokenizer, messages, answer, head)
    else:
        head, tail = prompt + "\n", answer + (tokenizer.eos_token or "")
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    ids = (head_ids + tail_ids)[: data.max_length if data.truncation else None]
    labels = ([IGNORE] * len(head_ids) + tail_ids)[: len(ids)]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def _end_of_turn(tokenizer: Any, messages: list[dict], answer: str, head: str) -> str:
    """What the chat template writes after an assistant's answer (e.g. '<|im_end|>\\n'), learned with it."""
    full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False)
    return full[len(head) + len(answer) :] if full.startswith(head + answer) else (tokenizer.eos_token or "")


def _prepare_classification(config: TrainConfig, split: Split) -> Prepared:
    """Tabular or image rows: data.feature_columns, or one column 'features' holding an array per row."""
    data = config.data
    columns = data.feature_columns or ["features"]
    _check_rows(split, data, [*columns, data.label_column], [data.label_column])
    classes, split = label_ids(split, data)

    def encode(rows: list[Example]) -> list[Example]:
        def features(number: int, r: Example) -> Tensor:
            values = [_numeric(r[c], c, number, data.path) for c in columns]  # CSV cells arrive as text
            try:
                x = torch.tensor(values[0] if len(columns) == 1 else values, dtype=torch.float32).flatten()
            except (TypeError, ValueError) as err:
                raise ConfigError(f"row {number} of {data.path}: features {columns} are not numbers ({err})") from None
            if not torch.isfinite(x).all():
                raise ConfigError(
                    f"row {number} of {data.path} has a NaN or infinite feature in {columns}; remove or fill it "
                    "(training on it would turn every weight into NaN)"
                )
            return x

        return [{"x": features(i, r), "labels": r[data.label_column]} for i, r in enumerate(rows)]

    def collate(examples: list[Example]) -> Batch:
        return {"x": torch.stack([e["x"] for e in examples]), "labels": torch.tensor([e["labels"] for e in examples])}

    return Prepared(encode(split.train), encode(split.eval), classes, collate)


def _numeric(value: Any, column: str, row: int, path: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return float(value)
    except ValueError:
        raise ConfigError(
            f"column {column!r} of {path} holds {value!r} (row {row}), not a number; task 'classification' needs "
            "numeric data.feature_columns"
        ) from None


def _text_collate(tokenizer: Any, config: TrainConfig, per_token: bool) -> Callable[[list[Example]], Batch]:
    """Pads a batch to its longest example (or data.max_length); padded label positions are IGNORE."""
    pad_id = tokenizer.pad_token_id

    def collate(examples: list[Example]) -> Batch:
        width = batch_width(max(len(e["input_ids"]) for e in examples), config.data)
        batch: dict[str, list] = {}
        for key in examples[0]:
            if key == "labels" and not per_token:
                continue
            fill = IGNORE if key == "labels" else pad_id if key == "input_ids" else 0
            batch[key] = [e[key] + [fill] * (width - len(e[key])) for e in examples]
        if not per_token:
            batch["labels"] = [e["labels"] for e in examples]
        return {k: torch.tensor(v) for k, v in batch.items()}

    return collate


def batch_width(longest: int, data: DataSection) -> int:
    """The length a batch whose longest example has `longest` tokens is padded to: data.max_length under
    padding = max_length, else `longest`, rounded up to a multiple of data.pad_to_multiple_of if set (but not past
    max_length). Never shorter than `longest` (examples untruncated, truncation = false, can be longer)."""
    if data.padding == "max_length":
        return max(data.max_length, longest)
    multiple = data.pad_to_multiple_of
    if not multiple:
        return longest
    return max(longest, min(-(-longest // multiple) * multiple, data.max_length))


_PREPARE = {
    "seq-cls": _prepare_seq_cls,
    "token-cls": _prepare_token_cls,
    "causal-lm": _prepare_causal_lm,
    "classification": _prepare_classification,
}
