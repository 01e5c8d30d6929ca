"""Real `lorakit serve` processes on 127.0.0.1 (free ports), over the tiny model of tiny.py, for the serve tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit import LoraModel
from lorakit.multi.tree import load_tree
from tests.serve.tiny import write_tiny

ADAPTERS = ["a1", "a2", "a3", "a4"]
API_KEY = "sk-test-key"


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def stop(self) -> int:
        """SIGTERM, as a service manager stops it; the exit code of a graceful shutdown."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], log: Path) -> Server:
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("LORAKIT_API_KEY", None)
    with log.open("w") as out:
        cmd = [sys.executable, "-m", "lorakit", "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    return Server(f"http://127.0.0.1:{port}", process, log)


def wait_ready(server: Server, timeout: float = 120.0) -> Server:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log.read_text()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1.0).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.process.kill()
    raise RuntimeError(f"server did not start in {timeout} s:\n{server.log.read_text()}")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_tiny(tmp_path_factory.mktemp("tiny"), ADAPTERS, tree=True)


@pytest.fixture(scope="session")
def servers(tiny: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    """Both servers start together (start-up is mostly imports): `main` for behaviour, `limited` for the API key
    and the capacity limits."""
    model_dir, root = tiny
    logs = tmp_path_factory.mktemp("logs")
    common = [str(model_dir), "--adapter-root", str(root)]
    started = {
        "main": launch([*common, "--max-concurrent", "8", "--max-queue", "32"], logs / "main.log"),
        "limited": launch(
            [*common, "--api-key", API_KEY, "--max-concurrent", "1", "--max-queue", "1"], logs / "limited.log"
        ),
    }
    try:
        yield {name: wait_ready(server) for name, server in started.items()}
    finally:
        for server in started.values():
            if server.process.poll() is None:
                server.process.kill()


class Reference:
    """The library's own generate, in this process, for what the server must reproduce."""

    def __init__(self, model_dir: Path, root: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = LoraModel(AutoModelForCausalLM.from_pretrained(model_dir).eval())
        for name in ADAPTERS:
            self.model.load_adapter(root / name, name)
        load_tree(self.model, root / "tree")
        self._memo: dict[tuple, tuple[str, int]] = {}

    def chat_ids(self, content: str) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def greedy(self, adapter: str | None, ids: list[int], max_tokens: int) -> tuple[str, int]:
        """(text, completion tokens) of generate with `adapter` (None: the base; a tree node: its path) alone."""
        key = (adapter, tuple(ids), max_tokens)
        if key not in self._memo:
            x = torch.tensor([ids])
            with torch.inference_mode():
                if adapter is None:
                    with self.model.disable_adapter():
                        out = self.model.generate(input_ids=x, max_new_tokens=max_tokens, do_sample=False)
                else:
                    self.model.set_adapter(adapter)
                    out = self.model.generate(input_ids=x, max_new_tokens=max_tokens, do_sample=False)
            new = out[0, x.shape[1] :]
            self._memo[key] = (self.tokenizer.decode(new, skip_special_tokens=True), len(new))
        return self._memo[key]

    def greedy_logprobs(self, adapter: str, ids: list[int], max_tokens: int) -> tuple[list[int], torch.Tensor]:
        """(greedy tokens, log_softmax of the float32 logits at each of their steps [n, vocab]) with `adapter`."""
        self.model.set_adapter(adapter)
        x = torch.tensor([ids])
        with torch.inference_mode():
            kw = {"output_logits": True, "return_dict_in_generate": True}
            out = self.model.generate(input_ids=x, max_new_tokens=max_tokens, do_sample=False, **kw)
        generated = out.sequences[0, x.shape[1] :].tolist()
        return generated, torch.log_softmax(torch.cat(out.logits).float(), dim=-1)

    def prompt_logprobs(self, adapter: str, ids: list[int]) -> list[float]:
        """log p(token i | tokens before it) for i >= 1, from one forward of the prompt with `adapter`."""
        self.model.set_adapter(adapter)
        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids])).logits[0, :-1]
        return torch.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


@pytest.fixture(scope="session")
def reference(tiny: tuple[Path, Path]) -> Reference:
    return Reference(*tiny)
