"""Beyond the single-process loop: DDP through torchrun (gloo on CPU), a LoraModel inside transformers.Trainer,
and the real default run (pretrained MiniLM on the packaged tweet corpus) on a few samples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_helpers import sentiment_csv, seq_cls_config, tiny_bert

from lorakit import LoraConfig, LoraModel, get_lora_model
from lorakit.train import evaluate, load_config, tasks, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_bert(tmp_path_factory.mktemp("bert")), sentiment_csv(tmp_path_factory.mktemp("d") / "s.csv")


def _cpu_env() -> dict[str, str]:
    """Two ranks on the CPU over gloo, also on a machine with GPUs (which would give rank 1 a second one)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
            "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip


def _torchrun(tmp_path: Path, config: Path, out: Path, port: int, *overrides: str) -> subprocess.CompletedProcess:
    env = _cpu_env()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               "-m", "lorakit", "train", str(config), f"--run.out_dir={out}", "--optim.max_steps=0",
               "--optim.epochs=1", *overrides]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _train_losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory, inputs: tuple[Path, Path]) -> tuple[Path, str]:
    bert, data = inputs
    tmp_path = tmp_path_factory.mktemp("ddp")
    config = seq_cls_config(tmp_path, bert, data, checkpoint_every="2")
    done = _torchrun(tmp_path, config, tmp_path / "run", 29531)
    return tmp_path / "run", done.stdout


def test_ddp_two_ranks_on_gloo_shard_the_data_and_save_one_adapter(ddp_run: tuple[Path, str]) -> None:
    out, stdout = ddp_run
    summary = json.loads((out / "summary.json").read_text())
    # 96 training rows, batch 8: one process takes 12 steps per epoch; two ranks with 48 rows each take 6
    assert summary["steps"] == 6
    assert sorted(_train_losses(out)) == [1, 2, 3, 4, 5, 6]  # rank 0 alone writes
    assert sorted(p.name for p in (out / "adapter").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert {p.name for p in (out / "checkpoint").iterdir()} == {"state.safetensors"}  # one atomic file
    state = load_file(out / "checkpoint" / "state.safetensors")
    assert not torch.equal(state["rng.0.torch"], state["rng.1.torch"])  # each rank's own dropout stream
    assert stdout.count("Done.") == 2  # every rank returns the same report; both printed it
    # the adapter rank 0 wrote is the model both ranks trained: reloaded, it scores what the run reported
    config = load_config(out / "config.toml")
    prepared = tasks.prepare(config)
    reloaded = LoraModel.from_pretrained(tasks.build_model(config, prepared), out / "adapter")
    assert evaluate(reloaded, prepared, config) == pytest.approx(summary["after"], rel=1e-5)


def test_fsdp2_shards_the_model_and_trains_as_ddp_does(
    tmp_path: Path, inputs: tuple[Path, Path], ddp_run: tuple[Path, str]
) -> None:
    """The same run with the model sharded over the two ranks: the same losses, the same adapter, one file."""
    bert, data = inputs
    config = seq_cls_config(tmp_path, bert, data, checkpoint_every="2")
    _torchrun(tmp_path, config, tmp_path / "fsdp", 29533, "--run.distributed=fsdp")
    ddp_out, fsdp_out = ddp_run[0], tmp_path / "fsdp"
    assert _train_losses(fsdp_out) == pytest.approx(_train_losses(ddp_out), rel=1e-5)
    fsdp_adapter = load_file(fsdp_out / "adapter" / "adapter_model.safetensors")
    ddp_adapter = load_file(ddp_out / "adapter" / "adapter_model.safetensors")
    assert fsdp_adapter.keys() == ddp_adapter.keys()
    for key, value in ddp_adapter.items():  # whole tensors, not one rank's shard
        torch.testing.assert_close(fsdp_adapter[key], value, rtol=1e-4, atol=1e-6)
    fsdp_state = load_file(fsdp_out / "checkpoint" / "state.safetensors")
    ddp_state = load_file(ddp_out / "checkpoint" / "state.safetensors")
    assert {k: v.shape for k, v in fsdp_state.items()} == {k: v.shape for k, v in ddp_state.items()}


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_a_finished_run_has_joined_its_process_group_s_threads_when_train_returns(
    tmp_path: Path, inputs: tuple[Path, Path], mode: str
) -> None:
    """A gloo worker still alive when the interpreter shuts down aborts a rank whose run succeeded (SIGABRT, as it
    takes the GIL to free a finished collective's tensors). Under FSDP2 the model's modules and the device mesh keep
    the group, and so its workers, alive past destroy_process_group; train() must leave none of them running."""
    bert, data = inputs
    config = seq_cls_config(tmp_path, bert, data)
    env = _cpu_env()
    port = {"fsdp": 29535, "ddp": 29536}[mode]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               str(ROOT / "tests" / "torchrun_threads.py"), str(config), str(tmp_path / "run"), mode]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank in (0, 1):
        seen = json.loads((tmp_path / "run" / f"threads.{rank}.json").read_text())
        assert "pt_gloo_runloop" in seen["during"]  # the group's workers, as torch names them
        assert not [name for name in seen["after"] if name.startswith(("pt_gloo", "gloo"))], seen["after"]


