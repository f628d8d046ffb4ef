"""Serving fixtures: a real tiny bundle (models.export), a real ScaNN index and a real Feast repo
with a SQLite online store in a temp folder: the production declarations of
feature_repo/definitions.py, their sources pointed (through ``CTT_LAKE``) at Parquet snapshots
written in the temp folder, filled by ``materialize`` as in production.

The model is untrained (seeded random init): serving parity is a property of the code path, not
of the weights. The catalog is just above BRUTE_FORCE_MAX_ITEMS so the index is a real ScaNN tree.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pandas as pd
import pytest
import torch

import ctt_contracts as C

N_ITEMS = 2500
N_USERS = 40  # users 1..N_USERS have a state; see the special ids below
STALE_USER = 900  # state written by another model version
NO_STATE_USER = 901  # profile but no state: cold start
UNKNOWN_ITEM = 7  # never written to item_categories
STALE_VERSION = "older-run-deadbeef"
STATE_AGE = timedelta(hours=5)


@dataclass
class ServingEnv:
    bundle_dir: Path
    index_dir: Path
    repo_dir: Path
    model_version: str
    catalog: pd.DataFrame
    users: pd.DataFrame
    histories: Dict[int, Tuple[np.ndarray, np.ndarray]]  # user -> (item_ids, event_ts)
    state_ts: datetime  # when the stored user states say they were computed (now - STATE_AGE)


def tiny_config():
    from models.two_tower import ModelConfig

    return ModelConfig(dim=16, n_layers=1, n_heads=2, max_len=12, item_buckets=1024,
                       category_buckets=128, n_hashes=2, country_buckets=16, max_ctx=4,
                       max_item_categories=5, mlp_hidden=32, dropout=0.0)


def tiny_catalog(n_items: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    cats: List[List[int]] = []
    weights: List[List[float]] = []
    for _ in range(n_items):
        k = int(rng.integers(1, 6))
        cats.append(rng.choice(60, size=k, replace=False).astype(np.int32).tolist())
        weights.append(np.sort(rng.uniform(0.05, 1.0, k))[::-1].astype(np.float32).tolist())
    return pd.DataFrame({C.ITEM_ID: np.arange(n_items, dtype=np.int64) * 3 + 100,
                         C.CATEGORY_IDS: cats, C.CATEGORY_WEIGHTS: weights,
                         C.ADVERTISER_ID: rng.integers(0, 20, n_items).astype(np.int64)})


def feast_definitions(lake: Path):
    """The production Feast objects (feature_repo/definitions.py), their sources on the Parquet
    snapshots under ``lake`` (the folder its ``CTT_LAKE`` names)."""
    from pipelines import feast_ops

    with feast_ops.scoped_environ({C.ENV_LAKE: str(lake)}):
        return feast_ops.repo_objects()


def write_snapshot(lake: Path, snapshot: str, frame: pd.DataFrame) -> None:
    """One Parquet snapshot where the production sources read it (the export's schema and
    folder layout)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.feast_ops import SNAPSHOT_SCHEMAS, part_path

    schema = SNAPSHOT_SCHEMAS[snapshot]
    path = part_path(C.feast_snapshot_path(str(lake), snapshot), 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(frame[schema.names], preserve_index=False).cast(schema), path)


def write_repo_yaml(repo: Path, registry: Path, online_store: str) -> None:
    repo.mkdir(parents=True, exist_ok=True)
    (repo / "feature_store.yaml").write_text(
        f"project: ctt_serving_test\nregistry: {registry}\nprovider: local\n"
        f"online_store:\n{online_store}\nentity_key_serialization_version: 3\n")


def sqlite_store_yaml(path: Path) -> str:
    return f"  type: sqlite\n  path: {path}\n"


