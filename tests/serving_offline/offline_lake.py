"""Helpers of the offline serving tests: tiny catalog/histories, Delta lake writers, a torch oracle.

A module with a unique name (not conftest) so test files can import it without clashing with
the other conftest modules of the suite.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pandas as pd
import torch

import ctt_contracts as C
from models.lake_read import read_arrow

N_USERS = 60
N_ITEMS = 300
MAX_LEN = 12


def tiny_config():
    from models.two_tower import ModelConfig

    return ModelConfig(dim=16, n_layers=1, n_heads=2, max_len=MAX_LEN, item_buckets=1024,
                       category_buckets=128, n_hashes=2, country_buckets=16, max_ctx=4,
                       max_item_categories=5, mlp_hidden=32, dropout=0.0)


def tiny_catalog(n_items: int = N_ITEMS, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    cats: List[List[int]] = []
    weights: List[List[float]] = []
    for _ in range(n_items):
        k = int(rng.integers(1, 4))
        cats.append(rng.choice(40, size=k, replace=False).astype(np.int32).tolist())
        weights.append(np.sort(rng.uniform(0.05, 1.0, k))[::-1].astype(np.float32).tolist())
    return pd.DataFrame({C.ITEM_ID: np.arange(n_items, dtype=np.int64) * 7 + 11,
                         C.CATEGORY_IDS: cats, C.CATEGORY_WEIGHTS: weights,
                         C.ADVERTISER_ID: rng.integers(0, 9, n_items).astype(np.int64)})


def histories(n_users: int = N_USERS, seed: int = 1) -> Dict[int, Tuple[List[int], List[int]]]:
    """user -> (item_ids, event_ts), 1..20 events: some longer than MAX_LEN (truncation)."""
    rng = np.random.default_rng(seed)
    items = tiny_catalog()[C.ITEM_ID].to_numpy()
    out = {}
    for u in range(1, n_users + 1):
        n = int(rng.integers(1, 21))
        out[u * 10] = (rng.choice(items, size=n).astype(np.int64).tolist(),
                       np.sort(rng.integers(1_700_000_000, 1_700_900_000, n)).astype(np.int64).tolist())
    return out


def reference_states(bundle_dir: Path, hist: Dict[int, Tuple[List[int], List[int]]]) -> Dict[int, np.ndarray]:
    """encode_user_state computed directly in torch, one user at a time (no batching at all)."""
    from models.export import load_bundle
    from models.features import pad_history

    model = load_bundle(bundle_dir).model
    out = {}
    with torch.no_grad():
        for user, (items, ts) in hist.items():
            i, t = pad_history(items, ts, model.config.max_len)
            state = model.encode_user_state(torch.from_numpy(i)[None], torch.from_numpy(t)[None])  # (1, S)
            out[user] = state[0].numpy()
    return out


def write_user_sequences(spark, lake: str, hist: Dict[int, Tuple[List[int], List[int]]]) -> None:
    """(Over)write user_sequences with the contract schema; hash = pipelines.sequences' hash."""
    from pipelines.sequences import sequence_hash

    schema = C.spark_schema(C.T_USER_SEQUENCES)
    rows = [(u, pd.Timestamp(ts[-1], unit="s", tz="UTC").to_pydatetime(), items, ts, "")
            for u, (items, ts) in sorted(hist.items())]
    df = spark.createDataFrame(rows, schema).withColumn(C.SEQUENCE_HASH, sequence_hash())
    (df.select(*C.USER_SEQUENCES_COLUMNS).write.format("delta").mode("overwrite")
     .option("overwriteSchema", "true").save(C.LakePaths(lake).table(C.T_USER_SEQUENCES)))


def write_users_items(lake: str, user_ids) -> None:
    """users + items Delta tables with the contract types (written with deltalake: no Spark job)."""
    import pyarrow as pa
    from deltalake import write_deltalake

    rng = np.random.default_rng(2)
    users = pa.table({
        C.USER_ID: pa.array([int(u) for u in user_ids], pa.int64()),
        C.AGE_BUCKET: pa.array(rng.integers(0, C.AGE_BUCKETS, len(user_ids)).tolist(), pa.int32()),
        C.COUNTRY: pa.array(rng.choice(["US", "FR", "BR"], len(user_ids)).tolist()),
        C.GENDER: pa.array(rng.choice(list(C.GENDERS), len(user_ids)).tolist())})
    write_deltalake(C.LakePaths(lake).table(C.T_USERS), users, mode="overwrite")
    cat = tiny_catalog()
    items = pa.table({
        C.ITEM_ID: pa.array(cat[C.ITEM_ID].tolist(), pa.int64()),
        C.CATEGORY_IDS: pa.array(cat[C.CATEGORY_IDS].tolist(), pa.list_(pa.int32())),
        C.CATEGORY_WEIGHTS: pa.array(cat[C.CATEGORY_WEIGHTS].tolist(), pa.list_(pa.float32())),
        C.ADVERTISER_ID: pa.array(cat[C.ADVERTISER_ID].tolist(), pa.int64())})
    write_deltalake(C.LakePaths(lake).table(C.T_ITEMS), items, mode="overwrite")


def read_states(lake: str) -> pd.DataFrame:
    return read_arrow(C.LakePaths(lake).table(C.T_USER_STATES))[0].to_pandas()


def delta_version(lake: str, table: str) -> int:
    from deltalake import DeltaTable

    return int(DeltaTable(C.LakePaths(lake).table(table)).version())
