"""save_pretrained changes an adapter folder as a whole, keeps what else the folder holds, and says clearly when
it cannot write. (Kills at random moments: tests/test_fuzz_files.py.)"""

from __future__ import annotations

import json
import os
import stat
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

from lorakit import AdapterFileError, LoraConfig, LoraModel, atomic, get_lora_model
from lorakit.card import CARD_NAME
from lorakit.io import CONFIG_NAME, LORAKIT_CONFIG_NAME, WEIGHTS_NAME
from tests.cases import mlp


def _model(alpha: float = 8, variant: str = "lora", seed: int = 0) -> LoraModel:
    torch.manual_seed(seed)
    config = LoraConfig(r=2, lora_alpha=alpha, target_modules=["lin0"], init_lora_weights=False, variant=variant)
    return get_lora_model(mlp(), config)


def _alpha(folder) -> float:
    return json.loads((folder / CONFIG_NAME).read_text())["lora_alpha"]


def test_save_over_a_folder_keeps_its_other_entries(tmp_path):
    """PEFT's layout keeps other adapters in subfolders of the default one; a user may keep a README there."""
    target = tmp_path / "out"
    _model(alpha=4, variant="lora_fa").save_pretrained(target)
    (target / "README.md").write_text("mine")
    (target / "french").mkdir()
    (target / "french" / "notes.txt").write_text("nested")
    os.symlink("README.md", target / "link")
    _model(alpha=16).save_pretrained(target)
    assert _alpha(target) == 16
    assert (target / "README.md").read_text() == "mine" and (target / "french" / "notes.txt").read_text() == "nested"
    assert os.readlink(target / "link") == "README.md"
    assert not (target / LORAKIT_CONFIG_NAME).exists()  # the old LoRA-FA setting does not outlive its save
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_several_adapters_in_peft_layout(tmp_path):
    model = _model(alpha=4)
    model.add_adapter("french", LoraConfig(r=3, lora_alpha=6, target_modules=["lin1"]))
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # the default adapter's swap keeps the french subfolder
    assert _alpha(tmp_path) == 4 and _alpha(tmp_path / "french") == 6
    assert LoraModel.from_pretrained(mlp(), tmp_path / "french", adapter_name="french").peft_config["french"].r == 3


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        _model().save_pretrained(tmp_path / "new")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o777 & ~umask
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert stat.S_IMODE((tmp_path / "new" / name).stat().st_mode) == 0o666 & ~umask


def test_an_existing_folder_keeps_its_mode(tmp_path):
    (tmp_path / "out").mkdir(mode=0o700)
    os.chmod(tmp_path / "out", 0o700)
    _model().save_pretrained(tmp_path / "out")
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o700


