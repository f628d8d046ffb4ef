"""How every artifact reaches its place: whole or not at all.

A reader (Feast's folder reader, a resolver loading a bundle or an index, the README renderer)
must never see a half-written file or folder, and a killed writer must leave no temporary
behind. Both helpers write next to the target (same file system, so the final step is one
atomic rename) under a name starting with a dot, which Feast's and pyarrow's folder readers
skip. Standard library only, so the pipelines, the trainer's export, the index builder and the
benchmarks all use these two.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable


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


def swap_in_dir(tmp: Path, out_dir: Path) -> None:
    """Replace the folder ``out_dir`` by the finished folder ``tmp`` (written beside it): the
    old copy is renamed aside first and removed only after the new one is in place, so
    ``out_dir`` is at every moment either the whole old folder or the whole new one (absent
    for an instant between the two renames, never partial)."""
    old = temporary_sibling(out_dir)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
