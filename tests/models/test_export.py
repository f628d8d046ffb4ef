"""Serving bundle: round trip gives the same outputs; corrupted bundles are refused."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from models.export import BundleError, export_bundle, load_bundle, make_model_version, sha256_file
from models.two_tower import ContextualTwoTower
import ctt_contracts as C


def catalog_frame(n=30):
    rng = np.random.default_rng(0)
    cats = [rng.choice(20, size=int(rng.integers(1, 4)), replace=False).tolist() for _ in range(n)]
    weights = [sorted(rng.uniform(0.1, 1, len(c)).tolist(), reverse=True) for c in cats]
    return pd.DataFrame({C.ITEM_ID: np.arange(n, dtype=np.int64) * 5 + 3, C.CATEGORY_IDS: cats,
                         C.CATEGORY_WEIGHTS: weights, C.ADVERTISER_ID: np.zeros(n, dtype=np.int64)})


@pytest.fixture
def bundle_dir(tmp_path, tiny_config):
    torch.manual_seed(0)
    cfg = tiny_config(fusion="cross_attention", state_len=2)
    model = ContextualTwoTower(cfg).eval()
    path = export_bundle(model, cfg, catalog_frame(), tmp_path / "bundle", "unit-run",
                         extra_manifest={"input_versions": {C.T_SEQUENCES: 3}})
    return path, model


def test_round_trip_gives_identical_outputs(bundle_dir, random_inputs):
    path, model = bundle_dir
    bundle = load_bundle(path)
    assert not bundle.model.training
    assert bundle.config == model.config
    assert bundle.model_version == f"unit-run-{sha256_file(path / C.BUNDLE_WEIGHTS)[:8]}"
    assert bundle.manifest["input_versions"] == {C.T_SEQUENCES: 3}
    assert bundle.manifest["state_dim"] == model.state_dim and bundle.manifest["n_items"] == 30
    x = random_inputs(model.config, batch=5)
    with torch.no_grad():
        assert torch.allclose(bundle.model(*x), model(*x), atol=1e-6)
        state = bundle.model.encode_user_state(x[0], x[1])
        assert torch.allclose(bundle.model.query_from_state(state, *x[2:]), model(*x), atol=1e-5)
    # the stored item embeddings are the item tower's output for the catalog, sorted by id
    catalog = catalog_frame()
    assert np.array_equal(bundle.item_ids, np.sort(catalog[C.ITEM_ID].to_numpy()))
    from models.data import build_catalog
    cat = build_catalog(catalog, model.config.max_item_categories)
    with torch.no_grad():
        expected = model.item_embeddings(cat.item_ids, cat.cat_ids, cat.cat_weights).numpy()
    np.testing.assert_allclose(bundle.item_embeddings, expected, atol=1e-6)


def test_re_export_replaces_the_bundle_and_version_tracks_weights(bundle_dir):
    path, model = bundle_dir
    first = load_bundle(path).model_version
    with torch.no_grad():
        model.pad_slot.add_(1.0)  # different weights ...
    export_bundle(model, model.config, catalog_frame(), path, "unit-run")
    assert load_bundle(path).model_version != first  # ... never share a version
    assert [p.name for p in path.parent.iterdir()] == ["bundle"]  # no temp folders left


def test_truncated_weights_are_refused(bundle_dir):
    path, _ = bundle_dir
    data = (path / C.BUNDLE_WEIGHTS).read_bytes()
    (path / C.BUNDLE_WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="sha256 .* does not match"):
        load_bundle(path)


def _rewrite_with_valid_checksums(path, name, content: bytes):
    (path / name).write_bytes(content)
    manifest = json.loads((path / C.BUNDLE_MANIFEST).read_text())
    manifest["files"][name] = sha256_file(path / name)
    (path / C.BUNDLE_MANIFEST).write_text(json.dumps(manifest))


def test_wrong_dim_is_refused_even_with_consistent_checksums(bundle_dir):
    path, model = bundle_dir
    cfg = json.loads((path / C.BUNDLE_CONFIG).read_text())
    cfg["dim"] = model.config.dim * 2
    _rewrite_with_valid_checksums(path, C.BUNDLE_CONFIG, json.dumps(cfg).encode())
    with pytest.raises(BundleError, match="config dims"):
        load_bundle(path)
    manifest = json.loads((path / C.BUNDLE_MANIFEST).read_text())
    manifest["dim"], manifest["state_dim"] = cfg["dim"], cfg["dim"] * cfg["state_len"]
    (path / C.BUNDLE_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="tensor shapes do not match"):
        load_bundle(path)


def test_wrong_item_embedding_shape_is_refused(bundle_dir, tmp_path):
    path, _ = bundle_dir
    emb = np.load(path / C.BUNDLE_ITEM_EMBEDDINGS)
    tmp = tmp_path / "e.npy"
    np.save(tmp, emb[:, :-1])
    _rewrite_with_valid_checksums(path, C.BUNDLE_ITEM_EMBEDDINGS, tmp.read_bytes())
    with pytest.raises(BundleError, match="expected float32"):
        load_bundle(path)


def test_manifest_checksum_mismatch_is_refused(bundle_dir):
    path, _ = bundle_dir
    manifest = json.loads((path / C.BUNDLE_MANIFEST).read_text())
    manifest["files"][C.BUNDLE_ITEM_IDS] = "0" * 64
    (path / C.BUNDLE_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=C.BUNDLE_ITEM_IDS):
        load_bundle(path)


def test_missing_or_garbled_files_are_refused(bundle_dir, tmp_path):
    path, _ = bundle_dir
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    (broken / C.BUNDLE_MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(broken)
    (path / C.BUNDLE_ITEM_IDS).unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(path)
    with pytest.raises(BundleError, match="not a bundle"):
        load_bundle(tmp_path / "nowhere")


def test_garbage_weights_with_valid_checksum_are_refused(bundle_dir):
    path, _ = bundle_dir
    _rewrite_with_valid_checksums(path, C.BUNDLE_WEIGHTS, b"\x00" * 64)
    manifest = json.loads((path / C.BUNDLE_MANIFEST).read_text())
    sha8 = manifest["files"][C.BUNDLE_WEIGHTS][:8]
    manifest[C.MODEL_VERSION] = f"unit-run-{sha8}"
    (path / C.BUNDLE_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="unreadable safetensors"):
        load_bundle(path)


def test_model_version_format():
    sha = "abcdef0123456789" * 4
    assert make_model_version("run", sha) == "run-abcdef01"
    assert make_model_version("run-abcdef01", sha) == "run-abcdef01"
    assert make_model_version(None, sha).endswith("Z-abcdef01")


def test_export_refuses_non_finite_weights_and_keeps_the_previous_bundle(bundle_dir):
    """A diverged run (NaN / inf parameter) must not replace a servable bundle with a broken one."""
    path, model = bundle_dir
    before = sha256_file(path / C.BUNDLE_WEIGHTS)
    name, param = next((n, p) for n, p in model.named_parameters() if p.ndim == 2)
    for bad in (float("nan"), float("inf")):
        with torch.no_grad():
            param[0, 0] = bad
        with pytest.raises(BundleError, match=f"non-finite weights.*{name}"):
            export_bundle(model, model.config, catalog_frame(), path, "unit-run")
        assert sha256_file(path / C.BUNDLE_WEIGHTS) == before  # the old bundle is untouched
        assert [p.name for p in path.parent.iterdir()] == ["bundle"]  # nothing half-written
        load_bundle(path)
