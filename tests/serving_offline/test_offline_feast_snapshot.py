"""Feast snapshots (pipelines/feast_ops.py) and the `feast` CLI on feature_repo/ (no Spark)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake
from offline_lake import write_users_items

import ctt_contracts as C
from pipelines import feast_ops

NOW = datetime(2030, 1, 1, tzinfo=timezone.utc)  # any aware time; the snapshots store it


def _write_states(lake: str, users, dim: int = 8, version: str = "run-0badc0de", seed: int = 0,
                  ts: datetime | None = None) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ts = ts or datetime.now(timezone.utc) - timedelta(minutes=5)
    table = pa.table({
        C.USER_ID: pa.array([int(u) for u in users], pa.int64()),
        C.HIDDEN_STATE: pa.array([rng.normal(size=dim).astype(np.float32).tolist() for _ in users],
                                 pa.list_(pa.float32())),
        C.MODEL_VERSION: pa.array([version] * len(users)),
        C.STATE_TS: pa.array([ts] * len(users), pa.timestamp("us", tz="UTC")),
        C.SEQUENCE_HASH: pa.array([f"h{u}" for u in users])})
    write_deltalake(C.LakePaths(lake).table(C.T_USER_STATES), table, mode="overwrite")
    return table.to_pandas()


# ------------------------------------------------------------------ feature_ts stability
def test_stable_feature_ts_keeps_unchanged_rows_and_stamps_changed_and_new():
    old_ts = pd.Timestamp("2029-01-01", tz="UTC")
    previous = pd.DataFrame({C.ITEM_ID: [1, 2, 3], C.CATEGORY_IDS: [[1, 2], [3], [4]],
                             C.FEATURE_TS: [old_ts] * 3})
    new = pd.DataFrame({C.ITEM_ID: [1, 2, 4], C.CATEGORY_IDS: [[1, 2], [3, 5], [6]]})
    out = feast_ops.stable_feature_ts(new, previous, C.ITEM_ID, NOW).set_index(C.ITEM_ID)
    assert out.loc[1, C.FEATURE_TS] == old_ts  # same content
    assert out.loc[2, C.FEATURE_TS] == pd.Timestamp(NOW)  # changed list
    assert out.loc[4, C.FEATURE_TS] == pd.Timestamp(NOW)  # new row
    assert 3 not in out.index  # vanished rows are not carried over


def test_stable_feature_ts_rejects_duplicates_and_naive_time():
    new = pd.DataFrame({C.USER_ID: [1, 1], C.GENDER: ["f", "m"]})
    with pytest.raises(ValueError, match="duplicate"):
        feast_ops.stable_feature_ts(new, None, C.USER_ID, NOW)
    with pytest.raises(ValueError, match="timezone-aware"):
        feast_ops.stable_feature_ts(new.iloc[:1], None, C.USER_ID, datetime(2030, 1, 1))


# ------------------------------------------------------------------ export
def test_export_is_delta_aware_versioned_and_idempotent(tmp_path):
    lake = str(tmp_path / "lake")
    users = list(range(1, 21))
    _write_states(lake, users)
    write_users_items(lake, users)
    first = {r.snapshot: r for r in feast_ops.export_feature_tables(lake, now=NOW)}
    assert all(r.written and r.changed_rows == r.rows for r in first.values())

    # DELETE a user in Delta: the Parquet folder still holds the removed file, the snapshot must not
    DeltaTable(C.LakePaths(lake).table(C.T_USER_STATES)).delete(f"{C.USER_ID} = 3")
    second = {r.snapshot: r for r in feast_ops.export_feature_tables(lake, now=NOW + timedelta(hours=1))}
    states = pq.read_table(second[C.T_USER_STATES].path)
    assert 3 not in states.column(C.USER_ID).to_pylist() and states.num_rows == 19
    assert feast_ops.snapshot_source_version(second[C.T_USER_STATES].path) == 1
    # users/items did not change: not rewritten, feature_ts untouched
    assert not second[C.T_USER_PROFILE_FEATURES].written
    assert not second[C.T_ITEM_CATEGORY_FEATURES].written
    profile = pq.read_table(first[C.T_USER_PROFILE_FEATURES].path)
    assert profile.schema.field(C.AGE_BUCKET).type == pa.int64()
    assert pq.read_table(first[C.T_ITEM_CATEGORY_FEATURES].path).schema.field(
        C.CATEGORY_IDS).type == pa.list_(pa.int64())

    # one user's gender changes: only that row gets a new feature_ts
    path = C.LakePaths(lake).table(C.T_USERS)
    DeltaTable(path).update(predicate=f"{C.USER_ID} = 5", updates={C.GENDER: "'x'"})
    later = NOW + timedelta(hours=2)
    third = {r.snapshot: r for r in feast_ops.export_feature_tables(
        lake, [C.T_USER_PROFILE_FEATURES], now=later)}
    res = third[C.T_USER_PROFILE_FEATURES]
    assert res.written and res.changed_rows == 1
    snap = pq.read_table(res.path).to_pandas().set_index(C.USER_ID)
    assert snap.loc[5, C.FEATURE_TS] == pd.Timestamp(later)
    assert (snap.drop(index=5)[C.FEATURE_TS] == pd.Timestamp(NOW)).all()


def test_snapshots_are_oldest_first_and_a_window_reads_only_its_row_groups(tmp_path, monkeypatch):
    """A refresh materializes the rows newer than the last materialization: in a snapshot
    written oldest first, in row groups, those are the last groups, and only they are read."""
    import pyarrow.dataset as ds

    lake = str(tmp_path / "lake")
    users = list(range(1, 13))
    _write_states(lake, users[:8], ts=NOW - timedelta(days=1))
    write_deltalake(C.LakePaths(lake).table(C.T_USER_STATES),
                    _write_states(str(tmp_path / "other"), users[8:], ts=NOW), mode="append")
    monkeypatch.setattr(feast_ops, "SNAPSHOT_ROW_GROUP", 4)
    res = feast_ops.export_snapshot(lake, C.T_USER_STATES, now=NOW)
    snap = pq.read_table(res.path)
    stamps = snap.column(C.STATE_TS).to_pylist()
    assert stamps == sorted(stamps) and snap.num_rows == 12
    assert pq.ParquetFile(res.path).metadata.num_row_groups == 3

    since = NOW - timedelta(hours=1)
    got = feast_ops.window_rows(res.path, C.STATE_TS, since, NOW)
    assert sorted(got.column(C.USER_ID).to_pylist()) == users[8:]
    lo, hi = (pa.scalar(t, type=pa.timestamp("us", tz="UTC")) for t in (since, NOW))
    window = (ds.field(C.STATE_TS) > lo) & (ds.field(C.STATE_TS) <= hi)
    (fragment,) = ds.dataset(res.path, format="parquet").get_fragments()
    assert len(fragment.split_by_row_group(window)) == 1  # two of the three groups skipped


def test_export_refuses_a_foreign_parquet_file(tmp_path):
    lake = str(tmp_path / "lake")
    _write_states(lake, [1, 2])
    target = Path(C.feast_snapshot_path(lake, C.T_USER_STATES))
    target.parent.mkdir(parents=True)
    pq.write_table(pa.table({"x": [1]}), target)
    with pytest.raises(ValueError, match="not a snapshot"):
        feast_ops.export_feature_tables(lake, [C.T_USER_STATES])
