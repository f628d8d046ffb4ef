"""The bundle's manifest: read and verified without torch.

Why apart from models/export.py: a job that only needs to know WHICH model a bundle is (the
refresh's version guards) must not load torch and the weights for it, and must still refuse a
bundle whose files do not match their checksums before doing any work. ``load_bundle`` starts
with the same :func:`verified_manifest`.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Dict

import ctt_contracts as C

HASHED_FILES = (C.BUNDLE_WEIGHTS, C.BUNDLE_CONFIG, C.BUNDLE_ITEM_IDS, C.BUNDLE_ITEM_EMBEDDINGS)
_VERSION_SUFFIX = re.compile(r"-[0-9a-f]{8}$")


class BundleError(RuntimeError):
    """A bundle is incomplete, corrupted or inconsistent; the message says which file and why."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(path: Path) -> Dict[str, Any]:
    file = path / C.BUNDLE_MANIFEST
    if not file.is_file():
        raise BundleError(f"{path}: no {C.BUNDLE_MANIFEST}; not a bundle")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"{file}: not valid JSON ({err})") from err
    for key in (C.MODEL_VERSION, "files", "dim", "state_dim", "n_items"):
        if key not in manifest:
            raise BundleError(f"{file}: missing key {key!r}")
    return manifest


def refuse_unlisted(path: Path) -> None:
    """A bundle holds exactly the manifest and the files it hashes; anything else (a dropped-in
    pickle above all) is refused before any file is read, so nothing foreign is ever loaded."""
    extra = sorted(p.name for p in path.iterdir() if p.name not in HASHED_FILES + (C.BUNDLE_MANIFEST,))
    if extra:
        raise BundleError(f"{path}: files not listed in the manifest: {extra[:10]}; refused (a "
                          f"bundle holds only {C.BUNDLE_MANIFEST} and {list(HASHED_FILES)}, and "
                          f"nothing in it is ever unpickled)")


def verify_checksums(path: Path, manifest: Dict[str, Any]) -> None:
    for name in HASHED_FILES:
        expected = manifest["files"].get(name)
        if expected is None:
            raise BundleError(f"{path}: manifest has no checksum for {name}")
        if not (path / name).is_file():
            raise BundleError(f"{path}: missing {name}")
        actual = sha256_file(path / name)
        if actual != expected:
            raise BundleError(f"{path / name}: sha256 {actual[:12]}... does not match the manifest's "
                              f"{expected[:12]}... (truncated, corrupted or swapped file)")


def verified_manifest(path: Path | str) -> Dict[str, Any]:
    """The manifest of a bundle whose files are exactly the listed ones with their checksums,
    and whose model_version ends with the weights' sha8; else ``BundleError``."""
    path = Path(path)
    manifest = read_manifest(path)
    refuse_unlisted(path)
    verify_checksums(path, manifest)
    version = manifest[C.MODEL_VERSION]
    if not _VERSION_SUFFIX.search(version) or not manifest["files"][C.BUNDLE_WEIGHTS].startswith(version[-8:]):
        raise BundleError(f"{path}: model_version {version!r} does not end with the weights' sha8")
    return manifest
