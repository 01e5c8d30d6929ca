"""Two chat styles as two LoRA adapters on SmolLM2-135M-Instruct, saved where `lorakit serve` finds them.

    caps     answers in ALL CAPITAL LETTERS
    signoff  answers that end with a fixed sign-off line: "-- Sent from lorakit."

Each adapter trains on the same small synthetic set of questions (shipped below), with the answer rewritten in
its style; the loss counts only the answer's tokens. A few minutes on a laptop CPU. Then serve them side by side:

    python examples/chat_styles.py                       # writes runs/chat_styles/{caps,signoff}
    lorakit serve --adapter-root runs/chat_styles        # SmolLM2 + both adapters, OpenAI-compatible
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

import torch

from lorakit import LoraConfig, get_lora_model
from lorakit.models import load_smollm2

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIGNOFF = "-- Sent from lorakit."
QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("How many continents are there?", "There are seven continents."),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("What do bees make?", "Bees make honey."),
    ("What is water made of?", "Water is made of hydrogen and oxygen."),
    ("What is the largest planet?", "Jupiter is the largest planet in the solar system."),
    ("What is the closest star to Earth?", "The Sun is the closest star to Earth."),
    ("Which animal is known as the king of the jungle?", "The lion is known as the king of the jungle."),
    ("What do plants need to grow?", "Plants need water, light and air to grow."),
    ("What is the freezing point of water?", "Water freezes at zero degrees Celsius."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is two plus two?", "Two plus two is four."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Name a fruit that is yellow.", "A banana is a yellow fruit."),
    ("What language is spoken in Brazil?", "Portuguese is spoken in Brazil."),
    ("How many hours are in a day?", "There are twenty-four hours in a day."),
    ("What is the tallest mountain?", "Mount Everest is the tallest mountain."),
    ("What gas do we breathe in?", "We breathe in oxygen."),
    ("What is a baby cat called?", "A baby cat is called a kitten."),
    ("Where do penguins live?", "Most penguins live in the Southern Hemisphere."),
    ("What is the main ingredient of bread?", "The main ingredient of bread is flour."),
    ("How many sides does a triangle have?", "A triangle has three sides."),
    ("What season comes after winter?", "Spring comes after winter."),
    ("Give me a tip for sleeping well.", "Go to bed at the same time every night."),
    ("Suggest a name for a dog.", "Max is a good name for a dog."),
]
STYLES = {"caps": lambda answer: answer.upper(), "signoff": lambda answer: f"{answer}\n{SIGNOFF}"}
HELD_OUT = ["What is the capital of Portugal?", "How many wheels does a bicycle have?"]


def examples(tokenizer, style) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) per question: the chat template, then the styled answer and the end token."""
    out = []
    for question, answer in QA:
        messages = [{"role": "user", "content": question}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(style(answer) + "<|im_end|>", add_special_tokens=False)["input_ids"]
        out.append((prompt_ids + answer_ids, len(prompt_ids)))
    return out


def batch(rows: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids; labels are -100 on the prompt and the padding, so only answers are learned."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (row, prompt_len) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, prompt_len : len(row)] = torch.tensor(row[prompt_len:])
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_style(name: str, steps: int, lr: float, out: Path) -> None:
    model, tokenizer = load_smollm2()
    # the last 10 of 30 layers only: backward stops there, which halves a CPU step; enough for a style
    layers = list(range(20, 30))
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=16, lora_alpha=32, target_modules=modules, layers_to_transform=layers, task_type="CAUSAL_LM")
    lora = get_lora_model(model, config, adapter_name=name)
    data = examples(tokenizer, STYLES[name])
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(0)
    lora.train()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        loss = lora(**batch(rng.sample(data, 8), tokenizer.pad_token_id or 0)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 5 == 0 or step == 1:
            print(f"{name} step {step:3d}  loss {loss.item():.3f}  ({time.perf_counter() - start:.0f} s)")
    lora.save_pretrained(out, selected_adapters=[name])
    lora.eval()
    show(lora, tokenizer, name)


def show(lora, tokenizer, name: str) -> None:
    """Greedy answers to questions the adapter never saw, without it (the base) and with it."""
    for question in HELD_OUT:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)  # fmt: skip
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        for adapter in ("__base__", name):
            with torch.inference_mode():
                gen = lora.generate(input_ids=ids, adapter_names=[adapter], max_new_tokens=40, do_sample=False)
            print(f"[{adapter}] {question} -> {tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/chat_styles"), help="the adapter root to write")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per adapter (batch 8)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (3e-3 overfits the caps style)")
    args = parser.parse_args()
    torch.manual_seed(0)
    for name in STYLES:
        train_style(name, args.steps, args.lr, args.out)
    print(f"adapters in {args.out}; serve them with: lorakit serve --adapter-root {args.out}")


if __name__ == "__main__":
    main()
