"""No pickle anywhere on the load path: a code payload planted in any artifact folder never runs.

The payload is a pickle whose __reduce__ creates a marker file: if anything unpickles it, the
marker exists. It is planted (a) as a file the manifest does not list, (b) with the manifest
re-signed to list it (what a buggy exporter or an attacker with write access produces), in the
bundle folder, the index folder and the index's ScaNN folder. Each load goes through the real
entry point (`Resolver.from_paths`, what ctt-serve calls) and must be refused with an error that
names the file, the marker never appearing. ScaNN's own `load_searcher` DOES run the payload
(`test_scanns_own_loader_would_run_the_payload`): that is the hazard the loader avoids.
"""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.export import BundleError, load_bundle, sha256_file
import ctt_contracts as C
from serving.errors import IndexMismatchError
from serving.index import SCANN_ASSETS, _load_scann, load_index, shard_dir
from serving.resolver import Resolver

SCANN_DOCIDS = "scann_docids.pkl"  # the file scann_ops_pybind.load_searcher unpickles if present


class Payload:
    """Unpickling this creates `marker`; the pickle references Path.touch, not this class."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def payload(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker))


def pickled_npy(path: Path, marker: Path) -> None:
    """An .npy holding an object array whose element is the payload (np.save pickles it)."""
    arr = np.empty(1, dtype=object)
    arr[0] = Payload(marker)
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=True)


@pytest.fixture
def artifacts(serving_env, tmp_path):
    """Private copies of the session's bundle and ScaNN index (the session copies stay clean)."""
    bundle = shutil.copytree(serving_env.bundle_dir, tmp_path / "bundle")
    index = shutil.copytree(serving_env.index_dir, tmp_path / "index")
    return Path(bundle), Path(index)


def _load(bundle: Path, index: Path, serving_env) -> Resolver:
    return Resolver.from_paths(bundle, index, serving_env.repo_dir)


def _list_in_index_manifest(index: Path, rel: str) -> None:
    manifest = json.loads((index / C.INDEX_MANIFEST).read_text())
    manifest["files_sha256"][rel] = sha256_file(index / rel)
    (index / C.INDEX_MANIFEST).write_text(json.dumps(manifest))


def _list_in_bundle_manifest(bundle: Path, name: str) -> None:
    manifest = json.loads((bundle / C.BUNDLE_MANIFEST).read_text())
    manifest["files"][name] = sha256_file(bundle / name)
    (bundle / C.BUNDLE_MANIFEST).write_text(json.dumps(manifest))


def test_the_payload_probe_is_live(tmp_path):
    """Guard: the payload really runs when unpickled, so 'marker absent' below means something."""
    marker = tmp_path / "ran"
    pickle.loads(payload(marker))
    assert marker.exists()


def test_untouched_artifacts_load(artifacts, serving_env):
    bundle, index = artifacts
    resolver = _load(bundle, index, serving_env)
    assert resolver.index.backend == "scann"
    np.testing.assert_array_equal(resolver.index.item_ids, np.load(index / C.INDEX_ITEM_IDS))


@pytest.mark.parametrize("folder", ["index", "index/scann"])
@pytest.mark.parametrize("signed", [False, True], ids=["unlisted", "listed_in_manifest"])
def test_pickle_in_the_index_is_refused_and_never_runs(artifacts, serving_env, tmp_path, folder,
                                                      signed):
    bundle, index = artifacts
    target = tmp_path / folder / SCANN_DOCIDS
    marker = tmp_path / "pwned"
    target.write_bytes(payload(marker))
    if signed:
        _list_in_index_manifest(index, target.relative_to(index).as_posix())
    with pytest.raises(IndexMismatchError, match=rf"pickle files .*{SCANN_DOCIDS}.*refused"):
        _load(bundle, index, serving_env)
    assert not marker.exists(), "loading the index unpickled (executed) the planted file"


