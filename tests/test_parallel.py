"""Parallel training: N adapters over one base in one forward per step equal N runs of each adapter alone.

The reference for every job is an independent single-adapter run on its own copy of the base, with the same seed,
batches, optimizer and schedule; fp32, dropout 0 gives the same weights to 1e-5. Then the jobs file:
`lorakit train jobs.toml` gives each job the adapter `lorakit train` gives that job's config alone.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import load_file
from test_train_helpers import copy_tokenizer, sentiment_csv, write_config
from typer.testing import CliRunner

from lorakit import LoraConfig, LoraModel
from lorakit.errors import ConfigError, LorakitError
from lorakit.multi.parallel import (
    IGNORE,
    ParallelJob,
    ParallelTrainer,
    add_seeded_adapter,
    concat_batches,
    mean_cross_entropy,
)
from lorakit.train import load_config, train
from lorakit.train.commands import register
from lorakit.train.jobs import is_jobs_file, load_jobs, train_jobs

VOCAB = 50


def _bert(dropout: float = 0.0) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                        num_labels=3, pad_token_id=0)  # fmt: skip
    return BertForSequenceClassification(config).eval()


def _batches(seed: int, n: int, rows: int, length: int) -> list[dict[str, torch.Tensor]]:
    """n batches of `rows` sequences of `length` tokens, the last row of each padded after half its length."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (rows, length), generator=g)
        mask = torch.ones_like(ids)
        mask[-1, length // 2 :] = 0
        ids[-1, length // 2 :] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (rows,), generator=g)})
    return out


def _linear_decay(steps: int):
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))


def _jobs(dropout: float = 0.0) -> list[ParallelJob]:
    """Three jobs that differ in everything a job has: rank, alpha, targets, optimizer, schedule, batch size and
    length, steps, grad accumulation, clipping, seed; the first trains the classifier too (modules_to_save)."""
    return [
        ParallelJob("wide", LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=dropout,
                                       modules_to_save=["classifier"]),
                    _batches(1, 4, rows=3, length=7), steps=4,
                    optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01),
                    scheduler=_linear_decay(4), max_grad_norm=1.0, seed=1),
        ParallelJob("sgd", LoraConfig(r=2, lora_alpha=2, target_modules=["key", "dense"], lora_dropout=dropout),
                    _batches(2, 6, rows=5, length=11), steps=3,
                    optimizer=lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9), grad_accum=2, seed=2),
        ParallelJob("short", LoraConfig(r=8, lora_alpha=4, target_modules=["query"], use_rslora=True,
                                        lora_dropout=dropout),
                    _batches(3, 2, rows=2, length=4), steps=2,
                    optimizer=lambda p: torch.optim.Adam(p, lr=3e-2), seed=3),
    ]  # fmt: skip


def _alone(base: torch.nn.Module, job: ParallelJob) -> tuple[list[torch.nn.Parameter], list[float]]:
    """The job trained alone on its own copy of the base: (its trained parameters, its loss per step)."""
    model = LoraModel(copy.deepcopy(base))
    add_seeded_adapter(model, job.name, job.lora_config, job.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = job.optimizer(params)
    scheduler = job.scheduler(optimizer) if job.scheduler else None
    batches, losses = iter(job.batches), []
    model.train()
    for _ in range(job.steps):
        total = 0.0
        for _ in range(job.grad_accum):
            batch = next(batches)
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            loss = mean_cross_entropy(logits, batch["labels"]) / job.grad_accum
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, job.max_grad_norm or math.inf)
        optimizer.step()
        if scheduler:
            scheduler.step()
        optimizer.zero_grad()
        losses.append(total)
    return params, losses


