"""NumpyHead: the same function as the model's torch ``query_from_state``, on exported bundles
and on a bundle trained by the project's trainer.

Every configuration the head supports is exported with models.export and loaded back with
load_bundle (safetensors round trip), then compared with the torch head within 1e-5 on batches
that cover cold start (state None), padded and empty contexts, subject items (known, unknown =
zero row, absent) and every demographic bucket. Weights are redrawn with a large spread before
export so that no parameter sits at an initial value that would hide a missing term (zero biases,
skip scales of exactly 1, zero query bias of the cross-attention).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from conftest import NO_STATE_USER, tiny_catalog, tiny_config

from models.export import export_bundle, load_bundle
import ctt_contracts as C
from serving.head import NumpyHead
from serving.resolver import HEAD_TORCH, Resolver

TOL = 1e-5
VARIANTS = {
    "concat": {},
    "cross_attention_m3": {"fusion": "cross_attention", "state_len": 3},
    "subject_skip": {"use_subject_item": True, "tower_skip": True},
    "cross_subject_skip": {"fusion": "cross_attention", "state_len": 2, "use_subject_item": True,
                           "tower_skip": True},
    "no_demographics": {"use_demographics": False},
    "residual": {"fusion_residual": True},
    "cross_residual_m2": {"fusion": "cross_attention", "state_len": 2, "fusion_residual": True},
    "sequence_only": {"use_context": False, "use_demographics": False},
    "sasrec_like": {"use_context": False, "use_demographics": False, "fusion": "identity",
                    "item_tower": "embedding", "use_item_categories": False},
}


def _export(tmp_path, overrides: dict, seed: int = 0):
    import dataclasses

    config = dataclasses.replace(tiny_config(), **overrides)
    torch.manual_seed(seed)
    from models.two_tower import ContextualTwoTower

    model = ContextualTwoTower(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.4)
    path = export_bundle(model, config, tiny_catalog(300, seed=seed), tmp_path / "bundle", "head")
    return load_bundle(path)


def _inputs(bundle, batch: int, seed: int):
    cfg = bundle.config
    rng = np.random.default_rng(seed)
    state = rng.normal(0, 1, (batch, cfg.state_dim)).astype(np.float32)
    n_ctx = rng.integers(0, cfg.max_ctx + 1, batch)  # 0 = no context at all
    ids = np.full((batch, cfg.max_ctx), -1, dtype=np.int64)
    w = np.zeros((batch, cfg.max_ctx), dtype=np.float32)
    for b, n in enumerate(n_ctx):
        ids[b, :n] = rng.integers(0, 2**31 - 1, n)  # the whole int32 id range
        raw = rng.uniform(0.05, 1.0, n)
        w[b, :n] = raw / raw.sum() if n else raw
    age = rng.integers(0, C.AGE_BUCKETS, batch)
    country = rng.integers(0, cfg.country_buckets, batch)
    gender = rng.integers(0, len(C.GENDERS), batch)
    subject = bundle.item_embeddings[rng.integers(0, len(bundle.item_ids), batch)].copy()
    subject[: batch // 4] = 0.0  # an item outside the catalog: the resolver's zero row
    return state, ids, w, age, country, gender, subject


def _torch(bundle, state: Optional[np.ndarray], *rest) -> np.ndarray:
    t = [None if x is None else torch.from_numpy(np.ascontiguousarray(x)) for x in rest]
    with torch.no_grad():
        return bundle.model.query_from_state(
            None if state is None else torch.from_numpy(state), *t).numpy()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_numpy_head_matches_query_from_state(tmp_path, variant):
    bundle = _export(tmp_path, VARIANTS[variant])
    head = NumpyHead(bundle.model)
    state, ids, w, age, country, gender, subject = _inputs(bundle, 64, seed=1)
    for st in (state, None):  # with a cached state, and the learned cold-start state
        for subj in (subject, None):
            want = _torch(bundle, st, ids, w, age, country, gender, subj)
            got = head.query(st, ids, w, age, country, gender, subj)
            assert got.shape == want.shape == (64, bundle.config.dim)
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    one = head.query(state[:1], ids[:1], w[:1], age[:1], country[:1], gender[:1], subject[:1])
    np.testing.assert_allclose(one, _torch(bundle, state[:1], ids[:1], w[:1], age[:1], country[:1],
                                           gender[:1], subject[:1]), atol=TOL, rtol=0)


def test_numpy_head_refuses_what_the_torch_head_refuses(tmp_path):
    bundle = _export(tmp_path, {})
    head = NumpyHead(bundle.model)
    state, ids, w, age, country, gender, _ = _inputs(bundle, 4, seed=2)
    with pytest.raises(ValueError, match="state must be"):
        head.query(state[:, :-1], ids, w, age, country, gender)
    with pytest.raises(ValueError, match="uses context"):
        head.query(state, None, None, age, country, gender)
    with pytest.raises(ValueError, match="uses demographics"):
        head.query(state, ids, w, None, None, None)
    with pytest.raises(ValueError, match="batch size"):
        head.query(None, None, None, None, None, None)


def test_resolver_numpy_head_matches_its_torch_head(serving_env, resolver):
    """The served query vectors (Feast read, context projection, demographics) are the same with
    either head, for users with a state, without one, with and without a subject item."""
    torch_resolver = Resolver.from_paths(serving_env.bundle_dir, serving_env.index_dir,
                                         serving_env.repo_dir, head=HEAD_TORCH)
    assert resolver.version()["head"] == "numpy" and torch_resolver.version()["head"] == "torch"
    items = serving_env.catalog[C.ITEM_ID].to_numpy()
    cases = [(1, {}), (2, {"subject_item_id": int(items[5])}),
             (NO_STATE_USER, {"subject_item_id": int(items[9])}),
             (4, {"categories": [(3, 0.6), (9, 0.4)], "demographics": {C.COUNTRY: "FR"}})]
    for user, kw in cases:
        got = resolver.query_embedding(user, **kw)
        want = torch_resolver.query_embedding(user, **kw)
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)



@pytest.fixture(scope="module")
def trained_bundle(tmp_path_factory):
    """A bundle trained by the project's trainer (configs/test_tiny.yaml: 2 short epochs on the
    pandas-built synthetic lake), with the subject item and the tower skip paths switched on."""
    from models.cli import train_main
    from synthetic_lake import FixtureSpec, write_lake

    root = tmp_path_factory.mktemp("trained_head")
    write_lake(root / "lake", FixtureSpec())
    config = Path(__file__).resolve().parents[2] / "configs" / "test_tiny.yaml"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        summary = train_main(["--config", str(config), "--data.lake_root", str(root / "lake"),
                              "--out-dir", str(root / "run"), "--run-name", "head",
                              "--model.model_config.use_subject_item", "true",
                              "--model.model_config.tower_skip", "true"])
    return load_bundle(summary["bundle"])


def test_numpy_head_matches_a_trained_bundle(trained_bundle):
    bundle = trained_bundle
    assert bundle.config.use_subject_item and bundle.config.tower_skip
    assert float(bundle.model.user_skip) != 1.0  # trained away from its initial value
    head = NumpyHead(bundle.model)
    state, ids, w, age, country, gender, subject = _inputs(bundle, 128, seed=5)
    for st in (state, None):
        want = _torch(bundle, st, ids, w, age, country, gender, subject)
        np.testing.assert_allclose(head.query(st, ids, w, age, country, gender, subject), want,
                                   atol=TOL, rtol=0)
