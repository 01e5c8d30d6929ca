"""Rows from local files (CSV, JSONL, JSON, parquet, text, a `datasets` folder) into train/eval lists of dicts.

Everything is read and checked before a run folder exists, so a missing column or an unknown label is reported
with its fix and nothing is written. Batches come from `batch_indices`: a pure function of (seed, epoch,
position), which is what lets `--resume` continue with exactly the batches an uninterrupted run would see.
"""

from __future__ import annotations

import codecs
import csv
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import ConfigError, LorakitError
from lorakit.models import package_path
from lorakit.train.config import DataSection

Row = dict[str, Any]
_SUFFIX_FORMATS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".jsonl": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".txt": "text",
}


@dataclass
class Split:
    train: list[Row]
    eval: list[Row]


def resolve_path(source: str) -> Path:
    """A path, or 'pkg://package/sub/path' for data a Python package ships (found without importing it)."""
    if not source.startswith("pkg://"):
        return Path(source)
    try:
        return package_path(source)
    except LorakitError as err:
        raise ConfigError(str(err)) from None


def load_split(data: DataSection, seed: int) -> Split:
    """Train and eval rows: eval from data.eval_path, or a seeded eval_fraction held out of data.path."""
    rows = read_rows(data.path, data.format, data.encoding)
    if data.eval_path:
        train, evaluation = rows, read_rows(data.eval_path, data.format, data.encoding)
    else:
        shuffled = rows[:]
        random.Random(seed).shuffle(shuffled)
        n_eval = max(1, round(len(shuffled) * data.eval_fraction)) if data.eval_fraction > 0 else 0
        train, evaluation = shuffled[n_eval:], shuffled[:n_eval]
    train, evaluation = _drop_other_labels(train, data), _drop_other_labels(evaluation, data)
    if not train:
        raise ConfigError(f"{data.path} gives no training rows; check the file, or lower data.eval_fraction")
    return Split(train[: data.max_samples], evaluation[: data.eval_samples])


def _drop_other_labels(rows: list[Row], data: DataSection) -> list[Row]:
    """With other_labels = 'drop', rows whose label is not one of data.labels go before any sample cap."""
    if data.other_labels != "drop" or data.labels is None or not rows or data.label_column not in rows[0]:
        return rows
    wanted = {_label_key(label) for label in data.labels}
    return [r for r in rows if isinstance(r[data.label_column], list) or _label_key(r[data.label_column]) in wanted]


def read_rows(source: str, fmt: str = "auto", encoding: str = "utf-8") -> list[Row]:
    """All rows of one file or saved dataset as dicts; `sklearn://digits` etc. for scikit-learn's bundled sets."""
    if source.startswith("sklearn://") or fmt == "sklearn":
        return _sklearn_rows(source.removeprefix("sklearn://"))
    path = resolve_path(source)
    if not path.exists():
        raise ConfigError(f"data file {path} does not exist; fix data.path (or data.eval_path)")
    fmt = _format_of(path) if fmt == "auto" else fmt
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ConfigError(f"data.encoding {encoding!r} is not a text encoding Python knows; e.g. 'utf-8'") from None
    if fmt != "disk" and not path.is_file():
        raise ConfigError(f"data path {path} is not a regular file; point data.path at a {fmt} file")
    # a byte-order mark (Excel writes one) is not part of the first column's name
    reading = "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding
    try:
        rows = _READERS[fmt](path, reading)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not {encoding} text ({err.reason}); set data.encoding, e.g. 'latin-1'") from None
    except (json.JSONDecodeError, csv.Error) as err:
        raise ConfigError(f"{path} is not valid {fmt} ({err}); fix the file or set data.format") from None
    except RecursionError:
        raise ConfigError(f"{path} nests too deeply to hold examples") from None
    if not rows:
        raise ConfigError(f"{path} holds no rows")
    return rows


def _format_of(path: Path) -> str:
    if path.is_dir():
        return "disk"
    if path.suffix.lower() not in _SUFFIX_FORMATS:
        raise ConfigError(f"cannot tell the format of {path} from its suffix; set data.format (csv, jsonl, ...)")
    return _SUFFIX_FORMATS[path.suffix.lower()]


def _csv_rows(path: Path, encoding: str) -> list[Row]:
    """Rows as dicts; a row with fewer or more cells than the header is refused with its line number."""
    with path.open(encoding=encoding, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        rows = []
        for row in reader:
            if None in row or None in row.values():
                width = len(reader.fieldnames or [])
                cells = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or [])
                raise ConfigError(
                    f"{path} line {reader.line_num} has {cells} cells, "
                    f"the header {width}; fix the row (quote cells that contain the delimiter)"
                )
            rows.append(row)
    return rows


def _jsonl_rows(path: Path, encoding: str) -> list[Row]:
    rows = []
    with path.open(encoding=encoding) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                rows.append(_object(json.loads(line), f"{path} line {number}"))
    return rows


def _json_rows(path: Path, encoding: str) -> list[Row]:
    data = json.loads(path.read_text(encoding=encoding))
    if not isinstance(data, list):
        raise ConfigError(f"{path} must hold a JSON list of objects (one per example)")
    return [_object(row, f"{path} item {number}") for number, row in enumerate(data)]


def _object(row: Any, where: str) -> Row:
    if not isinstance(row, dict):
        raise ConfigError(f"{where} is {type(row).__name__} {str(row)[:40]!r}, not an object; write one JSON object "
                          'per example, e.g. {"text": "...", "label": "..."}')  # fmt: skip
    return row