@pytest.fixture(scope="session")
def serving_env(tmp_path_factory) -> ServingEnv:
    from feast import FeatureStore

    from models.export import export_bundle, load_bundle
    from models.features import pad_history
    from models.two_tower import ContextualTwoTower
    from serving.index import build_index

    root = tmp_path_factory.mktemp("serving")
    torch.manual_seed(0)
    config = tiny_config()
    model = ContextualTwoTower(config).eval()
    catalog = tiny_catalog(N_ITEMS)
    bundle_dir = export_bundle(model, config, catalog, root / "bundle", "serving-test")
    bundle = load_bundle(bundle_dir)
    index_dir = root / "index"
    build_index(bundle.item_ids, bundle.item_embeddings, bundle.model_version, index_dir,
                backend="scann", n_queries=300)

    rng = np.random.default_rng(1)
    now = datetime.now(timezone.utc)
    histories: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
    for u in range(1, N_USERS + 1):
        n = int(rng.integers(1, 20))  # some longer than max_len: truncation is exercised
        items = rng.choice(catalog[C.ITEM_ID].to_numpy(), size=n)
        ts = np.sort(rng.integers(1_700_000_000, 1_700_900_000, n))
        histories[u] = (items.astype(np.int64), ts.astype(np.int64))
    users_with_state = sorted(histories) + [STALE_USER]
    histories[STALE_USER] = histories[1]
    padded = [pad_history(*histories[u], config.max_len) for u in users_with_state]
    with torch.no_grad():
        states = model.encode_user_state(torch.as_tensor(np.stack([p[0] for p in padded])),
                                         torch.as_tensor(np.stack([p[1] for p in padded])))
    repo, lake = root / "repo", root / "lake"
    write_repo_yaml(repo, root / "registry.db", sqlite_store_yaml(root / "online.db"))
    store = FeatureStore(repo_path=str(repo))
    store.apply(feast_definitions(lake))
    state_rows = pd.DataFrame({
        C.USER_ID: np.asarray(users_with_state, dtype=np.int64),
        C.HIDDEN_STATE: [s.tolist() for s in states.numpy().astype(np.float32)],
        C.MODEL_VERSION: [bundle.model_version] * N_USERS + [STALE_VERSION],
        C.SEQUENCE_HASH: [f"h{u}" for u in users_with_state],
        C.STATE_TS: [now - STATE_AGE] * len(users_with_state)})
    write_snapshot(lake, C.T_USER_STATES, state_rows)
    profile_users = np.asarray(users_with_state + [NO_STATE_USER], dtype=np.int64)
    users = pd.DataFrame({
        C.USER_ID: profile_users,
        C.AGE_BUCKET: rng.integers(0, C.AGE_BUCKETS, len(profile_users)).astype(np.int32),
        C.COUNTRY: rng.choice(["US", "FR", "BR", C.UNKNOWN_COUNTRY], len(profile_users)),
        C.GENDER: rng.choice(list(C.GENDERS), len(profile_users)),
        C.FEATURE_TS: [now] * len(profile_users)})
    write_snapshot(lake, C.T_USER_PROFILE_FEATURES, users)
    online_items = catalog[[C.ITEM_ID, C.CATEGORY_IDS, C.CATEGORY_WEIGHTS]].copy()
    online_items[C.FEATURE_TS] = now
    write_snapshot(lake, C.T_ITEM_CATEGORY_FEATURES, online_items)
    store.materialize(start_date=now - timedelta(days=1), end_date=now + timedelta(seconds=1))
    assert UNKNOWN_ITEM not in set(catalog[C.ITEM_ID])
    return ServingEnv(bundle_dir=bundle_dir, index_dir=index_dir, repo_dir=repo,
                      model_version=bundle.model_version, catalog=catalog, users=users,
                      histories=histories, state_ts=now - STATE_AGE)


@pytest.fixture(scope="session")
def resolver(serving_env):
    from serving.resolver import Resolver

    return Resolver.from_paths(serving_env.bundle_dir, serving_env.index_dir, serving_env.repo_dir)
