"""Replacing a folder's files as one change: after a kill at any moment it holds all old or all new files.

How: the new files go into a fresh stage folder next to the target (same filesystem), together with hard links
to everything else the target holds (PEFT's layout keeps other adapters in subfolders of the default adapter's
folder; a user may keep a README there). After fsync, one `renameat2(RENAME_EXCHANGE)` swaps the two folders,
so every reader (lorakit, PEFT, a copy tool) sees either folder, never a mix. The old folder, now under the stage's
name, is removed. A kill leaves at most one stage folder, which the next save into the same folder removes.

Without renameat2 (outside Linux) the old folder is renamed aside, then the new one in; a kill between the two
leaves no target, and the next save renames the old folder back. Where no folder swap can work (the target is a
mount point, its parent is not writable, or it holds a whole tree: a mounted subfolder, over 10,000 entries) the
files are replaced one by one inside the target, between the creation and the removal of a marker file; readers
refuse a folder that carries it (`check_complete`), so lorakit never loads a mix. New files and folders get the
user's umask, as any file written with open() does.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from lorakit.errors import AdapterFileError

IN_PROGRESS = ".lorakit-save-in-progress"  # present only while a one-by-one replacement runs
_STAGE, _ASIDE, _TMP = "lorakit-new-", "lorakit-old-", "lorakit-tmp-"
_RENAME_EXCHANGE = 2
_MAX_CARRIED = 10_000  # entries beyond the adapter's own files; more and the files are replaced in place
_NO_SWAP = {errno.EXDEV, errno.EBUSY, errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM}

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one writer per folder is then the caller's promise
    fcntl = None


def replace_folder(target: str | Path, files: dict[str, bytes], owned: set[str]) -> None:
    """Makes folder `target` hold `files` (name -> content) as one change; keeps every other entry it holds
    except the names in `owned` that `files` does not write (stale files of the same writer)."""
    target = _checked_target(Path(target))
    with _os_errors(target), _locked(target.parent):
        clean_leftovers(target, owned)
        if not (_linkable(target) and _swap_in(target, files, owned)):
            _replace_in_place(target, files, owned)
        _fsync_dir(target.parent)


def _swap_in(target: Path, files: dict[str, bytes], owned: set[str]) -> bool:
    """Stages the new folder beside the target and swaps it in; False (nothing changed) where that cannot work."""
    try:
        stage = _stage_folder(target)
    except PermissionError:  # the parent is not writable: the caller replaces the files inside the target
        if not target.is_dir():
            raise
        return False
    try:
        if target.is_dir():
            _carry(target, stage, skip=owned | set(files))
        _write_files(stage, files)
        return _swap(stage, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # after a swap, the old folder


def _linkable(target: Path) -> bool:
    """Whether the target's other entries can be carried by hard links: one filesystem (a mounted subfolder would
    be copied) and a folder of adapter size, not a project tree (save_pretrained(".") in a repository)."""
    if not target.is_dir():
        return True
    device, count = target.stat().st_dev, 0
    for root, dirs, names in os.walk(target):
        for name in dirs + names:
            count += 1
            if count > _MAX_CARRIED or os.lstat(os.path.join(root, name)).st_dev != device:
                return False
    return True


def check_complete(folder: Path) -> None:
    """Refuses a folder whose one-by-one replacement was interrupted: its files may come from two saves."""
    if (folder / IN_PROGRESS).exists():
        raise AdapterFileError(
            f"{folder} was being saved when the saving process stopped, so its files may come from two different "
            "saves; save the adapter again (the next save also cleans this up)"
        )


def clean_leftovers(target: Path, owned: set[str]) -> None:
    """Removes what killed saves into `target` left behind; puts an aside folder back if the target is gone."""
    parent = target.parent
    if not parent.is_dir():
        return
    prefix = _prefix(target)
    leftovers = sorted(p for p in parent.iterdir() if p.name.startswith(prefix) and _is_ours(p.name[len(prefix) :]))
    asides = [p for p in leftovers if p.name[len(prefix) :].startswith(_ASIDE)]
    if not os.path.lexists(target) and asides:
        os.rename(asides[0], target)  # killed between the two renames of the aside swap: the old folder returns
        leftovers.remove(asides[0])
    for path in leftovers:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    if target.is_dir():
        for path in target.iterdir():
            if path.name != IN_PROGRESS and _is_leftover(path.name, owned) and not path.is_dir():
                path.unlink()


def _prefix(target: Path) -> str:
    """How the stage and aside folders of `target` begin; a hash for long names keeps them under 255 bytes."""
    name = os.fsencode(target.name)
    return f".{target.name}." if len(name) <= 200 else f".{hashlib.sha256(name).hexdigest()[:32]}."


def _is_ours(suffix: str) -> bool:
    return any(suffix.startswith(tag) for tag in (_STAGE, _ASIDE, _TMP))


def _checked_target(target: Path) -> Path:
    if target.is_symlink() and not target.exists():
        raise AdapterFileError(f"{target} is a symlink to {os.readlink(target)}, which does not exist")
    if target.exists() and not target.is_dir():
        raise AdapterFileError(f"{target} exists and is not a folder; an adapter is saved as a folder")
    target = Path(os.path.realpath(target))  # a symlinked folder is replaced where it lives; the link stays
    if target.parent == target:
        raise AdapterFileError(f"cannot save an adapter as the filesystem root {target}; name a folder")
    return target


@contextlib.contextmanager
def _os_errors(target: Path) -> Iterator[None]:
    try:
        yield
    except OSError as err:
        where = err.filename or target
        raise AdapterFileError(f"cannot save into {target}: {err.strerror or err} ({where})") from None


@contextlib.contextmanager
def _locked(parent: Path) -> Iterator[None]:
    """One saver at a time per parent folder, so cleaning leftovers never removes a live save's stage."""
    parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # also releases the lock; a killed process releases it too