def test_each_adapter_equals_its_independent_run() -> None:
    base = _bert()
    jobs = _jobs()
    expected = {job.name: _alone(base, job) for job in jobs}
    trainer = ParallelTrainer(copy.deepcopy(base), jobs)
    initial = {job.name: [p.detach().clone() for p in trainer.parameters_of(job.name)] for job in jobs}
    losses = trainer.run()
    assert trainer.live == []
    for job in jobs:
        params, job_losses = expected[job.name]
        trained = trainer.parameters_of(job.name)
        assert [p.shape for p in trained] == [p.shape for p in params]
        assert len(losses[job.name]) == job.steps
        assert losses[job.name] == pytest.approx(job_losses, abs=1e-5)
        for ours, theirs in zip(trained, params, strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        # B starts at 0, so every B moved: the comparison is not of untouched weights (some A barely move: the
        # tiny random BERT's attention is almost uniform, so its keys get gradients near 1e-13)
        moved = [not torch.equal(ours, start) for ours, start in zip(trained, initial[job.name], strict=True)]
        assert sum(moved) > len(moved) // 2, job.name


def test_jobs_alike_run_as_one_batch_per_layer_and_each_equals_its_independent_run(monkeypatch) -> None:
    """Jobs of one LoRA config and batch shape (a sweep over datasets or learning rates): every adapted layer takes
    their rows as one batch over the stacked factors, and each adapter still trains exactly as it does alone."""
    from lorakit import ops

    batched = []
    monkeypatch.setattr(ops, "_batched_spans", lambda *a, f=ops._batched_spans: batched.append(1) or f(*a))
    base = _bert()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"])
    jobs = [
        ParallelJob(f"lr{i}", config, _batches(10 + i, 3, rows=2, length=6), steps=3,
                    optimizer=lambda p, lr=lr: torch.optim.AdamW(p, lr=lr), seed=i)
        for i, lr in enumerate([1e-2, 3e-2, 5e-3])
    ]  # fmt: skip
    expected = {job.name: _alone(base, job) for job in jobs}
    trainer = ParallelTrainer(copy.deepcopy(base), jobs)
    losses = trainer.run()
    assert batched  # the layers took the batched path
    for job in jobs:
        params, job_losses = expected[job.name]
        assert losses[job.name] == pytest.approx(job_losses, abs=1e-5)
        for ours, theirs in zip(trainer.parameters_of(job.name), params, strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_with_dropout_the_losses_track_the_independent_runs() -> None:
    base = _bert(dropout=0.1)
    jobs = _jobs(dropout=0.1)
    torch.manual_seed(0)
    expected = {job.name: _alone(base, job)[1] for job in jobs}
    torch.manual_seed(0)
    losses = ParallelTrainer(copy.deepcopy(base), jobs).run()
    for job in jobs:
        assert losses[job.name] == pytest.approx(expected[job.name], rel=0.15), job.name


def test_concat_pads_to_the_longest_and_masks_the_padding() -> None:
    a = {"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.zeros(2, 3, dtype=torch.long)}
    b = {"input_ids": torch.full((1, 5), 7), "labels": torch.ones(1, 5, dtype=torch.long)}
    merged, sizes = concat_batches([a, b], {"input_ids": 0, "labels": IGNORE, "attention_mask": 0})
    assert sizes == [2, 1]
    assert merged["input_ids"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [7] * 5]
    assert merged["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1] * 5]
    assert merged["labels"].tolist() == [[0, 0, 0, IGNORE, IGNORE], [0, 0, 0, IGNORE, IGNORE], [1] * 5]
    with pytest.raises(LorakitError, match="same inputs"):
        concat_batches([a, {"input_ids": b["input_ids"]}], {})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda jobs: jobs[1].__setattr__("name", "wide"), "two jobs are named 'wide'"),
        (lambda jobs: jobs[0].lora_config.__setattr__("bias", "all"), "bias='all' trains the base's biases"),
        (lambda jobs: jobs[2].__setattr__("steps", 0), "steps and grad_accum must be integers >= 1"),
        (lambda jobs: jobs[2].__setattr__("grad_accum", 1.5), r"must be integers >= 1, got 2, 1.5"),
        (
            lambda jobs: jobs[2].lora_config.__setattr__("target_parameters", ["attention.self.query.weight"]),
            "target_parameters adapters change the shared weight",
        ),
    ],
)
def test_jobs_that_cannot_share_a_base_are_refused_before_any_adapter(change, message: str) -> None:
    jobs = _jobs()
    change(jobs)
    model = LoraModel(_bert())
    with pytest.raises(ConfigError, match=message):
        ParallelTrainer(model, jobs)
    assert model.peft_config == {}


def _state(model: LoraModel) -> dict[str, torch.Tensor]:
    """Every tensor by its module path (a layer an adapter was added to and removed from stays wrapped, as in PEFT)."""
    return {k.replace(".base_layer.", "."): v.clone() for k, v in model.state_dict().items()}


def test_a_job_that_fails_to_start_leaves_the_model_as_it_was_and_a_fixed_call_trains() -> None:
    """A job whose config or optimizer fails removes the jobs added before it, and an adapter the model had (loaded
    frozen) is active and frozen again: a corrected call then trains each job as it trains alone."""
    base = LoraModel(_bert())
    base.add_adapter("old", LoraConfig(r=2, target_modules=["query"], init_lora_weights=False))
    base.set_adapter("old", inference_mode=True)
    before = _state(base)
    for broken in (
        lambda job: job.__setattr__("lora_config", LoraConfig(r=2, target_modules=["nope"])),
        lambda job: job.__setattr__("optimizer", lambda params: torch.optim.SGD(params, lr=-1.0)),
    ):
        jobs = _jobs()[1:]
        broken(jobs[1])
        with pytest.raises(ValueError):
            ParallelTrainer(base, jobs)
        assert list(base.peft_config) == ["old"] and base.active_adapters == ["old"]
        assert not any(p.requires_grad for p in base.parameters())
        after = _state(base)
        assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    jobs = _jobs()[1:]
    trainer = ParallelTrainer(base, jobs)
    assert base.active_adapters == ["old"] and not any(
        p.requires_grad for n, p in base.named_parameters() if ".old" in n
    )
    trainer.run()
    for job in jobs:
        params, _ = _alone(_bert(), job)
        for ours, theirs in zip(trainer.parameters_of(job.name), params, strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (lambda b: {k: v[:0] for k, v in b.items()}, "job 'short': micro-batch 1 has no rows"),
        (lambda b: {k: v for k, v in b.items() if k != "labels"}, r"micro-batch 1 has no 'labels' tensor \(keys:"),
    ],
    ids=["no-rows", "no-labels"],
)
def test_an_empty_or_unlabelled_batch_is_refused_naming_its_job(batch, message: str) -> None:
    jobs = _jobs()
    jobs[2].batches = [jobs[2].batches[0], batch(jobs[2].batches[1])]
    trainer = ParallelTrainer(_bert(), jobs)
    trainer.step()
    with pytest.raises(LorakitError, match=message):
        trainer.step()


