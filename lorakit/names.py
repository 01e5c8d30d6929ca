"""Adapter names are checked where they enter, because a name becomes a folder and a module key.

A name is one path component under the save folder (PEFT's layout puts adapter `name` in `directory/name`) and a
key of torch's ModuleDict in every adapted layer. So it must be a non-empty string without separators, dots or NUL,
short enough for a file name, and not an attribute torch already uses. PEFT's names ("default", "french",
"my-adapter_2") all pass.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lorakit.errors import AdapterNameError

BASE_NAME = "__base__"  # PEFT's name for "no adapter on this row" in adapter_names=[...]
_MAX_BYTES = 255  # the longest file name most filesystems allow
_TORCH_ATTRIBUTES = frozenset(dir(nn.ModuleDict()) + dir(nn.ParameterDict()))


def check_adapter_name(name: Any) -> str:
    """Returns `name` if it can name an adapter; raises AdapterNameError saying why not and what works."""
    problem = _problem(name)
    if problem:
        raise AdapterNameError(
            f"adapter name {name!r} {problem}; use a short name of letters, digits, '-' and '_' such as 'default'"
        )
    return name


def _problem(name: Any) -> str | None:
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a str"
    if name == "":
        return "is empty"
    if "\x00" in name:
        return "contains a NUL character"
    if "/" in name or "\\" in name:
        return "contains a path separator: an adapter is saved in its own folder, directory/<name>"
    if "." in name:
        return "contains '.': torch uses dots to address submodules (and '.' / '..' are not folder names)"
    if len(name.encode("utf-8", "surrogatepass")) > _MAX_BYTES:
        return f"is longer than {_MAX_BYTES} bytes, the longest folder name filesystems allow"
    if name == BASE_NAME:
        return "is reserved: adapter_names=['__base__'] means the base model without adapters"
    if name in _TORCH_ATTRIBUTES:
        return "is an attribute of torch's ModuleDict, which holds the adapters of each layer"
    return None
