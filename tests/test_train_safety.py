"""Nothing lost, nothing silently wrong: which folders a run may delete, nonsense settings and data refused before
the run folder exists, and a loss that turns NaN stopping the run with its last good checkpoint kept."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from test_train_helpers import sentiment_csv, seq_cls_config, tabular_config, tabular_csv, tiny_bert, write_config

from lorakit.errors import ConfigError
from lorakit.train import checkpoint, load_config, loop, tasks, train
from lorakit.train.loop import MARKER_FILE, TrainingStopped


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def csv_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sentiment_csv(tmp_path_factory.mktemp("data") / "sentiment.csv", n=60)


# -- item 1: --overwrite deletes only a folder lorakit made --------------------------------------------------------
@pytest.mark.parametrize("out_dir", ["", " "])
def test_an_empty_out_dir_is_refused(tmp_path: Path, bert: Path, csv_data: Path, out_dir: str) -> None:
    with pytest.raises(ConfigError, match=r"run.out_dir is empty \(an unset variable\?\)"):
        load_config(seq_cls_config(tmp_path, bert, csv_data), [f'run.out_dir="{out_dir}"'])


@pytest.mark.parametrize("where", ["cwd", "parent", "home", "root"])
def test_overwrite_never_deletes_the_cwd_home_or_root(
    tmp_path: Path, bert: Path, csv_data: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    work = tmp_path / "work" / "deeper"
    work.mkdir(parents=True)
    (work / "precious.txt").write_text("mine")
    (work / MARKER_FILE).write_text("even a marker does not make the current directory a run folder")
    monkeypatch.chdir(work)
    out_dir = {"cwd": ".", "parent": "..", "home": str(Path.home()), "root": "/"}[where]
    config = load_config(seq_cls_config(tmp_path, bert, csv_data), [f"run.out_dir={out_dir}"])
    with pytest.raises(ConfigError, match="a run needs a folder of its own"):
        train(config, overwrite=True)
    assert (work / "precious.txt").read_text() == "mine"


def test_overwrite_refuses_a_folder_without_the_marker(tmp_path: Path, bert: Path, csv_data: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    config = load_config(seq_cls_config(tmp_path, bert, csv_data), ["max_steps=1"])
    with pytest.raises(ConfigError, match=f"was not created by lorakit train \\(it has no {MARKER_FILE}\\)"):
        train(config, overwrite=True)
    assert (tmp_path / "run" / "keep.txt").read_text() == "mine"


def test_overwrite_replaces_a_run_folder_lorakit_made(tmp_path: Path, bert: Path, csv_data: Path) -> None:
    config = load_config(seq_cls_config(tmp_path, bert, csv_data), ["max_steps=1"])
    train(config)
    (tmp_path / "run" / "stale.txt").write_text("from the first run")
    assert (tmp_path / "run" / MARKER_FILE).is_file()
    train(config, overwrite=True)
    assert not (tmp_path / "run" / "stale.txt").exists() and (tmp_path / "run" / "summary.json").is_file()


@pytest.mark.parametrize(
    ("out_dir", "message"),
    [
        ("runs/{user}", "has a placeholder lorakit cannot fill"),
        ("runs/{0}", "has a placeholder lorakit cannot fill"),
        ("runs/{time", "has a placeholder lorakit cannot fill"),
        ("FILE/run", "is not a writable folder"),
        ("FILE", "is a file; choose a folder path"),
    ],
)
def test_templated_or_unwritable_out_dir(tmp_path: Path, bert: Path, csv_data: Path, out_dir: str, message: str):
    (tmp_path / "FILE").write_text("a file, not a folder")
    config = load_config(seq_cls_config(tmp_path, bert, csv_data), [f'run.out_dir="{tmp_path}/{out_dir}"'])
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(config)


# -- item 7: nonsense settings are refused at load time, naming the key ---------------------------------------------
@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.lr=nan", "optim.lr"),
        ("optim.lr=inf", "optim.lr"),
        ("optim.lr=1e30", "optim.lr"),
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=-1e-3", "optim.lr"),
        ("optim.max_steps=-5", "optim.max_steps"),
        ("optim.epochs=0", "optim.epochs"),
        ("optim.epochs=-1", "optim.epochs"),
        ("data.max_samples=-5", "data.max_samples"),
        ("data.max_samples=0", "data.max_samples"),
        ("data.eval_samples=0", "data.eval_samples"),
        ("optim.warmup_steps=-1", "optim.warmup_steps"),
        ("optim.warmup_ratio=5", "optim.warmup_ratio"),
        ("optim.warmup_ratio=-0.1", "optim.warmup_ratio"),
        ("optim.max_grad_norm=nan", "optim.max_grad_norm"),
        ("optim.max_grad_norm=-1", "optim.max_grad_norm"),
        ("optim.weight_decay=-1", "optim.weight_decay"),
        ("optim.loraplus_lr_ratio=0.5", "optim.loraplus_lr_ratio"),
        ("data.eval_fraction=0", "data.eval_fraction = 0 and no data.eval_path"),
        ("seed=4611686018427387904", "seed must be in 0 .. 2**32 - 1"),
        ("seed=-1", "seed must be in 0 .. 2**32 - 1"),
    ],
)
def test_nonsense_settings_are_refused_naming_the_key(tmp_path: Path, bert: Path, csv_data: Path, override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(seq_cls_config(tmp_path, bert, csv_data), [override])


def test_max_steps_zero_or_minus_one_means_from_epochs(tmp_path: Path, bert: Path, csv_data: Path) -> None:
    for value in (0, -1):
        config = load_config(
            seq_cls_config(tmp_path, bert, csv_data), [f"max_steps={value}", "run.checkpoint_every=50"]
        )
        assert train(config, overwrite=True).steps == 6  # 48 training rows / batch 8, one epoch


# -- item 7/8: data that cannot train is refused before the run folder exists ---------------------------------------
@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ("nan,0,0,0,1", "has a NaN or infinite feature"),
        ("1e39,0,0,0,1", "has a NaN or infinite feature"),  # finite text, inf as float32
        ("0.1,0.2,1", "has 3 cells, the header 5"),
        ("0.1,0.2,0.3,0.4,1,9", "has 6 cells, the header 5"),
    ],
)
def test_bad_tabular_rows_are_refused_before_the_run_folder(tmp_path: Path, bad_row: str, message: str) -> None:
    config = load_config(tabular_config(tmp_path, tabular_csv(tmp_path / "t.csv", bad_row=bad_row)))
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(config)
    assert not (tmp_path / "run").exists()


def test_labels_beyond_the_models_outputs_are_refused_first(tmp_path: Path) -> None:
    config = load_config(tabular_config(tmp_path, tabular_csv(tmp_path / "t.csv", classes=3)))
    with pytest.raises(ConfigError, match=r"the data has 3 classes \['0', '1', '2'\] but the model outputs 2 scores"):
        train(config)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("name", "content", "extra", "message"),
    [
        ("d.jsonl", '{"text": "good", "label": "pos"}\n[1, 2]\n', [], "line 2 is list '[1, 2]', not an object"),
        ("d.json", '[{"text": "good", "label": "pos"}, "oops"]', [], "item 1 is str 'oops', not an object"),
        ("d.csv", "text,label\ncaf\xe9,pos\n", [], "is not utf-8 text"),
        ("d.csv", "text,label\ngood,pos\n", ['data.encoding="klingon"'], "is not a text encoding Python knows"),
        ("d.jsonl", "[" * 100_000 + "]" * 100_000 + "\n", [], "nests too deeply"),
    ],
)
def test_bad_data_files_give_one_clear_error(tmp_path: Path, bert: Path, name, content, extra, message) -> None:
    path = tmp_path / name
    path.write_bytes(content.encode("latin-1"))
    config = load_config(seq_cls_config(tmp_path, bert, path), extra)
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(config)
    assert not (tmp_path / "run").exists()


# -- item 8: config files that are not files ------------------------------------------------------------------------
def test_config_paths_that_are_folders_fifos_or_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a folder, not a config file"):
        load_config(tmp_path)
    os.mkfifo(tmp_path / "fifo.toml")
    with pytest.raises(ConfigError, match="is not a regular file"):  # reading it would block forever
        load_config(tmp_path / "fifo.toml")
    (tmp_path / "latin.toml").write_bytes('task = "seq-cls"\n# caf\xe9\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(tmp_path / "latin.toml")


# -- item 7: a loss that becomes NaN stops the run; the last good checkpoint stays -----------------------------------
def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(tabular_config(tmp_path, tabular_csv(tmp_path / "t.csv")))  # checkpoint every 2 steps
    real_score, calls = tasks.score, {"train": 0}

    def score(task, model, batch, fused=None):  # the 5th training forward (step 5) returns NaN, as an overflow would
        scores = real_score(task, model, batch, fused)
        if model.training:
            calls["train"] += 1
            if calls["train"] == 5:
                scores.loss_sum = scores.loss_sum * float("nan")
        return scores

    monkeypatch.setattr(tasks, "score", score)
    run = tmp_path / "run"
    with pytest.raises(
        TrainingStopped, match=r"stopped at step 5: the loss became nan .* last good checkpoint \(step 4\)"
    ):
        train(config)
    assert checkpoint.saved_step(run) == 4 and not (run / "adapter").exists()
    saved = checkpoint._read(run / "checkpoint" / checkpoint.STATE_FILE)[0]
    assert all(torch.isfinite(t).all() for k, t in saved.items() if k.startswith("trainable."))
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4  # nothing from the failed step was recorded
    monkeypatch.setattr(tasks, "score", real_score)
    assert train(load_config(run / "config.toml"), resume=run).steps == 6  # the kept checkpoint resumes


def test_train_setup_never_creates_the_folder_on_error(tmp_path: Path, bert: Path, csv_data: Path) -> None:
    """The promise behind every test above: checks run before _start_folder."""
    config = load_config(seq_cls_config(tmp_path, bert, csv_data), ["lora.target_modules=['nothing']"])
    with pytest.raises(Exception, match="nothing"):
        loop.train(config)
    assert not (tmp_path / "run").exists()
    write_config(tmp_path / "x.toml", "")  # an empty config names no model: the key and the fix
    with pytest.raises(ConfigError, match="model.source is missing"):
        load_config(tmp_path / "x.toml")


# -- rows that would train on nothing or on the text "None" --------------------------------------------------------
@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            '{"text": "so good", "label": "pos"}\n{"label": "neg"}\n',
            "rows have no column 'text' (e.g. {'label': 'neg'})",
        ),
        ('{"text": "so good", "label": "pos"}\n{"text": null, "label": "neg"}\n', "empty, null or NaN 'text'"),
        ('{"text": "so good", "label": "pos"}\n{"text": " ", "label": "neg"}\n', "empty, null or NaN 'text'"),
        ('{"text": "so good", "label": "pos"}\n{"text": "so bad", "label": null}\n', "empty, null or NaN 'label'"),
    ],
)
def test_a_row_without_its_text_or_label_is_refused(tmp_path: Path, bert: Path, rows: str, message: str) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text(rows * 10)
    config = load_config(seq_cls_config(tmp_path, bert, data))
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(config)
    assert not (tmp_path / "run").exists()


def test_one_class_or_repeated_labels_are_refused(tmp_path: Path, bert: Path, csv_data: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("holds only the class(es) ['neg']; a classifier needs at least 2")):
        tasks.prepare(
            load_config(seq_cls_config(tmp_path, bert, csv_data), ['data.labels=["neg"]', "other_labels=drop"])
        )
    one_class = tmp_path / "neg.csv"
    one_class.write_text("text,label\n" + "so bad,neg\n" * 20)
    with pytest.raises(ConfigError, match="every training row has the label 'neg'"):
        tasks.prepare(load_config(seq_cls_config(tmp_path, bert, one_class)))
    with pytest.raises(ConfigError, match=re.escape("data.labels names ['neg'] more than once")):
        load_config(seq_cls_config(tmp_path, bert, csv_data), ['data.labels=["neg", "pos", "neg"]'])
    with pytest.raises(ConfigError, match="data.labels is empty"):
        load_config(seq_cls_config(tmp_path, bert, csv_data), ["data.labels=[]"])


def test_a_csv_with_a_byte_order_mark_keeps_its_first_column(tmp_path: Path) -> None:
    from lorakit.train.data import read_rows

    path = tmp_path / "excel.csv"
    path.write_bytes("\ufefftext,label\nso good,pos\n".encode())
    assert read_rows(str(path)) == [{"text": "so good", "label": "pos"}]


# -- two runs, one folder; interrupted runs ------------------------------------------------------------------------
def test_two_runs_never_share_a_folder(
    tmp_path: Path, bert: Path, csv_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(seq_cls_config(tmp_path, bert, csv_data))
    refused = []

    def second_run(step: int) -> None:  # while the first run trains, a second one wants its folder
        if step == 5:
            for kwargs in ({"resume": tmp_path / "run"}, {"overwrite": True}):
                with pytest.raises(ConfigError, match="is in use by another `lorakit train` running now") as err:
                    train(config, **kwargs)
                refused.append(err)

    train(config, on_step=second_run)
    assert len(refused) == 2 and json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 8
    prepare = tasks.prepare

    def meanwhile(cfg):  # another run, started at the same moment, creates the folder while this one loads
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / MARKER_FILE).write_text("the other run's\n")
        return prepare(cfg)

    monkeypatch.setattr(tasks, "prepare", meanwhile)
    with pytest.raises(ConfigError, match="was just taken by another `lorakit train` started at the same time"):
        train(load_config(seq_cls_config(tmp_path, bert, csv_data), [f"run.out_dir={tmp_path / 'other'}"]))
    assert (tmp_path / "other" / MARKER_FILE).read_text() == "the other run's\n"


@pytest.mark.parametrize(("at", "message"), [(6, "keeps its checkpoint of step 4"), (2, "before the first checkpoint")])
def test_sigterm_ends_the_run_with_how_to_resume(
    tmp_path: Path, bert: Path, csv_data: Path, at: int, message: str
) -> None:
    import signal

    config = load_config(seq_cls_config(tmp_path, bert, csv_data))
    folder = tmp_path / "run"

    def terminate(step: int) -> None:
        if step == at:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(loop.TrainingInterrupted, match=message):
        train(config, on_step=terminate)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the run's only
    if at > 4:
        assert train(config, resume=folder).steps == 8
        return
    with pytest.raises(
        ConfigError, match=re.escape(f"start it again with lorakit train {folder}/config.toml --overwrite")
    ):
        train(config, resume=folder)
    assert train(load_config(folder / "config.toml"), overwrite=True).steps == 8  # the command it names works
