"""Corrupt or hostile artifacts that tests/models/test_export.py and tests/serving do not cover.

Already covered there (not repeated): truncated weights, checksum mismatch, garbled manifest,
missing files, zero-byte garbage weights, wrong model dim, wrong item-embedding shape, an index
built for another model version / dim / catalog, corrupt or missing index files.

Added here, each with the manifest re-signed so the checksum gate passes and the next defence is
the one under test (an attacker or a buggy exporter writes consistent checksums too):
- a pickle (torch.save checkpoint) with a code payload saved as model.safetensors: refused, and
  the payload never runs (safetensors-only loading, no torch.load fallback);
- a pickled object array as item_embeddings.npy: refused, payload never runs (allow_pickle=False);
- a weights file with a NaN tensor, or item embeddings with NaN/inf rows (a diverged run):
  refused at load time with a BundleError naming the tensor / the rows.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from models.export import BundleError, export_bundle, load_bundle, sha256_file
from models.two_tower import ContextualTwoTower, ModelConfig
import ctt_contracts as C



class Payload:
    """Unpickling this creates a file: the observable proof that pickled code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture
def bundle(tmp_path) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(dim=16, n_layers=1, n_heads=2, max_len=8, item_buckets=256,
                      category_buckets=32, country_buckets=8, max_ctx=3, max_item_categories=4,
                      mlp_hidden=32)
    n = 30
    catalog = pd.DataFrame({C.ITEM_ID: np.arange(n, dtype=np.int64) + 1,
                            C.CATEGORY_IDS: [[1, 2]] * n, C.CATEGORY_WEIGHTS: [[0.6, 0.4]] * n,
                            C.ADVERTISER_ID: np.zeros(n, dtype=np.int64)})
    path = export_bundle(ContextualTwoTower(cfg).eval(), cfg, catalog, tmp_path / "bundle", "rel")
    assert load_bundle(path).model_version.startswith("rel-")  # the untouched bundle loads
    return path


def read_state(path: Path) -> dict:
    """The weights as owned tensors: load_file maps the file, and rewriting a mapped file in
    place kills the process with SIGBUS."""
    return {k: v.clone() for k, v in load_file(str(path / C.BUNDLE_WEIGHTS)).items()}


def resign(path: Path, name: str) -> None:
    """Make the manifest agree with the file now at `name` (and the version with the weights)."""
    manifest = json.loads((path / C.BUNDLE_MANIFEST).read_text())
    manifest["files"][name] = sha256_file(path / name)
    if name == C.BUNDLE_WEIGHTS:
        manifest[C.MODEL_VERSION] = "rel-" + manifest["files"][name][:8]
    (path / C.BUNDLE_MANIFEST).write_text(json.dumps(manifest))


def test_pickle_posing_as_safetensors_is_refused_and_never_executed(bundle, tmp_path):
    marker = tmp_path / "pwned"
    state = read_state(bundle)
    torch.save({**state, "__payload__": Payload(str(marker))}, bundle / C.BUNDLE_WEIGHTS)
    resign(bundle, C.BUNDLE_WEIGHTS)
    with pytest.raises(BundleError, match="unreadable safetensors"):
        load_bundle(bundle)
    assert not marker.exists(), "loading the bundle unpickled (executed) the weights file"


def test_pickled_npy_is_refused_and_never_executed(bundle, tmp_path):
    marker = tmp_path / "pwned"
    arr = np.empty(2, dtype=object)
    arr[0], arr[1] = Payload(str(marker)), Payload(str(marker))
    np.save(bundle / C.BUNDLE_ITEM_EMBEDDINGS, arr, allow_pickle=True)
    resign(bundle, C.BUNDLE_ITEM_EMBEDDINGS)
    # numpy's own refusal (ValueError) today; a BundleError wrapper would be equally fine
    with pytest.raises((BundleError, ValueError), match="allow_pickle|pickle"):
        load_bundle(bundle)
    assert not marker.exists(), "loading the bundle unpickled (executed) the embeddings file"


def test_non_finite_weights_are_refused_at_load_time(bundle):
    state = read_state(bundle)
    name = next(k for k, t in state.items() if t.is_floating_point() and t.numel() > 1)
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(bundle / C.BUNDLE_WEIGHTS))
    resign(bundle, C.BUNDLE_WEIGHTS)
    with pytest.raises(BundleError, match=rf"non-finite weights .*{re.escape(name)} \(\d+ NaN"):
        load_bundle(bundle)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_item_embeddings_are_refused_at_load_time(bundle, bad):
    emb = np.load(bundle / C.BUNDLE_ITEM_EMBEDDINGS)
    item_ids = np.load(bundle / C.BUNDLE_ITEM_IDS)
    emb[7, 3] = bad
    np.save(bundle / C.BUNDLE_ITEM_EMBEDDINGS, emb)
    resign(bundle, C.BUNDLE_ITEM_EMBEDDINGS)
    with pytest.raises(BundleError, match=rf"item_embeddings.*non-finite.*1 rows.*\[{item_ids[7]}\]"):
        load_bundle(bundle)


def test_the_payload_probe_is_live(tmp_path):
    """Guard: the payload really executes when unpickled, so 'not executed' above means something."""
    import pickle

    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(str(marker))))
    assert marker.exists()
