"""Adapter trees on disk: every node an ordinary PEFT adapter folder with its own delta, plus one manifest.

    model at node = base + sum of dW over the path root .. node          (LoraModel.add_adapter(..., parent=))

`save_pretrained` writes PEFT's layout (adapter "default" in the folder itself, every other one in
`folder/<name>`) and, when any adapter has a parent, `lorakit_tree.json` next to them:

    {"format": "lorakit-tree/1", "parents": {"legal": null, "contracts": "legal"}}

PEFT reads each node folder as a plain LoRA; loading the folders of a path and activating them together
(`peft_model.base_model.set_adapter([...])`) gives the node's model. DoRA nodes are refused in a tree: DoRA
rescales the whole W + dW, so its output is not a delta that adds along a path.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from lorakit.errors import AdapterFileError
from lorakit.model import LoraModel
from lorakit.names import check_adapter_name

MANIFEST = "lorakit_tree.json"
FORMAT = "lorakit-tree/1"


def write_manifest(directory: Path, parents: dict[str, str | None]) -> None:
    """Writes the manifest for `parents` (every saved adapter -> its parent or None) into `directory`."""
    text = json.dumps({"format": FORMAT, "parents": parents}, indent=2, sort_keys=True)
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(text + "\n")
    tmp.replace(directory / MANIFEST)  # a reader sees the old manifest or the new one, never half of one


def read_parents(directory: str | Path) -> dict[str, str | None]:
    """Adapter -> parent from the folder's manifest, parents first; checked before anything is loaded."""
    path = Path(directory) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AdapterFileError(f"{path} is missing or not JSON ({err}); save the tree with save_pretrained") from None
    parents = data.get("parents") if isinstance(data, dict) else None
    if not isinstance(parents, dict) or data.get("format") != FORMAT:
        raise AdapterFileError(f"{path} is not a {FORMAT} manifest (expected format and parents keys)")
    odd = sorted(repr(p) for p in parents.values() if p is not None and not isinstance(p, str))
    if odd:
        raise AdapterFileError(f"{path}: parents must be adapter names or null, found {odd}; save the tree again")
    for name in parents:
        check_adapter_name(name)  # a name such as "../x" would be read from outside the tree's folder
    unknown = sorted({p for p in parents.values() if p is not None and p not in parents})
    if unknown:
        raise AdapterFileError(f"{path} names parents {unknown} that are not nodes of the tree")
    return _parents_first(parents, path)


def _parents_first(parents: dict[str, str | None], path: Path) -> dict[str, str | None]:
    ordered: dict[str, str | None] = {}
    while len(ordered) < len(parents):
        ready = [n for n, p in parents.items() if n not in ordered and (p is None or p in ordered)]
        if not ready:
            cycle = sorted(n for n in parents if n not in ordered)
            raise AdapterFileError(f"{path}: the parents of {cycle} form a cycle; a tree has a root above every node")
        ordered.update((n, parents[n]) for n in ready)
    return ordered


def node_folder(directory: str | Path, name: str) -> Path:
    """Where save_pretrained puts adapter `name` (PEFT's layout)."""
    return Path(directory) if name == "default" else Path(directory) / name


def load_tree(model: nn.Module, directory: str | Path, is_trainable: bool = False) -> LoraModel:
    """Loads every node of the tree saved in `directory` onto `model` (a base model or a LoraModel), parents
    first, each with its parent; on any failure the nodes loaded so far are removed again."""
    parents = read_parents(directory)
    lora_model = model if isinstance(model, LoraModel) else LoraModel(model)
    loaded: list[str] = []
    try:
        for name, parent in parents.items():
            lora_model.load_adapter(node_folder(directory, name), name, is_trainable=is_trainable, parent=parent)
            loaded.append(name)
    except Exception:
        for name in reversed(loaded):
            lora_model.delete_adapter(name)
        raise
    return lora_model