@pytest.mark.parametrize("signed", [False, True], ids=["unlisted", "listed_in_manifest"])
def test_pickle_in_the_bundle_is_refused_and_never_runs(artifacts, serving_env, tmp_path, signed):
    bundle, index = artifacts
    marker = tmp_path / "pwned"
    (bundle / "extra_state.pkl").write_bytes(payload(marker))
    if signed:
        _list_in_bundle_manifest(bundle, "extra_state.pkl")
    with pytest.raises(BundleError, match=r"not listed in the manifest: \['extra_state.pkl'\]"):
        _load(bundle, index, serving_env)
    assert not marker.exists(), "loading the bundle unpickled (executed) the planted file"


@pytest.mark.parametrize("where", ["bundle", "index", "index/scann"])
def test_any_unlisted_file_is_refused(artifacts, serving_env, tmp_path, where):
    """Not only pickles: a folder holding more than its build wrote is not loaded at all."""
    bundle, index = artifacts
    (tmp_path / where / "notes.txt").write_text("left here by someone")
    error = BundleError if where == "bundle" else IndexMismatchError
    with pytest.raises(error, match=r"not (list|listed in the manifest).*notes\.txt"):
        _load(bundle, index, serving_env)


@pytest.mark.parametrize("where", ["index", "bundle"])
def test_pickled_item_ids_are_refused_and_never_run(artifacts, serving_env, tmp_path, where):
    """The index's own doc-id file, or the bundle's item_ids.npy, swapped for a pickled object
    array with the manifest re-signed: np.load with allow_pickle=False refuses it."""
    bundle, index = artifacts
    marker = tmp_path / "pwned"
    if where == "index":
        pickled_npy(index / C.INDEX_ITEM_IDS, marker)
        _list_in_index_manifest(index, C.INDEX_ITEM_IDS)
        error, match, load = IndexMismatchError, "not a plain int64 array.*allow_pickle", \
            lambda: _load(bundle, index, serving_env)
    else:
        pickled_npy(bundle / C.BUNDLE_ITEM_IDS, marker)
        _list_in_bundle_manifest(bundle, C.BUNDLE_ITEM_IDS)
        error, match, load = ValueError, "allow_pickle", lambda: load_bundle(bundle)
    with pytest.raises(error, match=match):
        load()
    assert not marker.exists()


def test_scanns_own_loader_would_run_the_payload(artifacts, tmp_path):
    """The hazard, and the proof that the loader does not go through it: on the same folder
    scann.load_searcher unpickles scann_docids.pkl (marker appears); our ScaNN loader, with the
    folder checks out of the way, builds a working searcher and never reads the file."""
    import scann

    _, index = artifacts
    scann_dir = index / shard_dir(0)
    manifest = json.loads((index / C.INDEX_MANIFEST).read_text())
    ours_marker, theirs_marker = tmp_path / "ours", tmp_path / "theirs"

    (scann_dir / SCANN_DOCIDS).write_bytes(payload(ours_marker))
    searcher = _load_scann(index, shard_dir(0), manifest["files_sha256"])
    assert not ours_marker.exists()
    assert searcher.size() == manifest["n_items"] and searcher.docids is None

    (scann_dir / SCANN_DOCIDS).write_bytes(payload(theirs_marker))
    scann.scann_ops_pybind.load_searcher(str(scann_dir))
    assert theirs_marker.exists(), "scann's loader ran the planted pickle"


def test_scann_assets_cannot_point_outside_the_folder(artifacts, serving_env):
    """scann_assets.pbtxt names the files ScaNN's C++ reads; one naming a path outside the index
    (manifest re-signed) is refused before ScaNN opens anything."""
    bundle, index = artifacts
    assets = index / shard_dir(0) / SCANN_ASSETS
    text = assets.read_text()
    assert '"dataset.npy"' in text
    assets.write_text(text.replace('"dataset.npy"', '"../../bundle/item_embeddings.npy"'))
    _list_in_index_manifest(index, f"{shard_dir(0)}/{SCANN_ASSETS}")
    with pytest.raises(IndexMismatchError, match="not a file of this index"):
        load_index(index, serving_env.model_version, *_catalog(bundle))


def _catalog(bundle: Path):
    b = load_bundle(bundle)
    return b.item_ids, b.item_embeddings