def test_a_job_that_runs_out_of_batches_names_itself() -> None:
    jobs = _jobs()
    jobs[1].batches = jobs[1].batches[:3]
    with pytest.raises(LorakitError, match="job 'sgd' ran out of batches after 3 micro-batches; it needs .* = 6"):
        ParallelTrainer(_bert(), jobs).run()


# -- lorakit train jobs.toml -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT with MiniLM's vocabulary and no dropout anywhere, so runs are deterministic."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
              ).save_pretrained(folder)  # fmt: skip
    copy_tokenizer(folder)
    return folder


def _jobs_file(tmp: Path, model: Path, jobs: str) -> Path:
    data = sentiment_csv(tmp / "s.csv", n=80)
    return write_config(tmp / "jobs.toml", f"""
        task = "seq-cls"
        seed = 0
        [model]
        source = "{model}"
        [data]
        path = "{data}"
        labels = ["neg", "pos"]
        max_length = 16
        eval_fraction = 0.2
        [lora]
        target_modules = ["query", "value"]
        modules_to_save = ["classifier"]
        [optim]
        lr = 0.01
        batch_size = 8
        max_steps = 3
        [run]
        out_dir = "{tmp / "runs"}"
        eval_every = 2
        log_every = 1
        progress = "none"
        tensorboard = false
    """ + jobs)  # fmt: skip


_TWO_JOBS = """
    [[adapters]]
    name = "r2"
    lora = { r = 2, lora_alpha = 4 }

    [[adapters]]
    name = "r4-sgd"
    seed = 0
    data = { max_samples = 40 }
    lora = { r = 4, target_modules = ["query", "key", "value"] }
    optim = { name = "SGD", lr = 0.05, batch_size = 5, max_steps = 5, schedule = "cosine", warmup_steps = 1 }
"""


def test_jobs_file_gives_each_job_the_adapter_its_own_run_gives(tmp_path: Path, bert_folder: Path) -> None:
    path = _jobs_file(tmp_path, bert_folder, _TWO_JOBS)
    assert is_jobs_file(path) and not is_jobs_file(tmp_path / "s.csv")
    app = typer.Typer()
    register(app)
    out = CliRunner().invoke(app, ["train", str(path)])  # `lorakit train jobs.toml`
    assert out.exit_code == 0, out.output
    assert "r2" in out.output and "r4-sgd" in out.output  # the comparison table
    for name, steps in (("r2", 3), ("r4-sgd", 5)):
        folder = tmp_path / "runs" / name
        result = json.loads((folder / "summary.json").read_text())
        assert result["steps"] == steps
        assert {"config.toml", "metrics.jsonl", "summary.json", "loss.png", "accuracy.png", "adapter"} <= {
            p.name for p in folder.iterdir()
        }
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, steps + 1))
        overrides = [f"run.out_dir={tmp_path / 'alone' / name}", "run.plots=false", "run.eval_every=100"]
        alone = train(load_config(folder / "config.toml", overrides))
        ours = load_file(folder / "adapter" / "adapter_model.safetensors")
        theirs = load_file(Path(alone.folder) / "adapter" / "adapter_model.safetensors")
        assert ours.keys() == theirs.keys() and any("classifier" in k for k in ours)
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=1e-5)
        assert result["after"] == pytest.approx(alone.after, abs=1e-5)


