"""--resume: an interrupted run continued from its checkpoint reaches the same losses as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_helpers import sentiment_csv, seq_cls_config, tiny_bert, tiny_gpt2, write_config

from lorakit.errors import ConfigError
from lorakit.train import load_config, train

ROOT = Path(__file__).resolve().parents[1]


class Interrupted(Exception):
    """Stands for a kill: raised from inside the loop, after the checkpoint at step 4 and before step 8."""


def _losses(folder: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def _interrupt_at(step: int):
    def on_step(done: int) -> None:
        if done == step:
            raise Interrupted

    return on_step


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_bert(tmp_path_factory.mktemp("bert")), sentiment_csv(tmp_path_factory.mktemp("d") / "s.csv")


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_resume_continues_to_the_same_losses(tmp_path: Path, inputs: tuple[Path, Path], grad_accum: int) -> None:
    """8 steps straight vs 6 steps + interruption (last checkpoint at 4) + resume: dropout on, shuffled data."""
    bert, data = inputs
    straight = train(load_config(seq_cls_config(_mk(tmp_path / "a"), bert, data), [f"optim.grad_accum={grad_accum}"]))
    config = load_config(seq_cls_config(_mk(tmp_path / "b"), bert, data), [f"optim.grad_accum={grad_accum}"])
    with pytest.raises(Interrupted):
        train(config, on_step=_interrupt_at(6))
    run = Path(config.run.out_dir)
    assert not (run / "adapter").exists()  # nothing final is written by an interrupted run
    resumed = train(load_config(run / "config.toml"), resume=run)
    expected, got = _losses(Path(straight.folder)), _losses(run)
    assert sorted(got) == list(range(1, 9))  # steps 5-6 of the interrupted run were replaced, not duplicated
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert resumed.after == pytest.approx(straight.after, rel=1e-6)


def test_lorafa_runs_resume_to_the_same_losses_and_keep_a_frozen(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    """optim.name = LoraFA: its state (B's moments, step counts) goes through the checkpoint like AdamW's."""
    bert, data = inputs
    lorafa = ["optim.name=LoraFA", "optim.weight_decay=0.01"]
    straight = train(load_config(seq_cls_config(_mk(tmp_path / "a"), bert, data), lorafa))
    adamw = train(load_config(seq_cls_config(_mk(tmp_path / "w"), bert, data)))
    config = load_config(seq_cls_config(_mk(tmp_path / "b"), bert, data), lorafa)
    with pytest.raises(Interrupted):
        train(config, on_step=_interrupt_at(6))
    run = Path(config.run.out_dir)
    train(load_config(run / "config.toml"), resume=run)
    expected = _losses(Path(straight.folder))
    assert _losses(run) == pytest.approx(expected, rel=1e-6, abs=1e-7)
    a_of = {}
    for folder in (Path(straight.folder), Path(adamw.folder)):
        tensors = load_file(folder / "adapter" / "adapter_model.safetensors")
        a_of[folder] = {k: v for k, v in tensors.items() if ".lora_A." in k}
    first_a = _initial_a(load_config(seq_cls_config(_mk(tmp_path / "c"), bert, data), lorafa))
    assert a_of[Path(straight.folder)].keys() == first_a.keys()
    for key, tensor in first_a.items():
        assert torch.equal(a_of[Path(straight.folder)][key], tensor), key  # LoRA-FA: A as initialised
        assert not torch.equal(a_of[Path(adamw.folder)][key], tensor), key  # AdamW: A trained


def _initial_a(config) -> dict[str, torch.Tensor]:
    """The run's A before its first step, built as the loop builds it (the seed alone fixes the init)."""
    from lorakit import LoraModel, get_peft_model_state_dict
    from lorakit.multi.parallel import add_seeded_adapter
    from lorakit.train import tasks

    model = LoraModel(tasks.build_model(config, tasks.prepare(config)))
    add_seeded_adapter(model, "default", config.lora_config(), config.seed)
    return {k: v for k, v in get_peft_model_state_dict(model).items() if ".lora_A." in k}


def test_resume_after_a_real_kill(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    """The run is SIGKILLed in a child process at step 6 (no exception handler, no cleanup runs), then resumed."""
    bert, data = inputs
    straight = train(load_config(seq_cls_config(_mk(tmp_path / "a"), bert, data)))
    config_file = seq_cls_config(_mk(tmp_path / "b"), bert, data)
    kill_at_6 = (
        "import os, signal, sys; from lorakit.train import load_config, train; "
        "train(load_config(sys.argv[1]), on_step=lambda done: done == 6 and os.kill(os.getpid(), signal.SIGKILL))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-c", kill_at_6, str(config_file)], env=env, timeout=240)
    assert child.returncode == -signal.SIGKILL
    run = Path(load_config(config_file).run.out_dir)
    assert not (run / "adapter").exists() and not list(run.rglob("*.tmp"))
    train(load_config(run / "config.toml"), resume=run)
    assert _losses(run) == pytest.approx(_losses(Path(straight.folder)), rel=1e-6, abs=1e-7)


def test_resume_with_a_different_config_is_refused(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    bert, data = inputs
    config = load_config(seq_cls_config(tmp_path, bert, data))
    with pytest.raises(Interrupted):
        train(config, on_step=_interrupt_at(5))
    run = Path(config.run.out_dir)
    before = sorted(p.name for p in run.iterdir())
    changed = load_config(run / "config.toml", ["optim.lr=0.5"])
    with pytest.raises(ConfigError, match=r"cannot resume .* different config \(optim.lr: 0.01 -> 0.5\)"):
        train(changed, resume=run)
    assert sorted(p.name for p in run.iterdir()) == before
    shown_only = load_config(run / "config.toml", ["run.progress=tqdm"])  # display settings may change
    assert train(shown_only, resume=run).steps == 8


def test_resume_without_a_checkpoint_or_run_folder(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    bert, data = inputs
    config = load_config(seq_cls_config(tmp_path, bert, data))
    with pytest.raises(ConfigError, match="is not a run folder"):
        train(config, resume=tmp_path / "nothing")


def _mk(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_resuming_a_finished_run_is_a_no_op_that_says_so(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    bert, data = inputs
    first = train(load_config(seq_cls_config(tmp_path, bert, data)))
    run = Path(first.folder)
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    again = train(load_config(run / "config.toml"), resume=run)
    assert again.already_finished and not first.already_finished
    assert again.after == first.after and again.steps == 8
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files  # metrics.jsonl not appended to


def test_a_kill_after_the_last_checkpoint_resumes_without_a_second_final_eval(
    tmp_path: Path, inputs: tuple[Path, Path]
) -> None:
    """Killed after the final checkpoint and eval but before summary.json: resume finishes, the final eval once."""
    bert, data = inputs
    straight = train(load_config(seq_cls_config(_mk(tmp_path / "a"), bert, data)))
    config = load_config(seq_cls_config(_mk(tmp_path / "b"), bert, data))
    run = Path(config.run.out_dir)
    with pytest.raises(Interrupted):
        train(config, on_step=_interrupt_at(8))  # after step 8's checkpoint, before the final eval
    with (run / "metrics.jsonl").open("a") as f:  # as if the final eval had been written before the kill
        f.write(json.dumps({"kind": "eval", "step": 8, "time": 0.0, "loss": 1.0, "accuracy": 0.5}) + "\n")
    resumed = train(load_config(run / "config.toml"), resume=run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 4, 8]
    assert resumed.after == pytest.approx(straight.after, rel=1e-6)


def test_resume_of_a_causal_lm_with_tied_embeddings(tmp_path: Path) -> None:
    """GPT-2 ties lm_head to wte: trained with the embedding (LoRA on wte, the head saved in full), the
    checkpoint holds the tied weight once and resume reproduces the uninterrupted losses."""
    model = tiny_gpt2(tmp_path / "gpt2")
    (tmp_path / "lines.txt").write_text("the cat sat on the mat\n" * 30 + "a dog ran in the park\n" * 30)
    runs = []
    for name in ("a", "b"):
        body = f"""
            task = "causal-lm"
            [model]
            source = "{model}"
            [data]
            path = "{tmp_path / "lines.txt"}"
            [lora]
            target_modules = ["c_attn", "wte"]
            lora_dropout = 0.1
            [optim]
            lr = 0.02
            batch_size = 8
            max_steps = 6
            [run]
            out_dir = "{tmp_path / name}"
            progress = "none"
            log_every = 1
            checkpoint_every = 2
            tensorboard = false
            plots = false
        """
        runs.append(write_config(tmp_path / f"{name}.toml", body))
    train(load_config(runs[0]))
    with pytest.raises(Interrupted):
        train(load_config(runs[1]), on_step=_interrupt_at(5))
    resumed = train(load_config(tmp_path / "b" / "config.toml"), resume=tmp_path / "b")
    assert resumed.steps == 6
    assert _losses(tmp_path / "b") == pytest.approx(_losses(tmp_path / "a"), rel=1e-6, abs=1e-7)
