"""Where adapters may be loaded from: only inside the configured roots, never through `..` or a symlink out.

A request names an adapter path; the path is resolved (symlinks followed) and must land inside one of the roots
the operator gave with --adapter-root. Adapter files are read by lorakit.io, which reads safetensors only.
"""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.io import CONFIG_NAME
from lorakit.multi.tree import MANIFEST, node_folder, read_parents
from lorakit.names import check_adapter_name
from lorakit.serve.errors import ServeError


class AdapterRoots:
    """The folders adapters may come from (resolved once, at start)."""

    def __init__(self, roots: list[Path]) -> None:
        self.roots = []
        for root in roots:
            if not Path(root).is_dir():
                raise ServeError(f"adapter root {root} is not a folder; pass an existing folder to --adapter-root")
            self.roots.append(Path(root).resolve())

    def resolve(self, path: str) -> Path:
        """The adapter folder that `path` (relative to a root, or absolute inside one) names; ServeError if it
        leaves the roots, goes through `..`, or is no adapter folder."""
        if not self.roots:
            raise ServeError("loading adapters at run time is off; start the server with --adapter-root DIR")
        if not path or "\x00" in path or ".." in Path(path).parts:
            raise ServeError(f"adapter path {path!r} is not allowed; give a folder inside an adapter root, no '..'")
        candidates = [Path(path)] if Path(path).is_absolute() else [root / path for root in self.roots]
        for candidate in candidates:
            resolved = candidate.resolve()  # follows symlinks, so a link pointing out of the root is caught below
            if any(resolved.is_relative_to(root) for root in self.roots) and (resolved / CONFIG_NAME).is_file():
                return resolved
            if candidate.exists() and not any(resolved.is_relative_to(root) for root in self.roots):
                raise ServeError(f"adapter path {path!r} is outside the adapter roots; adapters load only from them")
        raise ServeError(f"no adapter folder {path!r} (with {CONFIG_NAME}) inside the adapter roots")

    def discover(self) -> list[tuple[str, Path, str | None]]:
        """(name, folder, parent) of every adapter a root offers, parents first: a saved tree (a folder with
        lorakit_tree.json, the root itself or a subfolder) gives its nodes; any other adapter subfolder is one
        adapter named after its folder."""
        found: dict[str, tuple[str, Path, str | None]] = {}
        for root in self.roots:
            folders = [root, *sorted(p for p in root.iterdir() if p.is_dir())]
            for folder in folders:
                if (folder / MANIFEST).is_file():
                    for name, parent in read_parents(folder).items():
                        self._offer(found, name, node_folder(folder, name), parent)
            for folder in folders[1:]:
                if (folder / CONFIG_NAME).is_file() and not any(f[1] == folder.resolve() for f in found.values()):
                    self._offer(found, folder.name, folder, None)
        return list(found.values())

    def _offer(self, found: dict, name: str, folder: Path, parent: str | None) -> None:
        try:
            check_adapter_name(name)
        except LorakitError as err:
            raise ServeError(f"{folder}: {err}; rename the folder") from None
        resolved = folder.resolve()
        if name in found:
            raise ServeError(f"two adapters are named {name!r} ({found[name][1]} and {resolved}); rename one")
        if not any(resolved.is_relative_to(root) for root in self.roots):
            raise ServeError(f"{folder} leads outside the adapter roots (a symlink?); adapters load only from them")
        found[name] = (name, resolved, parent)
