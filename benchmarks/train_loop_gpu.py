"""`lorakit train` itself, end to end, on a SmolLM2-135M-shaped causal LM (30 layers, 576 wide, 9/3 heads, vocab
49152, tied head; seeded random bf16 weights and a word-level tokenizer built here, so nothing is downloaded): the
step time the run reports (summary.json's step_seconds) with the text padded to each batch's longest (the default:
run.compile_mode auto keeps torch.compile's default mode) and padded to data.max_length (auto replays each layer as
CUDA graphs), and padded to max_length under the default mode, which parts the padding's share from the graphs';
and padded to each batch's longest rounded up to a multiple of 64 (data.pad_to_multiple_of: four lengths, each
recorded as CUDA graphs once under auto).

Each variant is a fresh `lorakit train` run in this process (LoRA r16 on all linear layers, batch 16, AdamW,
bf16 autocast as on any GPU), --steps steps; step_seconds averages every step, the first ones (compiling,
recording) included, so steady_ms (the median of the logged steps' times after the first third) is reported too.

Run (CUDA): PYTHONPATH=. python benchmarks/train_loop_gpu.py [--steps 60] [--json PATH]
Smoke run (CPU, tiny model, seconds): PYTHONPATH=. python benchmarks/train_loop_gpu.py --quick
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

WORDS = ["the", "cat", "dog", "sat", "ran", "on", "in", "mat", "park", "a", "red", "blue", "big", "small", "and"]
VARIANTS = {
    "longest": [],  # the defaults: padded to each batch's longest, compile_mode auto -> default
    "max_length": ["data.padding=max_length"],  # compile_mode auto -> reduce-overhead (CUDA graphs)
    "max_length-default-mode": ["data.padding=max_length", "run.compile_mode=default"],
    "multiple-64": ["data.pad_to_multiple_of=64"],  # 4 lengths up to 256: auto -> reduce-overhead, a graph each
}


def build_model(folder: Path, quick: bool) -> Path:
    """SmolLM2-135M's shape (a tiny one for --quick) with seeded random bf16 weights and a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["[UNK]", "[PAD]", "[EOS]", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256) if quick else dict(
                 hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152)  # fmt: skip
    config = LlamaConfig(**shape, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=2,
                         eos_token_id=2, pad_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def write_data(path: Path, rows: int, longest: int) -> Path:
    """Sentences of 8 to `longest` words (random lengths: batches padded to their longest vary in length)."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, longest))) for _ in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_variant(name: str, folder: Path, model: Path, data: Path, args: argparse.Namespace) -> dict:
    from lorakit.train import load_config, train

    config = folder / "config.toml"
    config.write_text(f"""
task = "causal-lm"
[model]
source = "{model}"
[data]
path = "{data}"
max_length = {args.max_length}
eval_samples = 32
[lora]
r = 16
lora_alpha = 32
target_modules = "all-linear"
[optim]
lr = 0.001
batch_size = {args.batch}
max_steps = {args.steps}
[run]
out_dir = "{folder / name}"
progress = "none"
log_every = 1
eval_every = {args.steps}
tensorboard = false
plots = false
""")
    torch.compiler.reset()
    started = time.perf_counter()
    result = train(load_config(config, VARIANTS[name]))
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (Path(result.folder) / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    rates = [r["examples_per_s"] for r in train_records[len(train_records) // 3 :]]
    return {
        "step_ms": 1000 * result.step_seconds,
        "steady_ms": 1000 * args.batch / statistics.median(rates),
        "cuda_graphs": result.cuda_graphs,
        "compiled": result.compiled,
        "peak_gib": result.peak_memory_bytes / 2**30,
        "final_loss": train_records[-1]["loss"],
        "wall_s": wall,
    }


def environment() -> dict:
    import transformers

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    return {"device": name, "versions": versions, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="a tiny model, a few steps (CPU: a smoke run)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.batch, args.max_length = 6, 4, 32
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_model(root / "model", args.quick)
        data = write_data(root / "lines.txt", 32 + args.steps * args.batch, args.max_length - 2)
        for name in args.variants.split(","):
            results[name] = run_variant(name, root, model, data, args)
            print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in results[name].items()}, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({**environment(), "args": vars(args), "results": results}, indent=2))
    print(f"{'variant':<26}{'step ms':>9}{'steady ms':>11}{'graphs':>8}{'peak GiB':>10}")
    for name, r in results.items():
        print(f"{name:<26}{r['step_ms']:>9.1f}{r['steady_ms']:>11.1f}{str(r['cuda_graphs']):>8}{r['peak_gib']:>10.2f}")


if __name__ == "__main__":
    main()
