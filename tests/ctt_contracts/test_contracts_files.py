"""Artifacts reach their place whole or not at all (ctt_contracts/files.py): a failed write
leaves the old file and no temporary; a folder swap leaves the whole new folder and nothing
beside it."""
from __future__ import annotations

import pytest

from ctt_contracts.files import atomic_write, replacing_dir, swap_in_dir


def test_atomic_write_replaces_the_file_and_a_failed_write_leaves_the_old_one(tmp_path):
    path = tmp_path / "out" / "results.json"
    atomic_write(path, lambda tmp: tmp.write_text("first"))
    assert path.read_text() == "first"

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "first"
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]


def test_swap_in_dir_puts_the_whole_new_folder_in_place_and_removes_the_old(tmp_path):
    out = tmp_path / "bundle"
    for content in ("old", "new"):
        tmp = tmp_path / f".{content}-tmp"
        tmp.mkdir()
        (tmp / "weights").write_text(content)
        if content == "new":
            (tmp / "manifest").write_text("m")
        swap_in_dir(tmp, out)
    assert sorted(p.name for p in out.iterdir()) == ["manifest", "weights"]
    assert (out / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_swap_in_dir_refuses_a_link_or_a_file_at_the_target(tmp_path):
    target = tmp_path / "real_bundle"
    target.mkdir()
    link, file = tmp_path / "bundle", tmp_path / "index"
    link.symlink_to(target, target_is_directory=True)
    file.write_text("not a folder")
    for out in (link, file):
        with pytest.raises(FileExistsError, match="not a folder"):
            with replacing_dir(out) as tmp:
                (tmp / "weights").write_text("new")
    assert link.is_symlink() and file.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "index", "real_bundle"]


def test_a_failed_replacing_dir_block_leaves_the_old_folder_and_no_temporary(tmp_path):
    out = tmp_path / "index"
    with replacing_dir(out) as tmp:
        (tmp / "item_ids.npy").write_text("old")
    with pytest.raises(RuntimeError, match="pickle"):
        with replacing_dir(out) as tmp:
            (tmp / "item_ids.npy").write_text("half")
            raise RuntimeError("the build wrote pickle files")
    assert (out / "item_ids.npy").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]
