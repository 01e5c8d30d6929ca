"""Every LoRA variant on one small real task, measured: accuracy, trainable parameters, file size, memory, time.

Task: scikit-learn's bundled handwritten digits (1,797 8x8 images, offline). An MLP is pretrained on the
images as they are, then adapted to a shifted domain (each image transposed and its intensities inverted),
where the pretrained model is poor. Every variant adapts the same three linear layers at r=8 (VeRA also at
r=256) with AdamW for the same number of steps; accuracy is on a held-out split, mean over seeds.

Peak memory is the bytes autograd keeps for backward in one training forward pass (batch 512), counted with
torch.autograd.graph.saved_tensors_hooks (distinct storages): on CPU this is the activation memory a
variant controls; the model's weights are the same for all but QLoRA, whose base weight bytes are reported
apart.

    python benchmarks/variants.py            # writes benchmarks/results/variants_<date>.{json,png}, prints the table
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from lorakit import LoraConfig, VeraConfig, get_lora_model
from lorakit.optim import create_optimizer
from lorakit.quant import base_weight_bytes_per_param, quantize_model

TARGETS = ["0", "2", "4"]
RESULTS = Path(__file__).parent / "results"

# name -> (config, optimizer options, quantize the base first)
VARIANTS: dict[str, tuple[object, dict, bool]] = {
    "lora": (LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS), {}, False),
    "rslora": (LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, use_rslora=True), {}, False),
    "dora": (LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, use_dora=True), {}, False),
    "lora+ (ratio 16)": (LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS), {"loraplus_lr_ratio": 16}, False),
    "pissa": (LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa"), {}, False),
    "olora": (LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS, init_lora_weights="olora"), {}, False),
    "lora_fa": (LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, variant="lora_fa"), {}, False),
    "delta_lora": (LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, variant="delta_lora"), {}, False),
    # VeRA trains only scaling vectors and needs a larger learning rate (the paper's are 10x LoRA's or more)
    "vera r=8": (VeraConfig(r=8, target_modules=TARGETS), {"lr_scale": 10}, False),
    "vera r=256": (VeraConfig(r=256, target_modules=TARGETS), {"lr_scale": 10}, False),
    "qlora (nf4 base)": (LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS), {}, True),
}


def data(seed: int):
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    shifted = 1.0 - x.reshape(-1, 8, 8).transpose(1, 2).reshape(-1, 64)  # the new domain
    idx_train, idx_test = train_test_split(range(len(y)), test_size=0.3, random_state=seed, stratify=y)
    return x[idx_train], shifted[idx_train], y[idx_train], shifted[idx_test], y[idx_test]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def train(model: nn.Module, optimizer, x, y, steps: int, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    times = []
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, len(y), (64,), generator=gen)
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return times


def accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def saved_activation_bytes(model: nn.Module, x) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).logsumexp(-1).sum()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def run_variant(name: str, pretrained: dict, seed: int, steps: int, lr: float, split) -> dict:
    config, opt_options, quantize = VARIANTS[name]
    _, x_new, y_train, x_test, y_test = split
    base = mlp()
    base.load_state_dict(pretrained)
    if quantize:
        quantize_model(base)
    torch.manual_seed(seed)
    model = get_lora_model(base, config)
    options = dict(opt_options)
    lr = lr * options.pop("lr_scale", 1)
    optimizer = create_optimizer(model, torch.optim.AdamW, lr=lr, weight_decay=0.0, **options)
    times = train(model, optimizer, x_new, y_train, steps, seed)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        file_bytes = (Path(tmp) / "adapter_model.safetensors").stat().st_size
    return {
        "accuracy": accuracy(model, x_test, y_test),
        "trainable_params": model.get_nb_trainable_parameters()[0],
        "adapter_file_bytes": file_bytes,
        "saved_activation_bytes": saved_activation_bytes(model, x_new[:512]),
        "step_ms": 1000 * statistics.median(times),
        "base_bytes_per_param": base_weight_bytes_per_param(base) if quantize else 4.0,
    }


def pretrain(seed: int, split) -> dict:
    torch.manual_seed(seed)
    model = mlp()
    x_train, _, y_train, _, _ = split
    train(model, torch.optim.AdamW(model.parameters(), lr=1e-3), x_train, y_train, 1500, seed)
    return model.state_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # step times comparable across variants, not across thread scheduling
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    base_acc = []
    for seed in range(args.seeds):
        split = data(seed)
        pretrained = pretrain(seed, split)
        model = mlp()
        model.load_state_dict(pretrained)
        base_acc.append(accuracy(model, split[3], split[4]))
        for name in VARIANTS:
            runs[name].append(run_variant(name, pretrained, seed, args.steps, args.lr, split))
    table = {name: {k: statistics.mean(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    for name, rs in runs.items():
        table[name]["accuracy_std"] = statistics.pstdev(r["accuracy"] for r in rs)
    meta = {
        "date": args.date,
        "machine": f"{platform.processor() or platform.machine()}, 1 thread, torch {torch.__version__}",
        "command": f"python benchmarks/variants.py --seeds {args.seeds} --steps {args.steps} --lr {args.lr}",
        "pretrained_accuracy_on_shifted_domain": statistics.mean(base_acc),
    }
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"variants_{args.date}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "variants": table}, indent=2))
    print(markdown(table, meta))
    chart(table, stem.with_suffix(".png"))


def markdown(table: dict, meta: dict) -> str:
    lines = [
        f"pretrained model on the shifted domain: {100 * meta['pretrained_accuracy_on_shifted_domain']:.1f}%",
        "",
        "| variant | accuracy % (± std) | trainable params | adapter file | saved activations | step ms "
        "| base bytes/param |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        lines.append(
            f"| {name} | {100 * row['accuracy']:.1f} ± {100 * row['accuracy_std']:.1f} "
            f"| {row['trainable_params']:,.0f} "
            f"| {row['adapter_file_bytes'] / 1024:.1f} KiB | {row['saved_activation_bytes'] / 1024:.0f} KiB "
            f"| {row['step_ms']:.2f} | {row['base_bytes_per_param']:.3f} |"
        )
    return "\n".join(lines)


def chart(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [
        ("accuracy", "test accuracy", 100),
        ("trainable_params", "trainable parameters", 1),
        ("adapter_file_bytes", "adapter file (KiB)", 1 / 1024),
        ("saved_activation_bytes", "saved activations, batch 512 (KiB)", 1 / 1024),
        ("step_ms", "step time (ms)", 1),
    ]
    names = list(table)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 4.5), sharey=True)
    for ax, (key, title, factor) in zip(axes, metrics, strict=True):
        ax.barh(names, [table[n][key] * factor for n in names], color="tab:blue")
        ax.set_title(title, fontsize=10)
        if key == "trainable_params":
            ax.set_xscale("log")
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
