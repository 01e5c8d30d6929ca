"""run.compile_mode: torch.compile's modes for the compiled blocks, and what the loop does so that CUDA graph replays
never write over a tensor it still holds (the replays themselves run in tests/gpu)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.train import load_config, parallel, train
from lorakit.train.loop import TrainingInterrupted
from tests.gpu.models import BlockMLP, block_mlp_run


def _replayed_gradients(model: nn.Module, *args) -> parallel.Compiled:
    """A stand-in for compile_blocks with CUDA graphs, on the CPU: every trainable parameter gets its gradient in one
    buffer that each backward writes over, as a backward replayed from a CUDA graph hands it out (a fresh tensor
    over the graph's memory, which autograd keeps as the .grad of a parameter that had none)."""
    for p in model.parameters():
        if p.requires_grad:
            buffer = torch.empty_like(p)
            p.register_hook(lambda grad, buffer=buffer: buffer.copy_(grad).view_as(buffer))
    return parallel.Compiled(True, graphs=True)


def _config(tmp_path: Path, *overrides: str):
    """block_mlp over 96 rows, batch 8, three micro-batches a step, 4 steps; `overrides` as on the command line."""
    return load_config(block_mlp_run(tmp_path, rows=96, batch_size=8, max_steps=4, grad_accum=3), list(overrides))


def _losses(folder: str) -> list[float]:
    records = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def test_gradients_left_in_replayed_memory_are_copied_before_the_next_micro_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the blocks under CUDA graphs (stood in for here), each step's first backward leaves the adapters'
    gradients in memory the next backward writes over; the loop copies them, so three micro-batches a step train
    as the same model with plain gradients does. Without the copy the second micro-batch's gradient counts twice
    and the first's not at all."""
    (tmp_path / "plain").mkdir()
    (tmp_path / "replayed").mkdir()
    reference = train(_config(tmp_path / "plain", f"run.out_dir={tmp_path / 'a'}"))
    marks, resets = [], []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    monkeypatch.setattr(torch.compiler, "reset", lambda: resets.append(1))
    monkeypatch.setattr(parallel, "compile_blocks", _replayed_gradients)
    replayed = train(_config(tmp_path / "replayed", f"run.out_dir={tmp_path / 'b'}"))
    assert len(marks) >= 4 * 3  # every micro-batch (and eval batch) starts a new step for the graphs
    assert len(resets) == 1  # the graphs and their memory are let go when the run ends
    assert _losses(replayed.folder) == pytest.approx(_losses(reference.folder), rel=1e-6)
    assert replayed.after["accuracy"] == pytest.approx(reference.after["accuracy"])


def test_graph_safe_gradients_copies_only_the_gradients_that_were_missing() -> None:
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    held = torch.full((2,), 5.0)
    b.grad = held
    buffer = torch.arange(3.0)
    a.grad = buffer.view_as(buffer)  # as a backward replayed from a graph hands it out
    parallel.graph_safe_gradients([a, b], [True, False])
    assert b.grad is held  # owned already: added to in place by autograd, left alone
    assert a.grad.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr()
    buffer.fill_(-1)
    assert a.grad.tolist() == [0.0, 1.0, 2.0]


def test_auto_compile_hands_the_modes_inductor_options_to_the_backend() -> None:
    """Under run.compile = auto each block compiles through a wrapper (a failing block runs eagerly); the mode's
    options must still reach the backend, and only a mode with CUDA graphs on a GPU asks the loop for their care."""
    seen: list[dict] = []

    def recording(graph, example_inputs, **kwargs):
        seen.append(kwargs)
        return graph.forward

    torch._dynamo.reset()
    torch._dynamo.register_backend(recording, name="lorakit_test_recording")
    model = BlockMLP()
    state = parallel.compile_blocks(model, "auto", "lorakit_test_recording", torch.device("cuda"), "reduce-overhead")
    model(torch.randn(4, 32))
    assert state.graphs and bool(state)
    assert seen and all(kw == {"config_patches": {"triton.cudagraphs": True}} for kw in seen)

    torch._dynamo.reset()
    seen.clear()
    model = BlockMLP()
    state = parallel.compile_blocks(model, "auto", "lorakit_test_recording", torch.device("cuda"), "default")
    model(torch.randn(4, 32))
    assert not state.graphs and seen and all(kw == {} for kw in seen)
    cpu = parallel.compile_blocks(BlockMLP(), "on", "lorakit_test_recording", torch.device("cpu"), "reduce-overhead")
    assert not cpu.graphs  # no CUDA graphs on a CPU
    torch._dynamo.reset()


def test_compile_mode_is_checked_against_its_choices_and_the_backend(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"run.compile_mode must be one of \['auto', 'default', 'reduce-overhead'"):
        _config(tmp_path, "run.compile_mode=fast")
    with pytest.raises(ConfigError, match="mode of the inductor backend.*run.compile_backend = 'inductor'"):
        _config(tmp_path, "run.compile_mode=reduce-overhead",
                "run.compile_backend=aot_eager")  # fmt: skip
    with pytest.raises(ConfigError, match="run.compile = 'off' compiles nothing.*'auto' or 'on'"):
        _config(tmp_path, "run.compile_mode=max-autotune", "run.compile=off")
    assert _config(tmp_path, "run.compile_mode=reduce-overhead").run.compile == "auto"
    assert _config(tmp_path, "run.compile=off").run.compile_mode == "auto"  # no error


def test_cuda_graphs_refuse_what_a_recording_cannot_follow_and_warn_on_varying_shapes(tmp_path: Path) -> None:
    """On a GPU: gradient checkpointing (the backward recomputes the blocks) and FSDP2 (gathers around every block)
    are refused with the fix named; text padded to each batch's longest records graphs again for every length."""
    from lorakit.train import loop

    gpu, two_gpus = loop._Env(0, 1, torch.device("cuda")), loop._Env(0, 2, torch.device("cuda"))
    graphs = _config(tmp_path, "run.compile_mode=reduce-overhead", "model.gradient_checkpointing=true")
    with pytest.raises(ConfigError, match="model.gradient_checkpointing = false"):
        loop._check_graphs(graphs, gpu, "reduce-overhead")
    loop._check_graphs(graphs, loop._Env(0, 1, torch.device("cpu")), "reduce-overhead")  # a CPU records no graphs
    loop._check_graphs(graphs, gpu, "default")  # nor does the default mode
    sharded = _config(tmp_path, "run.compile_mode=reduce-overhead", "run.distributed=fsdp")
    with pytest.raises(ConfigError, match="run.distributed = 'ddp'"):
        loop._check_graphs(sharded, two_gpus, "max-autotune")
    loop._check_graphs(sharded, two_gpus, "max-autotune-no-cudagraphs")
    text = _config(tmp_path, "run.compile_mode=reduce-overhead", "task=seq-cls", "data.text_column=x")
    with pytest.warns(UserWarning, match="data.padding = 'max_length'"):
        loop._check_graphs(text, gpu, "reduce-overhead")


@pytest.mark.parametrize(
    ("overrides", "env", "expected"),
    [
        ((), (1, "cuda"), "reduce-overhead"),  # classification: one shape
        ((), (1, "cpu"), "default"),
        ((), (2, "cuda"), "reduce-overhead"),  # ddp: the all-reduce runs outside the graphs
        (("run.distributed=fsdp",), (2, "cuda"), "default"),
        (("model.gradient_checkpointing=true",), (1, "cuda"), "default"),
        (("run.compile_backend=aot_eager",), (1, "cuda"), "default"),
        (("task=seq-cls", "data.text_column=x"), (1, "cuda"), "default"),  # padded to each batch's longest
        (("task=seq-cls", "data.text_column=x", "data.padding=max_length"), (1, "cuda"), "reduce-overhead"),
        (("task=seq-cls", "data.text_column=x", "data.pad_to_multiple_of=16"), (1, "cuda"), "reduce-overhead"),
        (("task=seq-cls", "data.text_column=x", "data.pad_to_multiple_of=15"), (1, "cuda"), "default"),  # 9 lengths
        (("run.compile_mode=default",), (1, "cuda"), "default"),
        (("run.compile_mode=max-autotune-no-cudagraphs",), (1, "cpu"), "max-autotune-no-cudagraphs"),
    ],
)
def test_auto_compile_mode_takes_cuda_graphs_only_where_they_hold(tmp_path: Path, overrides, env, expected) -> None:
    from lorakit.train import loop

    config = _config(tmp_path, *overrides)
    assert config.run.compile_mode == ("auto" if not any("compile_mode" in o for o in overrides) else expected)
    assert loop._compile_mode(config, loop._Env(0, env[0], torch.device(env[1]))) == expected


def test_a_run_that_stops_lets_its_cuda_graphs_go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch keeps recorded graphs and their memory for the process's life: a run that ends in an error lets them go
    too (a sweep in one process would otherwise keep every stopped run's), and a run without graphs leaves torch's
    compiled code alone."""
    resets = []
    monkeypatch.setattr(torch.compiler, "reset", lambda: resets.append(1))

    def stop(step: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):  # Ctrl-C: one line saying how to resume
        train(_config(tmp_path, f"run.out_dir={tmp_path / 'plain'}"), on_step=stop)
    assert resets == []
    monkeypatch.setattr(parallel, "compile_blocks", _replayed_gradients)
    with pytest.raises(TrainingInterrupted):  # Ctrl-C: one line saying how to resume
        train(_config(tmp_path, f"run.out_dir={tmp_path / 'graphs'}"), on_step=stop)
    assert resets == [1]


@pytest.mark.parametrize(
    ("padding", "multiple", "longest", "width"),
    [
        ("longest", None, 37, 37),
        ("max_length", None, 37, 128),
        ("max_length", None, 130, 130),  # truncation = false lets an example run past max_length: never cut
        ("longest", 16, 37, 48),
        ("longest", 16, 48, 48),
        ("longest", 48, 100, 128),  # rounded up to 144, but not past max_length
        ("longest", 48, 129, 129),
    ],
)
def test_batch_width_pads_to_the_longest_rounded_up_but_not_past_max_length(padding, multiple, longest, width):
    from lorakit.train.config import DataSection
    from lorakit.train.tasks import batch_width

    data = DataSection(max_length=128, padding=padding, pad_to_multiple_of=multiple)
    assert batch_width(longest, data) == width


def test_text_padded_to_a_multiple_trains_as_padded_to_its_longest(tmp_path: Path) -> None:
    """Padding is masked out of the loss: a causal LM padded to multiples of 8 (a few batch lengths, which CUDA
    graphs can replay) gets the losses of the same run padded to each batch's longest, and its batches are so."""
    from test_train_helpers import causal_lm_config, copy_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    from lorakit.train import tasks

    torch.manual_seed(0)
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # its masks would differ with the width
    model = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=30522, n_embd=32, n_layer=2, n_head=2, n_positions=64, **no_dropout)
                    ).save_pretrained(model)  # fmt: skip
    copy_tokenizer(model)
    lines = tmp_path / "lines.txt"
    lines.write_text("".join(f"{' '.join(['word'] * (3 + i % 11))} end\n" for i in range(48)))
    path = causal_lm_config(tmp_path / "lm.toml", model, lines, max_steps=4)
    runs = {}
    for name, extra in (("longest", []), ("multiple", ["data.pad_to_multiple_of=8"])):
        config = load_config(path, [f"run.out_dir={tmp_path / name}", *extra])
        runs[name] = _losses(train(config).folder)
    assert runs["multiple"] == pytest.approx(runs["longest"], rel=1e-5)
    prepared = tasks.prepare(config)
    widths = {prepared.collate(prepared.train[i : i + 4])["input_ids"].shape[1] for i in range(0, 40, 4)}
    assert widths and all(w % 8 == 0 or w == config.data.max_length for w in widths)
    with pytest.raises(ConfigError, match="data.pad_to_multiple_of must be >= 1"):
        load_config(path, ["data.pad_to_multiple_of=0"])