def test_a_file_in_the_way_is_refused(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(AdapterFileError, match="exists and is not a folder"):
        _model().save_pretrained(tmp_path / "out")
    with pytest.raises(AdapterFileError, match="cannot save into"):
        _model().save_pretrained(tmp_path / "out" / "below")
    assert (tmp_path / "out").read_text() == "not a folder"


def test_a_dangling_symlink_is_refused(tmp_path):
    os.symlink(tmp_path / "gone", tmp_path / "out")
    with pytest.raises(AdapterFileError, match="does not exist"):
        _model().save_pretrained(tmp_path / "out")
    assert not (tmp_path / "gone").exists()


def test_a_symlinked_folder_is_replaced_where_it_lives(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    _model(alpha=12).save_pretrained(tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and _alpha(tmp_path / "real") == 12


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused(tmp_path):
    _model(alpha=4).save_pretrained(tmp_path / "out")
    os.chmod(tmp_path, 0o555)
    os.chmod(tmp_path / "out", 0o555)
    try:
        with pytest.raises(AdapterFileError, match="Permission denied"):
            _model(alpha=16).save_pretrained(tmp_path / "out")
    finally:
        os.chmod(tmp_path, 0o755)
        os.chmod(tmp_path / "out", 0o755)
    assert _alpha(tmp_path / "out") == 4


def test_no_write_permission_anywhere_is_one_clear_error(tmp_path, monkeypatch):
    """What a read-only folder does for a user who is not root: the stage and the in-place files both fail."""
    _model(alpha=4).save_pretrained(tmp_path / "out")

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(atomic.os, "mkdir", denied)
    monkeypatch.setattr(atomic, "open", denied, raising=False)
    with pytest.raises(AdapterFileError, match="Permission denied"):
        _model(alpha=16).save_pretrained(tmp_path / "out")
    assert _alpha(tmp_path / "out") == 4


def test_leftovers_of_killed_saves_are_removed(tmp_path):
    target = tmp_path / "out"
    _model(alpha=4).save_pretrained(target)
    (tmp_path / ".out.lorakit-new-0badf00d").mkdir()
    (tmp_path / ".out.lorakit-new-0badf00d" / WEIGHTS_NAME).write_bytes(b"x" * 1000)
    (tmp_path / ".out.lorakit-old-12345678").mkdir()
    (target / f".{WEIGHTS_NAME}.abc123.tmp").write_bytes(b"x")  # what lorakit 0.1's saves left behind
    _model(alpha=16).save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in target.iterdir()) == [CARD_NAME, CONFIG_NAME, WEIGHTS_NAME]


def test_a_save_killed_between_the_aside_renames_gets_its_folder_back(tmp_path):
    """Without renameat2 the old folder is renamed aside first; a kill then leaves no folder at the target."""
    _model(alpha=4).save_pretrained(tmp_path / "out")
    os.rename(tmp_path / "out", tmp_path / ".out.lorakit-old-0000aaaa")
    atomic.clean_leftovers(tmp_path / "out", set())
    assert _alpha(tmp_path / "out") == 4


def test_without_renameat2_the_aside_swap_gives_the_same_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_libc", lambda: None)
    _model(alpha=4).save_pretrained(tmp_path / "out")
    (tmp_path / "out" / "README.md").write_text("mine")
    _model(alpha=16).save_pretrained(tmp_path / "out")
    assert _alpha(tmp_path / "out") == 16 and (tmp_path / "out" / "README.md").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_in_place_fallback_and_its_marker(tmp_path, monkeypatch):
    """Where folders cannot be swapped (a mount point) files are replaced one by one inside a marker's lifetime."""
    target = tmp_path / "out"
    _model(alpha=4).save_pretrained(target)
    monkeypatch.setattr(atomic, "_swap", lambda stage, target: False)
    _model(alpha=16).save_pretrained(target)
    assert _alpha(target) == 16 and sorted(p.name for p in target.iterdir()) == [CARD_NAME, CONFIG_NAME, WEIGHTS_NAME]
    (target / atomic.IN_PROGRESS).write_bytes(b"")  # as a kill during the one-by-one replacement leaves it
    with pytest.raises(AdapterFileError, match="was being saved"):
        LoraModel.from_pretrained(mlp(), target)
    _model(alpha=32).save_pretrained(target)
    assert not (target / atomic.IN_PROGRESS).exists()
    assert LoraModel.from_pretrained(mlp(), target).peft_config["default"].lora_alpha == 32


def test_saving_into_the_working_folder(tmp_path, monkeypatch):
    """save_pretrained(".") works as in PEFT; the process then stands in the new folder, not the removed one."""
    monkeypatch.chdir(tmp_path)
    _model(alpha=4).save_pretrained(".")
    _model(alpha=16).save_pretrained(".")
    assert _alpha(tmp_path) == 16 and os.path.samefile(os.getcwd(), tmp_path)


@pytest.mark.parametrize("variant", ["lora_fa", "delta_lora"])
def test_lorakit_settings_live_in_their_own_file_so_peft_reads_silently(tmp_path, variant):
    model = _model(variant=variant)
    model.save_pretrained(tmp_path)
    assert "variant" not in json.loads((tmp_path / CONFIG_NAME).read_text())
    assert json.loads((tmp_path / LORAKIT_CONFIG_NAME).read_text()) == {"variant": variant}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(mlp(), tmp_path)
    assert not [w for w in caught if "nexpected" in str(w.message)], [str(w.message) for w in caught]
    x = torch.randn(3, 6)
    torch.testing.assert_close(theirs(x), model(x))
    assert LoraModel.from_pretrained(mlp(), tmp_path).peft_config["default"].variant == variant


def test_folders_with_variant_in_adapter_config_still_load(tmp_path):
    """lorakit 0.1 wrote the variant into adapter_config.json."""
    model = _model(variant="delta_lora")
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / CONFIG_NAME).read_text()) | {"variant": "delta_lora"}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    (tmp_path / LORAKIT_CONFIG_NAME).unlink()
    back = LoraModel.from_pretrained(mlp(), tmp_path)
    assert back.peft_config["default"].variant == "delta_lora"
    assert "base_model.model.lin0.base_layer.weight" in load_file(tmp_path / WEIGHTS_NAME)


def test_a_folder_too_big_to_carry_is_replaced_in_place(tmp_path, monkeypatch):
    """save_pretrained(".") in a project tree: its files are not linked one by one into a new folder."""
    target = tmp_path / "project"
    _model(alpha=4).save_pretrained(target)
    for i in range(3):
        (target / f"source_{i}.py").write_text("x")
    inode = target.stat().st_ino
    monkeypatch.setattr(atomic, "_MAX_CARRIED", 2)
    _model(alpha=16).save_pretrained(target)
    assert target.stat().st_ino == inode and _alpha(target) == 16  # the same folder, new files
    assert sorted(p.name for p in target.iterdir())[:3] == [CARD_NAME, CONFIG_NAME, WEIGHTS_NAME]


def test_a_swap_gives_a_new_folder(tmp_path):
    target = tmp_path / "out"
    _model(alpha=4).save_pretrained(target)
    inode = target.stat().st_ino
    _model(alpha=16).save_pretrained(target)
    assert target.stat().st_ino != inode and _alpha(target) == 16
