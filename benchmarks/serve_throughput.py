"""`lorakit serve` throughput and latency: concurrent clients over 8 adapters, against one client at a time and
against every request on one adapter (what mixing adapters in one batch costs).

A real server process (python -m lorakit serve) on 127.0.0.1, spoken to over HTTP by asyncio clients. The model is
Llama-shaped with seeded random weights (4 layers, hidden 256, like benchmarks/train_step_cpu.py, and a 1,000-token
byte-level BPE vocabulary so the CPU time goes to the layers), with 8 random rank-16 adapters on every linear layer.
Each request: a ~20-token prompt, 32 new tokens, greedy; the end token's logit is zeroed so every request runs its
32 tokens and the rows compare like for like.

    python benchmarks/serve_throughput.py                      # 64 requests per setting, clients 1, 8 and 32,
                                                               # 2 rounds each, the best round in the table
    python benchmarks/serve_throughput.py --requests 128 --clients 1 8 32 64
    # on a GPU (bf16 weights and factors), SmolLM2-135M's shape (30 layers, hidden 576):
    python benchmarks/serve_throughput.py --device cuda --hidden 576 --layers 30 --requests 32 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lorakit import LoraConfig, get_lora_model

ADAPTERS = [f"style{i}" for i in range(8)]
WORDS = "the quick brown fox jumps over the lazy dog while many adapters share one base model on a small machine"


def build(folder: Path, hidden: int, layers: int) -> tuple[Path, Path]:
    """(model folder with tokenizer, adapter root with the 8 adapters)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([WORDS] * 50, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")

    def model() -> LlamaForCausalLM:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 43 // 16,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
        m = LlamaForCausalLM(config).eval()
        with torch.no_grad():
            m.lm_head.weight[tokenizer.eos_token_id] = 0.0
        return m

    model_dir, root = folder / "model", folder / "adapters"
    model().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    for i, name in enumerate(ADAPTERS):
        lora = get_lora_model(model(), LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"), name)
        torch.manual_seed(i)
        with torch.no_grad():
            for pname, p in lora.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0.0, 0.02)
        lora.save_pretrained(root, selected_adapters=[name])
    return model_dir, root


def start_server(
    model_dir: Path, root: Path, max_concurrent: int, threads: int, log: Path, device: str = "cpu", dtype: str = "auto"
) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lorakit", "serve", str(model_dir), "--adapter-root", str(root), "--port", str(port),
           "--max-concurrent", str(max_concurrent), "--max-queue", "1024", "--threads", str(threads),
           "--device", device, "--dtype", dtype]  # fmt: skip
    process = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(f"the server did not start: {log.read_text()}")


async def run_setting(url: str, clients: int, requests: int, adapters: list[str], max_tokens: int) -> dict:
    """`clients` workers share a queue of `requests` requests (request i on adapters[i % len])."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    latencies: list[float] = []
    tokens = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            i = queue.get_nowait()
            body = {"model": adapters[i % len(adapters)], "prompt": f"{WORDS} {i}", "max_tokens": max_tokens,
                    "temperature": 0}  # fmt: skip
            start = time.perf_counter()
            r = await client.post(f"{url}/v1/completions", json=body)
            latencies.append(time.perf_counter() - start)
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        wall = time.perf_counter() - start
    latencies.sort()
    return {
        "clients": clients, "adapters": len(set(adapters)), "requests": requests, "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1), "p50_s": round(statistics.median(latencies), 3),
        "p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
    }  # fmt: skip


def best(runs: list[dict], clients: int, adapters: int) -> dict:
    """The round with the highest throughput for one setting: the one least disturbed by other work."""
    return max(
        (r for r in runs if r["clients"] == clients and r["adapters"] == adapters), key=lambda r: r["tokens_per_s"]
    )


def table(rows: list[dict]) -> str:
    fewest = min(r["clients"] for r in rows)  # one at a time when --clients includes 1
    base = next(r for r in rows if r["clients"] == fewest and r["adapters"] == 8)["tokens_per_s"]
    single = {r["clients"]: r["tokens_per_s"] for r in rows if r["adapters"] == 1}
    lines = ["| clients | adapters | tokens/s | vs one at a time | mixed / one adapter | p50 latency | p99 latency |",
             "|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        mix = f"{r['tokens_per_s'] / single[r['clients']]:.2f}" if r["adapters"] == 8 and r["clients"] in single else ""
        lines.append(f"| {r['clients']} | {r['adapters']} | {r['tokens_per_s']} | {r['tokens_per_s'] / base:.2f}x "
                     f"| {mix} | {r['p50_s']:.2f} s | {r['p99_s']:.2f} s |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    parser.add_argument("--rounds", type=int, default=2, help="runs per setting; the table shows the best")
    parser.add_argument("--device", default="cpu", help="the server's --device (cuda: the GPU)")
    parser.add_argument("--dtype", default="auto", help="the server's --dtype (auto: bfloat16 on a GPU)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    kind = "cpu" if args.device == "cpu" else "gpu"
    args.out = args.out or Path("benchmarks/results") / f"serve_throughput_{kind}_{time.strftime('%Y-%m-%d')}.json"
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, root = build(Path(tmp), args.hidden, args.layers)
        log = Path(tmp) / "server.log"
        process, url = start_server(model_dir, root, max(args.clients), args.threads, log, args.device, args.dtype)
        try:
            asyncio.run(run_setting(url, 8, 16, ADAPTERS, 4))  # warm-up
            runs = []
            for clients in args.clients:
                for _ in range(args.rounds):  # mixed and single alternate, so a burst of load hits both alike
                    for adapters in (ADAPTERS, ADAPTERS[:1]):
                        runs.append(asyncio.run(run_setting(url, clients, args.requests, adapters, args.max_tokens)))
                        print(runs[-1], flush=True)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
            print(log.read_text()[-2000:], file=sys.stderr)
    rows = [best(runs, c, a) for c in args.clients for a in (len(ADAPTERS), 1)]
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end"
    if kind == "gpu":
        machine = f"{torch.cuda.get_device_name()}, {args.dtype} weights; {machine}"
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine, "torch": torch.__version__,
        "command": "python " + " ".join(sys.argv), "threads": args.threads,
        "model": f"Llama {args.layers} layers, hidden {args.hidden}", "device": args.device,
        "rows": rows, "all_rounds": runs,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
