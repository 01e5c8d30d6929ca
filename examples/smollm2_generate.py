"""Greedy answers of SmolLM2-135M-Instruct with and without the adapter a run of smollm2_chat.toml trained, on the
run's held-out prompts: how many answers are exactly the date in YYYY-MM-DD.

    .venv/bin/python examples/smollm2_generate.py runs/smollm2-dates-<time> [--n 32]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lorakit import LoraModel
from lorakit.models import load_smollm2
from lorakit.train import load_config
from lorakit.train.data import load_split


def answers(model: torch.nn.Module, tokenizer, prompts: list[str]) -> list[str]:
    out = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)  # fmt: skip
        with torch.no_grad():
            tokens = model.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        out.append(tokenizer.decode(tokens[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--n", type=int, default=32)
    args = parser.parse_args()
    config = load_config(args.run / "config.toml")
    rows = load_split(config.data, config.seed).eval[: args.n]
    base, tokenizer = load_smollm2()
    model = LoraModel.from_pretrained(base, args.run / "adapter").eval()
    prompts = [r[config.data.prompt_column] for r in rows]
    with model.disable_adapter():
        before = answers(model, tokenizer, prompts)
    after = answers(model, tokenizer, prompts)
    for row, b, a in list(zip(rows, before, after, strict=True))[:3]:
        print(f"{row['prompt'].splitlines()[-1]!r}\n  base:    {b!r}\n  adapter: {a!r}")
    for name, got in (("base", before), ("adapter", after)):
        exact = sum(g == r[config.data.text_column] for g, r in zip(got, rows, strict=True))
        print(f"{name}: {exact}/{len(rows)} answers exactly the date as YYYY-MM-DD")


if __name__ == "__main__":
    main()
