"""Fuzzing the files lorakit reads and writes (issue 8): every generated adapter_config.json and every mutated
safetensors file gives a loaded adapter or one LorakitError, never another exception or a hang; a save killed at a
random moment leaves the folder wholly old or wholly new. benchmarks/fuzz_files.py runs many more cases."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from tests import fuzzing

FAST = settings(
    max_examples=60, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
)  # deadline: the per-case alarm in fuzzing.outcome catches hangs; derandomize keeps CI reproducible


@FAST
@given(content=fuzzing.config_files())
def test_any_adapter_config_loads_or_is_one_clear_error(content):
    with tempfile.TemporaryDirectory() as folder:
        result = fuzzing.load_config_case(Path(folder), content)
    assert not result.startswith("BUG"), (result, content)


_ORIGINAL: dict[str, bytes] = {}


def _original_weights() -> bytes:
    if not _ORIGINAL:
        with tempfile.TemporaryDirectory() as folder:
            _ORIGINAL["bytes"] = fuzzing.reference_adapter(Path(folder))
    return _ORIGINAL["bytes"]


@FAST
@given(content=fuzzing.weight_files(_original_weights()))
def test_any_mutated_weights_file_loads_or_is_one_clear_error(content):
    with tempfile.TemporaryDirectory() as folder:
        fuzzing.reference_adapter(Path(folder))
        result = fuzzing.load_weights_case(Path(folder), content)
    assert not result.startswith("BUG"), result


@pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked child")
def test_kills_during_save_leave_the_folder_wholly_old_or_wholly_new(tmp_path):
    folder = tmp_path / "adapter"
    records = fuzzing.kill_during_saves(folder, kills=8, seed=1)
    assert all(r["ok"] for r in records), [r for r in records if not r["ok"]]
    assert all(len(r["leftovers"]) <= 1 for r in records)  # a kill leaves at most its own stage folder
    assert any(not r["finished"] for r in records), "no kill landed during a save"
    fuzzing.big_adapters()[8.0].save_pretrained(folder)
    assert fuzzing.leftovers(folder) == []  # the next save cleans up what the kills left


@pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked child")
def test_kills_during_the_in_place_fallback_never_load_a_mix_in_lorakit(tmp_path):
    """Where folders cannot be swapped, lorakit reads old or new or refuses the marked folder; never a mix."""
    records = fuzzing.kill_during_saves(tmp_path / "adapter", kills=6, seed=2, in_place=True)
    assert all(r["lorakit"] in ("old", "new", "refused: AdapterFileError") for r in records), records
