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
from models.lake_read import read_arrow
from pipelines import feast_ops

NOW = datetime(2030, 1, 1, tzinfo=timezone.utc)  # any aware time; the snapshots store it


FEED = {C.CDF_PROPERTY: "true", "delta.enableDeletionVectors": "true"}  # user_states' own


def _states(users, dim: int = 8, version: str = "run-0badc0de", seed: int = 0,
            ts: datetime | None = None) -> pa.Table:
    rng = np.random.default_rng(seed)
    ts = ts or datetime.now(timezone.utc) - timedelta(minutes=5)
    return pa.table({
        C.USER_ID: pa.array([int(u) for u in users], pa.int64()),
        C.HIDDEN_STATE: pa.array([rng.normal(size=dim).astype(np.float32).tolist() for _ in users],
                                 pa.list_(pa.float32())),
        C.MODEL_VERSION: pa.array([version] * len(users)),
        C.STATE_TS: pa.array([ts] * len(users), pa.timestamp("us", tz="UTC")),
        C.SEQUENCE_HASH: pa.array([f"h{u}" for u in users])})


def _write_states(lake: str, users, dim: int = 8, version: str = "run-0badc0de", seed: int = 0,
                  ts: datetime | None = None, feed: bool = False) -> pd.DataFrame:
    table = _states(users, dim, version, seed, ts)
    write_deltalake(C.LakePaths(lake).table(C.T_USER_STATES), table, mode="overwrite",
                    configuration=FEED if feed else None)
    return table.to_pandas()


def _merge_states(lake: str, table: pa.Table) -> None:
    """Upsert by user, as batch inference's keyed MERGE does."""
    (DeltaTable(C.LakePaths(lake).table(C.T_USER_STATES))
     .merge(table, f"t.{C.USER_ID} = s.{C.USER_ID}", source_alias="s", target_alias="t")
     .when_matched_update_all().when_not_matched_insert_all().execute())


def _served(path: str) -> pd.DataFrame:
    """The snapshot folder as Feast serves it: each user's newest row."""
    return (feast_ops.newest_per_key(pq.read_table(path), [C.USER_ID], C.STATE_TS)
            .set_index(C.USER_ID).sort_index())


def _assert_serves_the_table(lake: str, path: str) -> None:
    got = _served(path)
    want = read_arrow(C.LakePaths(lake).table(C.T_USER_STATES))[0].to_pandas()
    want = want.set_index(C.USER_ID).sort_index()
    assert got.index.tolist() == want.index.tolist()
    for col in (C.MODEL_VERSION, C.SEQUENCE_HASH, C.STATE_TS):
        assert got[col].tolist() == want[col].tolist(), col
    np.testing.assert_array_equal(np.stack(got[C.HIDDEN_STATE]), np.stack(want[C.HIDDEN_STATE]))


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
    (part,) = feast_ops.snapshot_parts(res.path)
    assert pq.ParquetFile(part).metadata.num_row_groups == 3

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


# ------------------------------------------------------------------ increments
def test_states_written_since_the_last_export_are_one_more_part_read_from_the_change_feed(tmp_path):
    lake = str(tmp_path / "lake")
    _write_states(lake, range(1, 41), ts=NOW - timedelta(days=1), feed=True)
    first = feast_ops.export_snapshot(lake, C.T_USER_STATES, now=NOW)
    assert (first.mode, first.rows, first.changed_rows) == (feast_ops.MODE_FULL, 40, 40)

    # a day: two users re-encoded, one new, in two commits (user 3 twice: its newest state)
    _merge_states(lake, _states([3, 4, 50], seed=1, ts=NOW))
    _merge_states(lake, _states([3], seed=2, ts=NOW + timedelta(minutes=1)))
    second = feast_ops.export_snapshot(lake, C.T_USER_STATES, now=NOW)
    assert (second.mode, second.rows, second.changed_rows, second.source_version) == (
        feast_ops.MODE_INCREMENT, 3, 3, 2)
    parts = feast_ops.snapshot_parts(second.path)
    assert [feast_ops.snapshot_source_version(p) for p in parts] == [0, 2]
    assert sorted(pq.read_table(parts[1]).column(C.USER_ID).to_pylist()) == [3, 4, 50]
    assert feast_ops.snapshot_source_version(second.path) == 2
    _assert_serves_the_table(lake, second.path)
    again = feast_ops.export_snapshot(lake, C.T_USER_STATES, now=NOW)
    assert (again.mode, again.written, len(feast_ops.snapshot_parts(again.path))) == (
        feast_ops.MODE_UP_TO_DATE, False, 2)

    # a removed user: a part cannot remove a row, so the export rewrites the folder as one part
    DeltaTable(C.LakePaths(lake).table(C.T_USER_STATES)).delete(f"{C.USER_ID} = 7")
    third = feast_ops.export_snapshot(lake, C.T_USER_STATES, now=NOW)
    assert (third.mode, third.rows, third.changed_rows) == (feast_ops.MODE_FULL, 40, 0)
    assert feast_ops.snapshot_parts(third.path) == [feast_ops.part_path(third.path, 3)]
    _assert_serves_the_table(lake, third.path)


