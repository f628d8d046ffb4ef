"""How every artifact reaches its place: whole or not at all.

A reader (Feast's folder reader, a resolver loading a bundle or an index, the README renderer)
must never see a half-written file or folder. The helpers write next to the target (same file
system, so the final step is one atomic rename) under a fresh name starting with a dot, which
Feast's and pyarrow's folder readers skip and two concurrent writers never share; a writer that
fails removes its temporary, one killed outright leaves only such a hidden temporary. Standard
library only, so the pipelines, the trainer's export, the index builder and the benchmarks all
use them.
"""
from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def temporary_sibling(path: Path) -> Path:
    """A fresh hidden name beside ``path`` (same folder, so a rename to ``path`` is atomic)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` writes the whole file at a temporary sibling, which then replaces
    ``path`` in one rename; on any failure the temporary is removed and ``path`` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def replacing_dir(out_dir: Path) -> Iterator[Path]:
    """``with replacing_dir(out) as tmp:`` write a whole artifact into ``tmp``, a fresh empty
    hidden folder beside ``out``; when the block ends normally it replaces ``out``
    (:func:`swap_in_dir`), and in every case nothing of ``tmp`` is left behind."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(out_dir)
    tmp.mkdir()
    try:
        yield tmp
        swap_in_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def swap_in_dir(tmp: Path, out_dir: Path) -> None:
    """Replace the folder ``out_dir`` by the finished folder ``tmp`` (written beside it): the
    old copy is renamed aside first and removed only after the new one is in place, so
    ``out_dir`` is at every moment either the whole old folder or the whole new one (absent
    for an instant between the two renames, never partial). A symbolic link or a file at
    ``out_dir`` is refused (replacing a link would leave its target stale). If the new folder
    cannot be put in place (another writer's folder took the name meanwhile), the old one goes
    back where the name is free, else it is removed (the other writer's stands)."""
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        kind = "a symbolic link" if out_dir.is_symlink() else "a file"
        raise FileExistsError(f"{out_dir} is {kind}, not a folder: refusing to replace it")
    old = temporary_sibling(out_dir)
    moved = out_dir.exists()
    if moved:
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except OSError:
        if moved and not out_dir.exists():
            os.replace(old, out_dir)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