@pytest.mark.parametrize(
    ("jobs", "message"),
    [
        ('[[adapters]]\nname = "a"\n[[adapters]]\nname = "b"\nrun = { out_dir = "X/a" }\n',
         "jobs 'a' and 'b' both write to"),
        ('[[adapters]]\nname = "a"\nlr = 0.1\n', r"unknown key\(s\) \['lr'\]; a job sets"),
        ('[[adapters]]\nname = "a"\noptim = { learning_rate = 0.1 }\n', "unknown key.* optim.learning_rate"),
        ('[[adapters]]\nname = "a"\n[[adapters]]\nname = "a"\n', "two \\[\\[adapters\\]\\] are named 'a'"),
        ('[[adapters]]\nname = "a.b"\n', "adapter name 'a.b'"),
        ('[[adapters]]\nlora = { r = 2 }\n', "needs a name"),
        ('[[adapters]]\nname = "a"\noptim = { precision = "bf16" }\n[[adapters]]\nname = "b"\n',
         "set optim.precision once"),
    ],
)  # fmt: skip
def test_bad_jobs_files_fail_before_anything_is_written(tmp_path: Path, bert_folder: Path, jobs: str,
                                                        message: str) -> None:  # fmt: skip
    path = _jobs_file(tmp_path, bert_folder, jobs.replace("X/", f"{tmp_path / 'runs'}/"))
    with pytest.raises(ConfigError, match=message):
        train_jobs(load_jobs(path))
    assert not (tmp_path / "runs").exists()


def test_a_jobs_file_with_gradient_checkpointing_trains_the_same_adapters(tmp_path: Path, bert_folder: Path) -> None:
    trained = {}
    for checkpointing in ("false", "true"):
        out = tmp_path / checkpointing
        out.mkdir()
        path = _jobs_file(out, bert_folder, _TWO_JOBS)
        train_jobs(load_jobs(path, [f"model.gradient_checkpointing={checkpointing}", "run.plots=false"]))
        trained[checkpointing] = {
            name: load_file(out / "runs" / name / "adapter" / "adapter_model.safetensors") for name in ("r2", "r4-sgd")
        }
    for name, plain in trained["false"].items():
        assert plain.keys() == trained["true"][name].keys()
        for key, value in plain.items():
            torch.testing.assert_close(trained["true"][name][key], value, atol=1e-5, rtol=1e-5)


def _llama_jobs() -> list[ParallelJob]:
    """Two causal-LM jobs with random B (init_lora_weights=False), so that each adapter changes what the layers after
    it see, and a forward recomputed with the wrong adapters would give other gradients."""

    def batches(seed: int) -> list[dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        return [{"input_ids": (ids := torch.randint(1, 64, (2, 6), generator=g)), "labels": ids} for _ in range(3)]

    config = LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj", "v_proj", "down_proj"])
    return [
        ParallelJob("a", config, batches(1), steps=3, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), seed=1),
        ParallelJob("b", config, batches(2), steps=3, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), seed=2),
    ]


def _causal_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return mean_cross_entropy(logits[:, :-1], labels[:, 1:])


@pytest.mark.parametrize("reentrant", [False, True])
def test_with_activation_checkpointing_each_adapter_equals_the_run_without(reentrant: bool) -> None:
    from tests.cases import tiny_llama

    trained = {}
    for checkpointing in (False, True):
        base = tiny_llama().train()
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        trainer = ParallelTrainer(base, _llama_jobs(), _causal_loss)
        start = {n: [p.detach().clone() for p in trainer.parameters_of(n)] for n in ("a", "b")}
        trainer.run()
        trained[checkpointing] = {n: trainer.parameters_of(n) for n in ("a", "b")}
    assert base.is_gradient_checkpointing
    for name in ("a", "b"):
        for ours, plain, first in zip(trained[True][name], trained[False][name], start[name], strict=True):
            assert not torch.equal(plain, first)
            torch.testing.assert_close(ours, plain, atol=1e-5, rtol=1e-5)
