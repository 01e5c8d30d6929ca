"""The `lorakit` command: inspect a model, describe an adapter folder, merge an adapter into its base.

Each command is a thin layer over the public API. A LorakitError from any command, including those other
modules register later, becomes one red line and exit code 2 (see `_Commands`), never a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from rich.tree import Tree
from safetensors.torch import save_model
from torch import Tensor, nn
from typer.core import TyperGroup

from lorakit import LoraConfig, LorakitError, LoraModel, models
from lorakit.io import CONFIG_NAME, WEIGHTS_NAME, TensorRole, read_config, read_weights, tensor_roles
from lorakit.serve import vllm
from lorakit.survey import Adaptable, adaptable_modules, default_target_modules, matched_modules
from lorakit.targets import modules_to_save


class _Commands(TyperGroup):
    """Turns a LorakitError raised by any command into one red line and exit code 2."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LorakitError as err:
            # soft_wrap: one line whatever the terminal width
            _console(stderr=True).print(f"error: {_one_line(str(err))}", style="red", soft_wrap=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=_Commands,
    name="lorakit",
    help="LoRA for any PyTorch model; adapter folders interchangeable with Hugging Face PEFT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

_MODEL_HELP = (
    "A transformers model folder (with config.json), pkg://package/sub/folder, lorakit://SmolLM2-135M-Instruct, "
    "a hub id (where the hub is reachable) or an import path 'package.module:factory'"
)
_ADAPTER_HELP = "An adapter folder: adapter_config.json + adapter_model.safetensors"
AdapterArg = Annotated[Path, typer.Argument(metavar="ADAPTER", help=_ADAPTER_HELP)]


# -- loading a model: shared by every command that takes MODEL or BASE ----------------------------------------------
def load_model(source: str, task_type: str | None = None, **kwargs: Any) -> nn.Module:
    """The model `source` names, as `lorakit train` reads model.source (lorakit.models.load_model)."""
    return models.load_model(source, task_type, **kwargs)


# -- inspect --------------------------------------------------------------------------------------------------------
@dataclass
class _Node:
    module: nn.Module
    target: Adaptable | None = None
    children: dict[str, _Node] = field(default_factory=dict)

    def signature(self) -> tuple:
        """Equal for structurally identical subtrees, so repeated blocks can be printed once."""
        t = self.target
        own = (type(self.module).__name__, t and (t.kind, t.shape, t.params, t.in_all_linear))
        return (*own, *((name, child.signature()) for name, child in self.children.items()))

    def count(self) -> int:
        return (self.target is not None) + sum(child.count() for child in self.children.values())


@app.command("inspect")
def inspect_model(
    model: Annotated[str, typer.Argument(metavar="MODEL", help=_MODEL_HELP)],
    depth: Annotated[int | None, typer.Option(min=1, help="Show the tree this many levels deep")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Print repeated blocks one by one instead of once")] = False,
) -> None:
    """Show the modules LoRA can adapt, their kinds and shapes, and target_modules to start from."""
    module = load_model(model)
    targets = adaptable_modules(module)
    console = _console()
    total = sum(p.numel() for p in module.parameters())
    root = Tree(Text(f"{type(module).__name__}  ({total:,} parameters, {len(targets)} modules LoRA can adapt)"))
    _render(root, _module_tree(module, targets), depth, collapse=not all_)
    console.print(root)
    if not targets:
        raise LorakitError(f"{model} has no module LoRA can adapt (Linear, Embedding, Conv1d/2d/3d, GPT-2 Conv1D)")
    console.print(_leaf_table(targets))
    _print_suggestions(console, module, targets)


def _module_tree(model: nn.Module, targets: list[Adaptable]) -> _Node:
    root = _Node(model)
    for target in targets:
        node, prefix = root, ""
        for name in target.path.split("."):
            prefix = f"{prefix}.{name}" if prefix else name
            if name not in node.children:
                node.children[name] = _Node(model.get_submodule(prefix))
            node = node.children[name]
        node.target = target
    return root


def _render(tree: Tree, node: _Node, depth: int | None, collapse: bool) -> None:
    for name, child, repeats in _sibling_runs(node.children, collapse):
        branch = tree.add(_label(name, child, repeats))
        if depth is not None and depth <= 1 and child.children:
            below = child.count() - (child.target is not None)
            branch.add(Text(f"... {below} adaptable modules below", style="dim"))
        else:
            _render(branch, child, None if depth is None else depth - 1, collapse)


def _sibling_runs(children: dict[str, _Node], collapse: bool) -> list[tuple[str, _Node, int]]:
    """Consecutive numbered siblings with identical structure (the layers of a model) as one entry."""
    runs: list[list] = []  # [first name, last name, node, count]
    for name, child in children.items():
        last = runs[-1] if runs else None
        same = last and name.isdigit() and last[1].isdigit() and last[2].signature() == child.signature()
        if collapse and same:
            last[1], last[3] = name, last[3] + 1
        else:
            runs.append([name, name, child, 1])
    return [(first if n == 1 else f"{first}-{last}", node, n) for first, last, node, n in runs]


def _label(name: str, node: _Node, repeats: int) -> Text:
    text = Text(name, style="bold")
    t = node.target
    if t is None:
        text.append(f" ({type(node.module).__name__})", style="dim")
    else:
        text.append(f"  {t.kind}  {t.shape}  {t.params:,} params", style="green")
        if t.plain_matmul and not t.in_all_linear:
            text.append("  (output head, not in all-linear)", style="yellow")
    if repeats > 1:
        text.append(f"  x{repeats} identical", style="cyan")
    return text


def _leaf_table(targets: list[Adaptable]) -> Table:
    counts = Counter((t.path.rsplit(".", 1)[-1], t.kind, t.shape, t.params) for t in targets)
    table = Table(title="Modules LoRA can adapt, by name", title_justify="left", box=None)
    for column in ("name", "count", "kind", "shape", "params each"):
        table.add_column(column, justify="right" if column in ("count", "params each") else "left")
    for (name, kind, shape, params), n in counts.items():
        table.add_row(name, f"x{n}", kind, shape, f"{params:,}")
    return table


def _print_suggestions(console: Console, model: nn.Module, targets: list[Adaptable]) -> None:
    console.print("\nSuggested target_modules:", style="bold")
    default = default_target_modules(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if default is not None:
        matched = matched_modules(model, default)
        line = f"  target_modules={json.dumps(default)}  # the {model_type} default, {matched} modules"
    else:
        line = f"  (no known default target_modules for model_type={model_type!r}; pick names from the table)"
    console.print(line, soft_wrap=True)
    n_linear = sum(t.in_all_linear for t in targets)
    if n_linear:
        line = f'  target_modules="all-linear"  # every linear layer but the output head, {n_linear} modules'
        console.print(line, soft_wrap=True)


# -- info -----------------------------------------------------------------------------------------------------------
_ALWAYS_SHOWN = ("r", "lora_alpha", "target_modules", "modules_to_save", "task_type", "bias", "lora_dropout")


@app.command("info")
def adapter_info(adapter: AdapterArg) -> None:
    """Describe an adapter folder: its config, tensors, parameters per target module, dtype and size."""
    console = _console()
    subadapters = _subadapter_dirs(adapter)
    if subadapters and not (adapter / CONFIG_NAME).exists():
        console.print(f"{adapter} holds no default adapter, only named ones:")  # save_pretrained(selected_adapters)
    else:
        config, weights = read_config(adapter), read_weights(adapter)
        console.print(f"Adapter {adapter}", style="bold", soft_wrap=True)
        console.print(_config_table(config))
        console.print(_weights_summary(adapter, weights))
        console.print(_module_breakdown(config, weights))
        console.print(vllm.describe(vllm.vllm_servability(config, weights)), soft_wrap=True)
    if subadapters:
        _print_subadapters(console, subadapters)


def _config_table(config: LoraConfig) -> Table:
    table = Table(box=None, show_header=False)
    table.add_row("peft_type", config.peft_type)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in _ALWAYS_SHOWN or (value != _default(f) and f.name != "inference_mode"):
            table.add_row(f.name, _show(value))
    return table


def _default(f: dataclasses.Field) -> Any:
    """A field's default, read from the dataclass: VeRA's and trainable tokens' configs have fields LoraConfig
    lacks, and TrainableTokensConfig has a required one, so no default instance can be built."""
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def _weights_summary(adapter: Path, weights: dict[str, Tensor]) -> str:
    params = sum(t.numel() for t in weights.values())
    dtypes = ", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in weights.values()})) or "-"
    size = sum((adapter / name).stat().st_size for name in (CONFIG_NAME, WEIGHTS_NAME))
    return f"\n{len(weights)} tensors, {params:,} parameters, {dtypes}, {_human_size(size)} on disk"


def _module_breakdown(config: LoraConfig, weights: dict[str, Tensor]) -> Table:
    """Parameters grouped by what they belong to: LoRA factors per module name, full copies, biases."""
    groups: dict[str, dict[str, Any]] = {}
    for item in tensor_roles(config, weights):
        group = groups.setdefault(_group_label(item, config), {"modules": set(), "ranks": set(), "params": 0})
        group["modules"].add(item.module)
        group["params"] += weights[item.key].numel()
        if item.rank is not None:
            group["ranks"].add(item.rank)
    table = Table(title="\nParameters by target module", title_justify="left", box=None)
    for column in ("module", "count", "rank", "parameters"):
        table.add_column(column, justify="left" if column == "module" else "right")
    for label, g in groups.items():
        ranks = ", ".join(map(str, sorted(g["ranks"]))) or "-"
        table.add_row(label, f"x{len(g['modules'])}", ranks, f"{g['params']:,}")
    return table


def _group_label(item: TensorRole, config: LoraConfig) -> str:
    if item.role in ("lora_A", "lora_B"):
        return item.module.rsplit(".", 1)[-1]
    if item.role == "saved":
        return f"{item.module.rsplit('.', 1)[-1]} (trained in full)"
    if item.key.endswith(".bias") and getattr(config, "bias", "none") != "none":
        return f"biases (bias={config.bias})"
    # a variant's own tensor (DoRA's magnitudes, trainable tokens, lora_bias): its path, layer numbers as *
    return re.sub(r"(^|\.)\d+(?=\.)", r"\1*", f"{item.module}.{item.key.rsplit('.', 1)[-1]}")


def _subadapter_dirs(adapter: Path) -> list[Path]:
    """PEFT saves every adapter but 'default' in ADAPTER/<name>/."""
    if adapter.is_file():
        raise LorakitError(f"{adapter} is a file; pass the adapter folder that holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    if not adapter.is_dir():
        raise LorakitError(f"adapter folder {adapter} does not exist")
    return sorted(p for p in adapter.iterdir() if (p / CONFIG_NAME).is_file())


def _print_subadapters(console: Console, dirs: list[Path]) -> None:
    table = Table(title="\nNamed adapters in subfolders", title_justify="left", box=None)
    for column in ("name", "r", "lora_alpha", "target_modules", "parameters"):
        table.add_column(column)
    broken = []
    for path in dirs:
        try:
            config, weights = read_config(path), read_weights(path)
        except LorakitError as err:  # one broken adapter should not hide the others
            broken.append(f"{path.name}: {_one_line(str(err))}")
            continue
        params = sum(t.numel() for t in weights.values())
        table.add_row(path.name, str(config.r), _show(config.lora_alpha), _show(config.target_modules), f"{params:,}")
    console.print(table)
    for line in broken:
        console.print(line, style="red", soft_wrap=True)


# -- merge ----------------------------------------------------------------------------------------------------------
class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")


@app.command("merge")
def merge_adapter(
    base: Annotated[str, typer.Argument(metavar="BASE", help=_MODEL_HELP)],
    adapter: AdapterArg,
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Folder for the merged model (created)")],
    dtype: Annotated[DType | None, typer.Option(help="dtype of the saved weights (default: the base's)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists and is not empty")] = False,
) -> None:
    """Fold ADAPTER into BASE and save a plain model to OUT: no LoRA modules, no extra latency.

    The model class comes from the adapter's task_type (SEQ_CLS: a sequence classifier with as many labels as the
    adapter's trained head); merging is safe: NaN or inf weights stop it with nothing written."""
    _check_not_an_input(out, {"adapter folder": adapter, "base model folder": Path(base).expanduser()})
    _check_out(out, overwrite)
    config = read_config(adapter)  # a broken adapter fails here, before the base model (minutes for a large one) loads
    weights = read_weights(adapter)
    base_dir = models.model_folder(base) if not models.is_factory(base) else None
    base_dir = base_dir if base_dir is not None and base_dir.is_dir() else None
    model = LoraModel.from_pretrained(load_model(base, config.task_type, **_head_size(config, weights)), adapter)
    merged = model.merge_and_unload(safe_merge=True)
    if dtype is not None:
        merged = merged.to(getattr(torch, dtype.value))
    try:
        _write_atomically(out, lambda tmp: _save_merged(merged, tmp, base_dir))
    except OSError as err:  # not writable, under a file, disk full: nothing was left behind
        raise LorakitError(f"cannot write the merged model to {out} ({err}); choose a folder you can write to") from err
    params = sum(p.numel() for p in merged.parameters())
    _console().print(f"merged {adapter} into {base}: {params:,} parameters written to {out}", soft_wrap=True)


def _head_size(config: LoraConfig, weights: dict[str, Tensor]) -> dict[str, int]:
    """num_labels for a classifier: the rows of the head the adapter trained in full (modules_to_save)."""
    if config.task_type not in ("SEQ_CLS", "TOKEN_CLS"):
        return {}
    saved = [t for t in tensor_roles(config, weights) if t.role == "saved" and weights[t.key].dim() == 2]
    names = set(modules_to_save(config))
    heads = [t for t in saved if t.module.rsplit(".", 1)[-1] in names]  # the head itself, not a module whose name
    rows = [weights[t.key].shape[0] for t in heads or saved]  # only ends like it (DistilBERT's pre_classifier)
    return {"num_labels": rows[-1]} if rows else {}


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise LorakitError(f"{out} is a file; pass a folder path for the merged model")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LorakitError(f"{out} exists and is not empty; pass --overwrite to replace it, or choose another folder")


def _check_not_an_input(out: Path, inputs: dict[str, Path]) -> None:
    """--overwrite replaces OUT as a whole: never when that would delete the adapter or the base being merged."""
    target = out.resolve()
    for what, path in inputs.items():
        if not path.is_dir():
            continue
        if target == path.resolve():
            raise LorakitError(f"{out} is the {what} this merge reads; choose another folder for the merged model")
        if target in path.resolve().parents:
            raise LorakitError(
                f"{out} holds the {what} {path} that this merge reads; choose another folder for the merged model"
            )


def _save_merged(model: nn.Module, folder: Path, base_dir: Path | None) -> None:
    """transformers' own format when the model has one, else model.safetensors of the state_dict; never pickle."""
    if callable(getattr(model, "save_pretrained", None)):
        model.save_pretrained(folder)
    else:
        save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if base_dir is not None:  # tokenizer and other companions, so OUT is usable on its own
        for file in base_dir.iterdir():
            if file.is_file() and not file.name.endswith(_WEIGHT_SUFFIXES) and not (folder / file.name).exists():
                shutil.copy2(file, folder / file.name)


def _write_atomically(out: Path, write: Callable[[Path], None]) -> None:
    """Writes into a temporary folder beside OUT and renames it into place, so OUT is never half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's folder is private; OUT gets the permissions mkdir would give it
    try:
        write(tmp)
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}") if out.exists() else None
        if old is not None:
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old, out)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old)


# -- small helpers --------------------------------------------------------------------------------------------------
def _console(stderr: bool = False) -> Console:
    """Markup and emoji codes off: paths and messages are printed as they are, even with [brackets] or :b: in them."""
    return Console(stderr=stderr, markup=False, highlight=False, emoji=False)


def _one_line(message: str) -> str:
    """A multi-line library message (e.g. a list of mismatching tensors) as one line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return " ".join(lines[:1] + ["; ".join(lines[1:])]).strip()


def _show(value: Any) -> str:
    if value is None or value == [] or value == {}:
        return "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def main() -> None:
    """Entry point of the `lorakit` script and of `python -m lorakit`."""
    models.drop_current_dir_from_path()  # python -m puts it first: a stray matplotlib.py there must not run
    app(prog_name="lorakit")


# -- commands defined in other modules ------------------------------------------------------------------------------
# train, eval, compare and sweep live with the training workflow; they use `load_model` above and get the same
# error handling from `_Commands`.
from lorakit.train.commands import register as _register_training  # noqa: E402

_register_training(app)

from lorakit.serve.cli import serve_command  # noqa: E402  (imports nothing heavy until the command runs)

app.command("serve")(serve_command)
