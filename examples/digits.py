"""The seed's digits experiment ("Revolutionizing LLM Fine-Tuning"), offline on scikit-learn's 8x8 digits.

A small MLP (64 -> 256 -> 128 -> 10) is pretrained briefly; LoRA then fine-tunes it only on the digits it gets
wrong most often. Printed: accuracy and per-digit errors before/after, trainable % at rank 1 and 2, both ways
of attaching LoRA (a wrapping layer, and weight parametrization via target_parameters), the base model intact
with the adapter disabled, the forgetting of the other digits, and how a lower learning rate or mixing old
digits into the batches limits it.

Run: python examples/digits.py   (about 10 s on 2 CPU cores)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `examples.digits_model` from any folder

from examples.digits_model import digits_split, pretrained_mlp  # noqa: E402
from lorakit import LoraConfig, get_lora_model  # noqa: E402

LAYERS = ["fc1", "fc2", "fc3"]
STEPS, BATCH = 150, 32


def errors_per_digit(model: nn.Module, x: Tensor, y: Tensor) -> list[int]:
    model.eval()
    with torch.no_grad():
        wrong = model(x).argmax(-1) != y
    return [int((wrong & (y == d)).sum()) for d in range(10)]


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return 1 - sum(errors_per_digit(model, x, y)) / len(y)


def lora_config(rank: int, way: str) -> LoraConfig:
    """'wrap': LoraLayer around each nn.Linear; 'parametrize': W + BA as a torch parametrization of each weight."""
    if way == "wrap":
        return LoraConfig(r=rank, lora_alpha=rank, target_modules=LAYERS)
    return LoraConfig(r=rank, lora_alpha=rank, target_parameters=[f"{name}.weight" for name in LAYERS])


def fine_tune(model: nn.Module, x: Tensor, y: Tensor, lr: float, seed: int = 0) -> None:
    """AdamW on the adapter only, STEPS mini-batches drawn from (x, y)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(STEPS):
        idx = torch.randint(len(x), (BATCH,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def replay_mix(x: Tensor, y: Tensor, worst: list[int], fraction: float) -> tuple[Tensor, Tensor]:
    """The worst digits' examples plus old (other) digits amounting to `fraction` of the mix."""
    target = torch.isin(y, torch.tensor(worst))
    n_old = int(target.sum() * fraction / (1 - fraction))
    old = torch.nonzero(~target).flatten()[
        torch.randperm(int((~target).sum()), generator=torch.Generator().manual_seed(0))
    ]
    keep = torch.cat([torch.nonzero(target).flatten(), old[:n_old]])
    return x[keep], y[keep]


def run(name: str, way: str, lr: float, mix: float, data: tuple[Tensor, ...], worst: list[int]) -> dict:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(0)
    model = get_lora_model(pretrained_mlp(), lora_config(1, way))
    if mix > 0:
        x_ft, y_ft = replay_mix(x_train, y_train, worst, mix)
    else:
        only = torch.isin(y_train, torch.tensor(worst))
        x_ft, y_ft = x_train[only], y_train[only]
    fine_tune(model, x_ft, y_ft, lr)
    errors = errors_per_digit(model, x_test, y_test)
    with model.disable_adapter():
        base_errors = errors_per_digit(model, x_test, y_test)
    return {"name": name, "model": model, "errors": errors, "acc": accuracy(model, x_test, y_test),
            "base_errors": base_errors}  # fmt: skip


def main() -> None:
    data = digits_split()
    x_train, y_train, x_test, y_test = data
    base = pretrained_mlp()
    base_errors = errors_per_digit(base, x_test, y_test)
    train_errors = errors_per_digit(base, x_train, y_train)
    worst = sorted(range(10), key=lambda d: -train_errors[d])[:2]
    print(f"pretrained MLP 64-256-128-10: test accuracy {accuracy(base, x_test, y_test):.3f}")
    print(f"  test errors per digit 0-9: {base_errors}  (worst on the training set: digits {worst})\n")

    for rank in (1, 2):
        trainable, total = get_lora_model(pretrained_mlp(), lora_config(rank, "wrap")).get_nb_trainable_parameters()
        print(f"rank {rank}: trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")

    results = [
        run("LoRA r=1, wrapping layers, lr 1e-2", "wrap", 1e-2, 0.0, data, worst),
        run("LoRA r=1, weight parametrization, lr 1e-2", "parametrize", 1e-2, 0.0, data, worst),
        run("  lower lr 1e-3", "wrap", 1e-3, 0.0, data, worst),
        run("  lower lr 1e-4", "wrap", 1e-4, 0.0, data, worst),
        run("  lr 1e-2, half the batches' examples old digits", "wrap", 1e-2, 0.5, data, worst),
    ]
    print(f"\nfine-tuned only on digits {worst} ({STEPS} steps of {BATCH}); test errors per digit 0-9:")
    print(f"  {'before (pretrained)':50s} {base_errors}  worst {_on(base_errors, worst):3d}  "
          f"others {_off(base_errors, worst):3d}  acc {accuracy(base, x_test, y_test):.3f}")  # fmt: skip
    for r in results:
        print(f"  {r['name']:50s} {r['errors']}  worst {_on(r['errors'], worst):3d}  "
              f"others {_off(r['errors'], worst):3d}  acc {r['acc']:.3f}")  # fmt: skip
    intact = all(r["base_errors"] == base_errors for r in results)
    print(f"\nadapter disabled: errors equal the pretrained model's in every run: {intact}")
    same = torch.allclose(results[0]["model"](x_test), results[1]["model"](x_test), atol=1e-4)
    print(f"wrapping and parametrization give the same fine-tuned outputs: {same}")


def _on(errors: list[int], worst: list[int]) -> int:
    return sum(errors[d] for d in worst)


def _off(errors: list[int], worst: list[int]) -> int:
    return sum(e for d, e in enumerate(errors) if d not in worst)


if __name__ == "__main__":
    main()