def test_an_export_compacts_when_increments_outgrow_the_first_part_or_the_feed_is_gone(
        tmp_path, monkeypatch):
    lake = str(tmp_path / "lake")
    _write_states(lake, range(1, 21), ts=NOW - timedelta(days=1), feed=True)
    feast_ops.export_snapshot(lake, C.T_USER_STATES, now=NOW)
    _merge_states(lake, _states([1, 2, 3, 4], seed=1, ts=NOW))  # 4 rows <= 0.25 x 20
    assert feast_ops.export_snapshot(lake, C.T_USER_STATES).mode == feast_ops.MODE_INCREMENT
    _merge_states(lake, _states([5, 6], seed=2, ts=NOW))  # 4 + 2 > 5: compacted
    res = feast_ops.export_snapshot(lake, C.T_USER_STATES)
    assert (res.mode, len(feast_ops.snapshot_parts(res.path))) == (feast_ops.MODE_FULL, 1)
    assert res.changed_rows == 2
    _assert_serves_the_table(lake, res.path)

    monkeypatch.setattr(feast_ops, "MAX_PARTS", 2)
    modes = []
    for day in (1, 2):
        _merge_states(lake, _states([day], seed=day, ts=NOW + timedelta(days=day)))
        modes.append(feast_ops.export_snapshot(lake, C.T_USER_STATES).mode)
    assert modes == [feast_ops.MODE_INCREMENT, feast_ops.MODE_FULL]  # no third part: compacted

    # the feed's files vacuumed away: the export cannot follow it and reads the table
    _merge_states(lake, _states([10], seed=10, ts=NOW + timedelta(days=4)))
    for cdc in (Path(C.LakePaths(lake).table(C.T_USER_STATES)) / "_change_data").glob("*"):
        cdc.unlink()
    res = feast_ops.export_snapshot(lake, C.T_USER_STATES)
    assert (res.mode, res.changed_rows) == (feast_ops.MODE_FULL, 1)
    _assert_serves_the_table(lake, res.path)


def test_a_table_without_the_feed_and_a_snapshot_of_the_one_file_layout_get_full_exports(tmp_path):
    lake = str(tmp_path / "lake")
    _write_states(lake, range(1, 11), ts=NOW - timedelta(days=1))  # no change feed
    target = Path(C.feast_snapshot_path(lake, C.T_USER_STATES))
    target.parent.mkdir(parents=True)
    old = feast_ops._conform(pq.read_table(DeltaTable(C.LakePaths(lake).table(
        C.T_USER_STATES)).file_uris()[0]), feast_ops.SNAPSHOT_SCHEMAS[C.T_USER_STATES], 0)
    pq.write_table(old, target)  # an earlier release's snapshot: one file at the folder's path
    assert feast_ops.snapshot_source_version(target) == 0
    _merge_states(lake, _states([2], seed=1, ts=NOW))
    res = feast_ops.export_snapshot(lake, C.T_USER_STATES)
    assert (res.mode, res.changed_rows) == (feast_ops.MODE_FULL, 1) and target.is_dir()
    _assert_serves_the_table(lake, res.path)
    _merge_states(lake, _states([3], seed=2, ts=NOW))
    assert feast_ops.export_snapshot(lake, C.T_USER_STATES).mode == feast_ops.MODE_FULL


def test_newest_per_key_keeps_each_keys_newest_row_whatever_the_part_order():
    ts = [NOW, NOW - timedelta(hours=1), NOW + timedelta(hours=1), NOW]
    rows = pa.table({C.USER_ID: [1, 1, 2, 2], "v": ["new", "old", "newer", "older"],
                     C.STATE_TS: pa.array(ts, pa.timestamp("us", tz="UTC"))})
    got = feast_ops.newest_per_key(rows, [C.USER_ID], C.STATE_TS).set_index(C.USER_ID)
    assert got["v"].to_dict() == {1: "new", 2: "newer"}


def test_keys_in_window_counts_a_key_two_parts_wrote_once(tmp_path):
    folder = tmp_path / "user_states.parquet"
    folder.mkdir()
    stamp = pa.timestamp("us", tz="UTC")
    first = pa.table({C.USER_ID: [1, 2, 3],
                      C.STATE_TS: pa.array([NOW - timedelta(days=2), NOW, NOW], stamp)})
    later = pa.table({C.USER_ID: [2, 4], C.STATE_TS: pa.array([NOW + timedelta(hours=1)] * 2, stamp)})
    pq.write_table(first, feast_ops.part_path(folder, 1))
    pq.write_table(later, feast_ops.part_path(folder, 2))
    count = feast_ops.keys_in_window(folder, C.USER_ID, C.STATE_TS, NOW - timedelta(days=1),
                                     NOW + timedelta(days=1))
    assert count == 3  # users 2, 3, 4; user 2 is in both parts, user 1 before the window
    assert feast_ops.keys_in_window(folder, C.USER_ID, C.STATE_TS, NOW, NOW + timedelta(days=1)) == 2