def _text_rows(path: Path, encoding: str) -> list[Row]:
    """One example per non-empty line, in column 'text' (for causal-lm)."""
    return [{"text": line.rstrip("\n")} for line in path.open(encoding=encoding) if line.strip()]


def _parquet_rows(path: Path, encoding: str) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("reading parquet needs pyarrow: pip install pyarrow") from None
    return pq.read_table(path).to_pylist()


def _disk_rows(path: Path, encoding: str) -> list[Row]:
    """A folder written by `datasets`' save_to_disk; a DatasetDict gives its 'train' split."""
    try:
        import datasets
    except ImportError:
        raise ConfigError("reading a saved dataset folder needs datasets: pip install datasets") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise ConfigError(f"{path} is not a folder written by datasets' save_to_disk ({err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ConfigError(f"{path} holds splits {list(loaded)}; point data.path at one of them (path/<split>)")
        loaded = loaded["train"]
    return loaded.to_list()


def _sklearn_rows(name: str) -> list[Row]:
    """scikit-learn's bundled tabular/image sets (digits, iris, wine, breast_cancer): features + label."""
    try:
        from sklearn import datasets as skd
    except ImportError:
        raise ConfigError("sklearn:// data needs scikit-learn: pip install scikit-learn") from None
    loader = getattr(skd, f"load_{name}", None)
    if loader is None or name not in ("digits", "iris", "wine", "breast_cancer"):
        raise ConfigError(f"unknown sklearn data set {name!r}; choose digits, iris, wine or breast_cancer")
    bunch = loader()
    return [{"features": x.tolist(), "label": int(y)} for x, y in zip(bunch.data, bunch.target, strict=True)]


_READERS = {
    "csv": _csv_rows,
    "jsonl": _jsonl_rows,
    "json": _json_rows,
    "text": _text_rows,
    "parquet": _parquet_rows,
    "disk": _disk_rows,
}


def check_columns(rows: list[Row], columns: list[str], where: str) -> None:
    """Every named column exists in every row (a JSONL row may leave one out); the message lists the columns."""
    for column in columns:
        lacking = [r for r in rows if column not in r]
        if lacking:
            raise ConfigError(
                f"{where}: {len(lacking)} of {len(rows)} rows have no column {column!r} (e.g. {_show(lacking[0])}); "
                f"the first row's columns are {sorted(rows[0])}; give every row that column, or set "
                "data.text_column / data.label_column / data.feature_columns to one they have"
            )


def check_filled(rows: list[Row], columns: list[str], where: str) -> None:
    """No named cell is empty, null or NaN: training would read it as the text 'None' or '', or as a class."""
    for column in columns:
        empty = [r for r in rows if _is_empty(r[column])]
        if empty:
            raise ConfigError(
                f"{where}: {len(empty)} of {len(rows)} rows have an empty, null or NaN {column!r} (e.g. "
                f"{_show(empty[0])}); fill those cells in or remove the rows"
            )


def _is_empty(value: Any) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, str):
        return not value.strip()
    return value is None or value == []


def _show(row: Row) -> str:
    text = repr(row)
    return text if len(text) <= 80 else text[:77] + "..."


def label_ids(split: Split, data: DataSection) -> tuple[list[Any], Split]:
    """The class list (data.labels, or the sorted labels seen) and the rows with labels mapped to ids."""
    column = data.label_column
    seen = {_label_key(r[column]) for rows in (split.train, split.eval) for r in rows}
    classes = list(data.labels) if data.labels is not None else sorted(seen, key=str)
    index = {_label_key(c): i for i, c in enumerate(classes)}
    mapped = []
    for rows in (split.train, split.eval):
        outside = sorted({str(r[column]) for r in rows if _label_key(r[column]) not in index})
        if outside:
            raise ConfigError(
                f"label(s) {outside[:5]} in column {column!r} are not in data.labels {classes}; add them to "
                "data.labels, or set data.other_labels = 'drop' to leave those rows out"
            )
        mapped.append([{**r, column: index[_label_key(r[column])]} for r in rows])
    if len(classes) < 2:
        raise ConfigError(
            f"column {column!r} holds only the class(es) {classes}; a classifier needs at least 2: check "
            "data.label_column, and data.labels with data.other_labels = 'drop'"
        )
    if not mapped[0]:
        raise ConfigError(f"no training row has a label in {classes}; check data.labels and data.label_column")
    present = {r[column] for r in mapped[0]}
    if len(present) < 2:
        raise ConfigError(
            f"every training row has the label {classes[present.pop()]!r} (of {classes}): a classifier learns nothing "
            f"from one class; give {data.path} rows of at least two classes (or raise data.max_samples)"
        )
    return classes, Split(*mapped)


def _label_key(value: Any) -> str:
    """Labels compare as text, so 1 in a CSV ('1') and 1 in a TOML list are the same class."""
    return str(value)


def batch_indices(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """The batches of one epoch for one rank: a permutation fixed by (seed, epoch), sharded by rank.

    Every rank gets the same number of batches (the tail that does not divide evenly is dropped) so DDP's
    all-reduce never waits on a rank that has run out.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    per_rank = len(order) // world
    mine = order[rank * per_rank : (rank + 1) * per_rank]
    n_batches = max(1, len(mine) // batch_size)
    return [mine[i * batch_size : (i + 1) * batch_size] for i in range(n_batches)]