def test_ddp_scores_a_causal_lm_through_the_chunked_head_to_the_same_losses(tmp_path: Path) -> None:
    """Under ddp every rank calls the model itself, so the chunked head loss runs there too, and two ranks get the
    losses of the full-logits loss: the split decoder and head take the same averaged steps."""
    from test_train_helpers import causal_lm_config, tiny_gpt2

    model = tiny_gpt2(tmp_path / "gpt2")
    (tmp_path / "lines.txt").write_text("the cat sat on the mat\nand a dog ran in the park today\n" * 16)
    losses = {}
    for port, mode in ((29541, "on"), (29542, "off")):
        config = causal_lm_config(tmp_path / f"{mode}.toml", model, tmp_path / "lines.txt", fused_head_loss=f'"{mode}"')
        out = tmp_path / f"run_{mode}"
        _torchrun(tmp_path, config, out, port)
        assert json.loads((out / "summary.json").read_text())["fused_head_loss"] == (mode == "on")
        losses[mode] = _train_losses(out)
    assert sorted(losses["on"]) == sorted(losses["off"]) and len(losses["on"]) >= 2
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-5)
    assert losses["on"][1] != pytest.approx(losses["on"][len(losses["on"])], rel=1e-3)  # it trained


def _average_on_rank(rank: int, port: int, results: dict) -> None:
    """Rank `rank` of two (gloo): unequal starting weights, then gradients that differ by rank, one of them on rank 1
    only, one on no rank; what parallel.wrap and parallel.average_gradients leave."""
    import torch.distributed as dist

    from lorakit.train import parallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)  # unequal copies: wrap must make them rank 0's
        model = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 2), "b": torch.nn.Linear(2, 2).double(),
                                     "c": torch.nn.Linear(2, 1), "frozen": torch.nn.Linear(2, 2)})  # fmt: skip
        model["frozen"].requires_grad_(False)
        model.register_buffer("count", torch.tensor([float(rank + 5)]))
        wrapped = parallel.wrap(model, "ddp", 2, torch.device("cpu"))
        for p in (*model["a"].parameters(), *model["b"].parameters()):
            p.grad = torch.full_like(p, float(rank + 1)) * torch.arange(p.numel(), dtype=p.dtype).view_as(p)
        if rank == 1:
            model["a"].bias.grad = None  # on rank 0 only
        parallel.average_gradients(wrapped, 2)
        results[rank] = {
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        }
    finally:
        dist.destroy_process_group()


def test_ddp_averages_every_gradient_in_one_reduction_and_starts_from_rank_0(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_average_on_rank, args=(port, results), nprocs=2, join=True)
    first, second = results[0], results[1]
    for key, value in first["state"].items():  # rank 1 took rank 0's weights and buffers
        assert torch.equal(second["state"][key], value), key
    assert first["state"]["count"].item() == 5.0
    for name, grad in first["grads"].items():
        other = second["grads"][name]
        if name.startswith(("c.", "frozen.")):  # no rank had one: the optimizer skips it, as in one process
            assert grad is None and other is None
            continue
        assert torch.equal(grad, other), name  # the ranks' gradients are equal after averaging
        steps = torch.arange(grad.numel(), dtype=torch.float64).view_as(grad)
        mean = steps * (0.5 if name == "a.bias" else 1.5)  # (1 + 2) / 2, or (1 + 0) / 2 where rank 1 had none
        torch.testing.assert_close(grad.double(), mean, rtol=0, atol=0)
        assert grad.dtype == (torch.float64 if name.startswith("b.") else torch.float32)