def _stage_folder(target: Path) -> Path:
    stage = target.parent / f"{_prefix(target)}{_STAGE}{secrets.token_hex(4)}"
    os.mkdir(stage)  # 0o777 less the umask
    if target.is_dir():
        shutil.copymode(target, stage)
    return stage


def _carry(source: Path, dest: Path, skip: set[str]) -> None:
    """Hard links (copies where links fail) of everything in `source` but `skip` and save leftovers."""
    for entry in os.scandir(source):
        if entry.name in skip or _is_leftover(entry.name, skip):
            continue
        src, dst = Path(entry.path), dest / entry.name
        if entry.is_dir(follow_symlinks=False):
            os.mkdir(dst)
            _carry(src, dst, skip=set())
            shutil.copystat(src, dst)
            _fsync_dir(dst)
            continue
        try:
            os.link(src, dst, follow_symlinks=False)
        except (OSError, NotImplementedError):  # a filesystem without hard links; Windows for symlinks
            shutil.copy2(src, dst, follow_symlinks=False)


def _is_leftover(name: str, owned: set[str]) -> bool:
    """A marker or temp file of an earlier save (also lorakit 0.1's `.<owned name>.<random>.tmp`)."""
    tagged = name.startswith(".") and any(tag in name for tag in (_STAGE, _ASIDE, _TMP))
    old_temp = name.endswith(".tmp") and any(name.startswith(f".{o}.") for o in owned)
    return name == IN_PROGRESS or tagged or old_temp


def _write_files(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        with open(folder / name, "wb") as f:  # 0o666 less the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    _fsync_dir(folder)


def _swap(stage: Path, target: Path) -> bool:
    """Puts `stage` in place of `target`; False where this filesystem cannot swap folders."""
    cwd_inside = _cwd_inside(target)
    if not target.exists():
        os.rename(stage, target)
    elif not _exchange(stage, target):
        try:
            aside = target.parent / f"{_prefix(target)}{_ASIDE}{secrets.token_hex(4)}"
            os.rename(target, aside)
        except OSError as err:
            if err.errno in _NO_SWAP:
                return False
            raise
        try:
            os.rename(stage, target)  # a kill between the two renames: clean_leftovers puts the aside folder back
        except BaseException:
            os.rename(aside, target)
            raise
        os.rename(aside, stage)
    if cwd_inside is not None:  # the process's working folder was replaced: move it to the new one
        os.chdir(target / cwd_inside if (target / cwd_inside).is_dir() else target)
    return True


def _exchange(a: Path, b: Path) -> bool:
    libc = _libc()
    if libc is None:
        return False
    if libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), _RENAME_EXCHANGE) == 0:  # -100: AT_FDCWD
        return True
    code = ctypes.get_errno()
    if code in _NO_SWAP:
        return False
    raise OSError(code, os.strerror(code), str(b))


def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    return libc if hasattr(libc, "renameat2") else None


def _replace_in_place(target: Path, files: dict[str, bytes], owned: set[str]) -> None:
    """The fallback: each file replaced by rename inside the target, between a marker's creation and removal."""
    _write_files(target, {IN_PROGRESS: b""})
    temps = {}
    for name, data in files.items():
        temps[name] = target / f".{name}.{_TMP}{secrets.token_hex(4)}"
        _write_files(target, {temps[name].name: data})
    for name, temp in temps.items():
        os.replace(temp, target / name)
    for name in owned - set(files):
        (target / name).unlink(missing_ok=True)
    _fsync_dir(target)
    (target / IN_PROGRESS).unlink()
    _fsync_dir(target)


def _cwd_inside(target: Path) -> Path | None:
    try:
        return Path(os.getcwd()).relative_to(target)
    except (ValueError, OSError):
        return None


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # Windows cannot open folders; there renames are durable on their own
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
