"""The seed's BERT example ("LoRA: Low-Rank Adaptation for Efficient Fine-Tuning") on the pretrained MiniLM-L6.

Three ways to fine-tune the same model for tweet sentiment (the default run's data): LoRA r=8, alpha=32 on
query/value; the same plus word_embeddings; full fine-tuning. For each: accuracy, trainable %, training time,
peak memory (each variant in its own process, so peaks do not mix) and checkpoint size. Then the LoRA adapter
is saved, reloaded with from_pretrained, merged with merge_and_unload, and the predictions compared.

Run: python examples/bert_lora_vs_full.py   (about 7 minutes on 2 CPU cores)
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lorakit import LoraConfig, LoraModel, get_lora_model  # noqa: E402
from lorakit.train import evaluate, load_config, tasks  # noqa: E402
from lorakit.train.data import batch_indices  # noqa: E402

DATA = ["data.max_samples=2000", "data.eval_samples=1000"]
VARIANTS = {
    "lora": ["query", "value"],
    "lora+emb": ["query", "value", "word_embeddings"],
    "full": None,
}
LR = {"lora": 1e-3, "lora+emb": 1e-3, "full": 5e-5}  # full fine-tuning needs a far smaller step to stay stable


def build(variant: str) -> tuple[torch.nn.Module, object, object]:
    config = load_config(None, DATA)
    prepared = tasks.prepare(config)
    model = tasks.build_model(config, prepared)
    if VARIANTS[variant] is not None:
        lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=VARIANTS[variant],
                          modules_to_save=["classifier"], task_type="SEQ_CLS")  # fmt: skip
        model = get_lora_model(model, lora)
    return model, config, prepared


def train_one_epoch(model: torch.nn.Module, config, prepared, lr: float) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    start = time.perf_counter()
    model.train()
    for indices in batch_indices(len(prepared.train), config.optim.batch_size, config.seed, 0):
        batch = prepared.collate([prepared.train[i] for i in indices])
        tasks.score("seq-cls", model, batch).mean_loss().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def run_variant(variant: str) -> dict:
    """One variant end to end, in this process; returns its numbers as a dict."""
    model, config, prepared = build(variant)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if isinstance(model, LoraModel):
        trainable, total = model.get_nb_trainable_parameters()
    before = evaluate(model, prepared, config)["accuracy"]
    seconds = train_one_epoch(model, config, prepared, LR[variant])
    after = evaluate(model, prepared, config)["accuracy"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # training's peak, before the reload check
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        check = reload_and_merge(model, config, prepared, tmp) if variant == "lora" else {}
    return {"variant": variant, "accuracy_before": before, "accuracy_after": after, "trainable": trainable,
            "total": total, "train_seconds": seconds, "peak_rss_mib": peak / 2**20, "checkpoint_bytes": size,
            **check}  # fmt: skip


def reload_and_merge(model: LoraModel, config, prepared, adapter: str) -> dict:
    """The saved adapter on a fresh base, and the merged plain model, predict what the trained model predicts."""
    batch = prepared.collate(prepared.eval[:256])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        trained = model(**inputs).logits
        reloaded = LoraModel.from_pretrained(tasks.build_model(config, prepared), adapter).eval()
        from_file = reloaded(**inputs).logits
        merged = reloaded.merge_and_unload().eval()
        from_merged = merged(**inputs).logits
    return {
        "reload_max_diff": float((from_file - trained).abs().max()),
        "merged_max_diff": float((from_merged - trained).abs().max()),
        "merged_same_predictions": bool((from_merged.argmax(-1) == trained.argmax(-1)).all()),
        "merged_class": type(merged).__name__,
    }


def main() -> None:
    results = []
    for variant in VARIANTS:  # a fresh process per variant: its own peak memory
        out = subprocess.run([sys.executable, __file__, variant], check=True, capture_output=True, text=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    full = next(r for r in results if r["variant"] == "full")
    print(f"MiniLM-L6 on {DATA}, 1 epoch, batch 32\n")
    print(f"{'variant':10s} {'acc before':>10s} {'acc after':>10s} {'trainable':>20s} {'time':>7s} "
          f"{'peak RSS':>9s} {'checkpoint':>11s} {'vs full':>8s}")  # fmt: skip
    for r in results:
        share = f"{r['trainable']:,} ({100 * r['trainable'] / r['total']:.2f}%)"
        print(f"{r['variant']:10s} {r['accuracy_before']:10.3f} {r['accuracy_after']:10.3f} {share:>20s} "
              f"{r['train_seconds']:6.0f}s {r['peak_rss_mib']:7.0f}MiB {r['checkpoint_bytes'] / 2**20:9.2f}MiB "
              f"{full['checkpoint_bytes'] / r['checkpoint_bytes']:7.0f}x")  # fmt: skip
    lora = results[0]
    diff = lora["reload_max_diff"]
    print(f"\nsaved adapter reloaded with LoraModel.from_pretrained: max logit difference {diff:.1e}")
    print(
        f"merge_and_unload -> {lora['merged_class']}: max logit difference {lora['merged_max_diff']:.1e}, "
        f"same predictions: {lora['merged_same_predictions']}"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(json.dumps(run_variant(sys.argv[1])))
    else:
        main()