def _sharded_inference_on_rank(rank: int, port: int, results: dict) -> None:
    """Rank `rank` of two (gloo): a tiny Llama with two adapters, its outputs in one process, then sharded by FSDP2
    with packing and gathered tables allowed on the CPU: an unrouted and a routed inference call, twice each."""
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit.layer
    from lorakit import packed
    from lorakit.train import parallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        packed.PACK_DEVICES, lorakit.layer.GATHER_DEVICES = ("cuda", "cpu"), ("cuda", "cpu")
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
        model = get_lora_model(LlamaForCausalLM(config).eval(), LoraConfig(r=4, init_lora_weights=False), "a")
        model.add_adapter("b", LoraConfig(r=2, init_lora_weights=False))
        ids, names = torch.randint(0, 64, (4, 5)), ["a", "b", "__base__", "b"]
        with torch.no_grad():
            expected = (model(input_ids=ids).logits, model(input_ids=ids, adapter_names=names).logits)
        parallel.wrap(model, "fsdp", 2, torch.device("cpu"))
        model.state.pack_wanted = True  # as after a compiled step: the next unrouted call packs where it may
        got = []
        with torch.no_grad():
            for _ in range(2):  # the second call after FSDP left the root's parameters gathered
                got.append((model(input_ids=ids).logits, model(input_ids=ids, adapter_names=names).logits))
        results[rank] = {"expected": expected, "got": got, "packed": dict(packed.BUFFERS)}
    finally:
        dist.destroy_process_group()


def test_a_sharded_model_infers_as_one_process_does_without_packing_its_shards(tmp_path: Path) -> None:
    """FSDP2's factors are DTensors between forwards, their storage one rank's shard: the one-buffer pack (which
    moved them with copy_) and the gathered tables (which read their addresses) must leave them alone."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_sharded_inference_on_rank, args=(port, results), nprocs=2, join=True)
    for rank in (0, 1):
        expected, got = results[rank]["expected"], results[rank]["got"]
        assert results[rank]["packed"] == {}
        for unrouted, routed in got:
            torch.testing.assert_close(unrouted, expected[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(routed, expected[1], rtol=1e-5, atol=1e-6)


def test_lora_model_trains_inside_transformers_trainer(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    bert, _ = inputs
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(bert, num_labels=2)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = get_lora_model(base, config)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    tokenizer = AutoTokenizer.from_pretrained(bert)
    texts = ["good", "great fun", "loved it", "bad", "awful", "hated it"] * 8
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    # a "text" column the model does not take: Trainer drops it by reading the forward signature (a string left in
    # would break the collator), as it does for a PEFT model
    rows = [{"input_ids": encoded["input_ids"][i], "attention_mask": encoded["attention_mask"][i], "text": texts[i],
             "labels": torch.tensor(int(i % 6 < 3))} for i in range(len(texts))]  # fmt: skip
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=15, per_device_train_batch_size=8,
                             learning_rate=2e-2, logging_steps=5, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    history = trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert losses[-1] < losses[0] and history.global_step == 15
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    model.save_pretrained(tmp_path / "adapter")
    trainer.save_model(str(tmp_path / "full"))  # Trainer's own save of a non-PreTrainedModel also works
    fresh = AutoModelForSequenceClassification.from_pretrained(bert, num_labels=2)
    reloaded = LoraModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    batch = {k: v[:6] for k, v in encoded.items()}
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, model.eval()(**batch).logits, atol=1e-5)


def test_the_default_run_on_the_real_minilm_and_tweets(tmp_path: Path) -> None:
    """The no-argument run's config, shortened: real weights, real packaged data, offline."""
    overrides = ["data.max_samples=96", "data.eval_samples=64", "optim.max_steps=6", "optim.batch_size=16",
                 f"run.out_dir={tmp_path / 'run'}", "run.progress=none", "run.eval_every=100"]  # fmt: skip
    result = train(load_config(None, overrides))
    assert result.trainable_params == 74_498 and result.total_params == 22_788_484  # PEFT's count (the head twice)
    assert result.model_bytes > 80 * 2**20 and result.adapter_bytes < 400 * 2**10
    assert result.after["loss"] < result.before["loss"]
