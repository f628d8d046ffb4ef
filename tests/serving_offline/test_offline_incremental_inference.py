"""Batch inference that follows the change feed of user_sequences (issue 17, item 2).

user_sequences is written here the way build_sequences writes it (``sync_table`` MERGEs with the
change data feed on), so its change feed holds inserts, update pre/post-images and deletes. The
oracle of every incremental run is the full classification: a fresh lake holding the same final
user_sequences, encoded by one full run, must hold the same user_states rows (state_ts aside).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from offline_lake import delta_version, histories, read_states, write_user_sequences

import ctt_contracts as C
from pipelines import inference
from pipelines.inference import (MODE_FULL, MODE_INCREMENTAL, Progress, TableAt, load_progress,
                                 plan_run, rewrite_reason, run_batch_inference)
from pipelines.spark import session_settings

History = Dict[int, Tuple[List[int], List[int]]]


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------
def sync_sequences(spark, lake: str, hist: History, as_of_shift_s: Dict[int, int] = {},
                   cdf: bool = True) -> int:
    """Make user_sequences hold ``hist`` as build_sequences does (keyed MERGE of the
    differences, change data feed on); ``as_of_shift_s`` moves a user's as_of_ts without
    touching its history (a row update whose sequence_hash does not change)."""
    from pipelines.delta_io import CDF_PROPERTIES
    from pipelines.delta_io import sync_table
    from pipelines.sequences import sequence_hash

    schema = C.spark_schema(C.T_USER_SEQUENCES)
    rows = [(u, pd.Timestamp(ts[-1] + as_of_shift_s.get(u, 0), unit="s", tz="UTC").to_pydatetime(),
             items, ts, "") for u, (items, ts) in sorted(hist.items())]
    df = spark.createDataFrame(rows, schema).withColumn(C.SEQUENCE_HASH, sequence_hash())
    path = C.LakePaths(lake).table(C.T_USER_SEQUENCES)
    return sync_table(spark, df, path, C.T_USER_SEQUENCES, schema, [C.USER_ID],
                      properties=CDF_PROPERTIES if cdf else None).version


def grown(hist: History, user: int, step: int = 1) -> Tuple[List[int], List[int]]:
    items, ts = hist[user]
    return items + [items[(step - 1) % len(items)]], ts + [ts[-1] + 60 * step]


def states_rows(lake: str) -> Dict[int, tuple]:
    """user -> (hidden_state, model_version, sequence_hash): every column but state_ts."""
    return {int(r[C.USER_ID]): (np.asarray(r[C.HIDDEN_STATE], dtype=np.float32),
                                r[C.MODEL_VERSION], r[C.SEQUENCE_HASH])
            for _, r in read_states(lake).iterrows()}


def assert_same_states(got: Dict[int, tuple], want: Dict[int, tuple]) -> None:
    assert sorted(got) == sorted(want)
    for user, (state, version, digest) in want.items():
        assert (got[user][1], got[user][2]) == (version, digest), f"user {user}"
        np.testing.assert_allclose(got[user][0], state, atol=1e-5, rtol=0, err_msg=f"user {user}")


def full_oracle(spark, tmp_path: Path, hist: History, bundle: Path) -> Dict[int, tuple]:
    """user_states of a fresh lake holding ``hist``, after one full classification."""
    lake = str(tmp_path / "oracle")
    shutil.rmtree(lake, ignore_errors=True)
    sync_sequences(spark, lake, hist)
    result = run_batch_inference(spark, lake, str(bundle), batch_size=16, full=True)
    assert result.mode == MODE_FULL and result.encoded == len(hist)
    return states_rows(lake)


def data_files(table_dir: Path) -> List[Path]:
    """The parquet files of a Delta table (data and change data), not its log."""
    return [p for p in table_dir.rglob("*.parquet") if "_delta_log" not in p.parts]


# --------------------------------------------------------------------------------------
# Pure: which mode a run takes
# --------------------------------------------------------------------------------------
def test_plan_follows_the_feed_only_when_the_record_still_describes_the_lake():
    seq, states = TableAt(4, "seq-id"), TableAt(7, "states-id")
    p = Progress(sequences=seq, model_version="m1", states=states, users=10)
    seq9 = TableAt(9, "seq-id")
    assert plan_run(p, "m1", seq9, states) == inference.Plan(
        MODE_INCREMENTAL, "change feed of user_sequences v5..v9", 5)
    noop = plan_run(p, "m1", seq, states)
    assert (noop.mode, noop.changes_from) == (MODE_INCREMENTAL, 5)
    full = {
        "--full": plan_run(p, "m1", seq9, states, full=True),
        "--repair-duplicates": plan_run(p, "m1", seq9, states, repair_duplicates=True),
        "no progress recorded": plan_run(None, "m1", seq9, states),
        "model_version changed from 'm1' to 'm2'": plan_run(p, "m2", seq9, states),
        "user_states is at v8 but the recorded progress left it at v7":
            plan_run(p, "m1", seq9, TableAt(8, "states-id")),
        "no user_states table": plan_run(p, "m1", seq9, None),
        "before the consumed v4": plan_run(p, "m1", TableAt(3, "seq-id"), states),
        "user_sequences was created again": plan_run(p, "m1", TableAt(9, "other"), states),
        "user_states was created again": plan_run(p, "m1", seq9, TableAt(7, "other")),
    }
    for words, plan in full.items():
        assert plan.mode == MODE_FULL and words in plan.reason and plan.changes_from is None


def test_rewrites_of_user_sequences_stop_the_feed():
    merge, props = (5, "MERGE", {"predicate": "x"}), (6, "SET TBLPROPERTIES", {})
    assert rewrite_reason([merge, props, (7, "WRITE", {"mode": "Append"})]) is None
    assert "v7 is an overwrite" in rewrite_reason([merge, (7, "WRITE", {"mode": "Overwrite"})])
    assert "v6 is RESTORE" in rewrite_reason([(8, "CREATE OR REPLACE TABLE", {}), (6, "RESTORE", {})])
    assert "REPLACE" in rewrite_reason([merge, (9, "REPLACE TABLE AS SELECT", {})])


def test_full_flags_of_the_job_and_the_refresh():
    from pipelines.refresh import build_parser

    base = ["--lake", "L", "--bundle", "B"]
    assert inference.parse_args(base + ["--full"]).full and not inference.parse_args(base).full
    assert build_parser().parse_args(base + ["--full-inference"]).full_inference
    assert not build_parser().parse_args(base).full_inference


# --------------------------------------------------------------------------------------
# Spark + Delta + a real bundle
# --------------------------------------------------------------------------------------
@pytest.mark.spark
@pytest.mark.integration
@pytest.mark.usefixtures("small_delta_snapshots")
def test_incremental_runs_equal_a_full_classification(spark, tmp_path, bundles):
    from deltalake import DeltaTable

    lake = str(tmp_path / "lake")
    seq_dir, states_dir = Path(lake) / C.T_USER_SEQUENCES, Path(lake) / C.T_USER_STATES
    hist = histories(n_users=30)
    users = sorted(hist)
    v0 = sync_sequences(spark, lake, hist)
    first = run_batch_inference(spark, lake, str(bundles.first), batch_size=16)
    assert (first.mode, first.encoded, first.users) == (MODE_FULL, 30, 30)
    assert "no progress recorded" in first.mode_reason
    recorded = load_progress(lake)
    assert (recorded.sequences.version, recorded.model_version, recorded.states.version,
            recorded.users) == (v0, first.model_version, first.states_version, 30)

    # one commit: 3 new users, 2 longer histories, 2 users gone
    new_users = [1001, 1002, 1003]
    extra = histories(n_users=3, seed=9)
    for u, h in zip(new_users, extra.values()):
        hist[u] = h
    for u in users[:2]:
        hist[u] = grown(hist, u)
    for u in users[2:4]:
        del hist[u]
    v1 = sync_sequences(spark, lake, hist)
    second = run_batch_inference(spark, lake, str(bundles.first), batch_size=16)
    assert (second.mode, second.changes_from, second.sequences_version) == (
        MODE_INCREMENTAL, v0 + 1, v1)
    assert second.states_read_version == first.states_version
    assert (second.encoded, second.new_users, second.changed, second.deleted, second.users) == (
        5, 3, 2, 2, 31)
    assert_same_states(states_rows(lake), full_oracle(spark, tmp_path, hist, bundles.first))

    # two commits before the next run: a user changed twice, a user deleted then back with
    # another history, a new user deleted again, and a row update that keeps its history
    changed, back, no_op = users[0], users[5], users[6]
    hist[changed] = grown(hist, changed, 2)
    del hist[back]
    sync_sequences(spark, lake, hist)
    hist[changed] = grown(hist, changed, 3)
    hist[back] = histories(n_users=1, seed=11)[10]
    del hist[new_users[0]]
    v3 = sync_sequences(spark, lake, hist, as_of_shift_s={no_op: 3600})
    third = run_batch_inference(spark, lake, str(bundles.first), batch_size=16)
    assert (third.mode, third.changes_from, third.sequences_version) == (MODE_INCREMENTAL, v1 + 1, v3)
    assert (third.encoded, third.changed, third.new_users, third.deleted, third.users) == (
        2, 2, 0, 1, 30)
    oracle = full_oracle(spark, tmp_path, hist, bundles.first)
    assert_same_states(states_rows(lake), oracle)

    # nothing new: a version check only. Without their data files the tables cannot be
    # scanned, so the run proves it reads neither; no commit anywhere
    states_at, progress = delta_version(lake, C.T_USER_STATES), load_progress(lake)
    away = tmp_path / "away"
    moved = []
    for src in data_files(seq_dir) + data_files(states_dir):
        dst = away / src.relative_to(lake)
        dst.parent.mkdir(parents=True, exist_ok=True)
        moved.append((src, dst))
        src.rename(dst)
    try:
        idle = run_batch_inference(spark, lake, str(bundles.first), batch_size=16)
    finally:
        for src, dst in moved:
            dst.rename(src)
    assert (idle.mode, idle.committed, idle.encoded, idle.deleted, idle.users) == (
        MODE_INCREMENTAL, False, 0, 0, 30)
    assert idle.changes_from == v3 + 1 and "unchanged since" in idle.mode_reason
    assert idle.states_version == idle.states_read_version == states_at
    assert delta_version(lake, C.T_USER_STATES) == states_at
    assert load_progress(lake) == progress
    # the full classification agrees that nothing is stale
    forced = run_batch_inference(spark, lake, str(bundles.first), batch_size=16, full=True)
    assert (forced.mode, forced.committed, forced.encoded, forced.deleted, forced.users) == (
        MODE_FULL, False, 0, 0, 30)
    assert "--full" in forced.mode_reason
    assert delta_version(lake, C.T_USER_STATES) == states_at
    # the record was written once per run that consumed something, never by the idle ones
    assert len(DeltaTable(inference.progress_path(lake)).history()) == 3


@pytest.mark.spark
@pytest.mark.usefixtures("small_delta_snapshots")
def test_the_feast_export_appends_what_a_run_wrote_read_from_the_states_change_feed(
        spark, tmp_path, bundles):
    """Spark's MERGE (deletion vectors, change data files) read back by deltalake: the export
    after an incremental run writes the run's states alone, and the folder serves the table."""
    from pipelines import feast_ops

    lake = str(tmp_path / "lake")
    hist = histories(n_users=20)
    users = sorted(hist)
    sync_sequences(spark, lake, hist)
    run_batch_inference(spark, lake, str(bundles.first), batch_size=16)
    (first,) = feast_ops.export_feature_tables(lake, [C.T_USER_STATES])
    assert (first.mode, first.rows) == (feast_ops.MODE_FULL, 20)

    for u in users[:2]:
        hist[u] = grown(hist, u)
    hist[2001] = histories(n_users=1, seed=5)[10]
    sync_sequences(spark, lake, hist)
    run = run_batch_inference(spark, lake, str(bundles.first), batch_size=16)
    assert (run.mode, run.encoded) == (MODE_INCREMENTAL, 3)
    (second,) = feast_ops.export_feature_tables(lake, [C.T_USER_STATES])
    assert (second.mode, second.rows, second.changed_rows) == (feast_ops.MODE_INCREMENT, 3, 3)
    newest = pd.read_parquet(feast_ops.snapshot_parts(second.path)[-1])
    assert sorted(newest[C.USER_ID]) == sorted([*users[:2], 2001])
    served = feast_ops.newest_per_key(pq.read_table(second.path), [C.USER_ID], C.STATE_TS)
    want = read_states(lake).set_index(C.USER_ID).sort_index()
    served = served.set_index(C.USER_ID).sort_index()
    assert served.index.tolist() == want.index.tolist()
    assert served[C.SEQUENCE_HASH].tolist() == want[C.SEQUENCE_HASH].tolist()
    assert served[C.STATE_TS].tolist() == want[C.STATE_TS].tolist()
    np.testing.assert_array_equal(np.stack(served[C.HIDDEN_STATE]), np.stack(want[C.HIDDEN_STATE]))


@pytest.mark.spark
@pytest.mark.usefixtures("small_delta_snapshots")
def test_a_failed_merge_does_not_advance_the_progress_and_a_new_model_reencodes_all(
        spark, tmp_path, bundles):
    """user_states made append-only: the first run only inserts (allowed), the next one must
    update a state and Delta refuses its MERGE. The record stays where it was, so the run
    after (the table writable again) redoes that user."""
    from pipelines.delta_io import ensure_table

    lake = str(tmp_path / "lake")
    states_path = C.LakePaths(lake).table(C.T_USER_STATES)
    hist = histories(n_users=12)
    users = sorted(hist)
    sync_sequences(spark, lake, hist)
    ensure_table(spark, states_path, C.spark_schema(C.T_USER_STATES),
                 {"delta.appendOnly": "true"})
    first = run_batch_inference(spark, lake, str(bundles.first), batch_size=16)
    assert (first.mode, first.encoded, first.committed) == (MODE_FULL, 12, True)
    recorded = load_progress(lake)

    hist[users[3]] = grown(hist, users[3])
    sync_sequences(spark, lake, hist)
    with pytest.raises(Exception, match="DELTA_CANNOT_MODIFY_APPEND_ONLY"):
        run_batch_inference(spark, lake, str(bundles.first), batch_size=16)
    assert load_progress(lake) == recorded
    assert delta_version(lake, C.T_USER_STATES) == recorded.states.version

    spark.sql(f"ALTER TABLE delta.`{states_path}` SET TBLPROPERTIES ('delta.appendOnly' = 'false')")
    redo = run_batch_inference(spark, lake, str(bundles.first), batch_size=16)
    assert redo.mode == MODE_FULL and "recorded progress left it at" in redo.mode_reason
    assert (redo.encoded, redo.changed) == (1, 1)
    assert_same_states(states_rows(lake), full_oracle(spark, tmp_path, hist, bundles.first))

    hist[users[5]] = grown(hist, users[5])
    sync_sequences(spark, lake, hist)
    rollout = run_batch_inference(spark, lake, str(bundles.second), batch_size=16)
    assert rollout.mode == MODE_FULL and "model_version changed" in rollout.mode_reason
    assert (rollout.encoded, rollout.model_changed, rollout.users) == (12, 12, 12)
    assert_same_states(states_rows(lake), full_oracle(spark, tmp_path, hist, bundles.second))
    assert load_progress(lake).model_version == rollout.model_version


@pytest.mark.spark
@pytest.mark.usefixtures("small_delta_snapshots")
def test_an_unavailable_change_feed_falls_back_to_full_with_the_reason(spark, tmp_path, bundles):
    from delta.tables import DeltaTable

    from pipelines.delta_io import CDF_PROPERTIES
    from pipelines.delta_io import ensure_properties

    lake = str(tmp_path / "lake")
    seq_path = C.LakePaths(lake).table(C.T_USER_SEQUENCES)
    hist = histories(n_users=10)
    users = sorted(hist)
    v0 = sync_sequences(spark, lake, hist, cdf=False)  # a lake built before the feed was enabled
    run_batch_inference(spark, lake, str(bundles.first), batch_size=16)

    # a change not recorded in a feed, then the feed enabled, then a recorded change
    hist[users[0]] = grown(hist, users[0])
    sync_sequences(spark, lake, hist, cdf=False)
    assert ensure_properties(spark, seq_path, CDF_PROPERTIES)
    hist[users[1]] = grown(hist, users[1])
    v3 = sync_sequences(spark, lake, hist)
    late = run_batch_inference(spark, lake, str(bundles.first), batch_size=16)
    assert late.mode == MODE_FULL and v3 == v0 + 3
    assert f"change feed of user_sequences v{v0 + 1}..v{v3} unavailable" in late.mode_reason
    assert "DELTA_MISSING_CHANGE_DATA" in late.mode_reason
    assert (late.encoded, late.changed) == (2, 2)

    # the feed's files vacuumed away
    hist[users[2]] = grown(hist, users[2])
    sync_sequences(spark, lake, hist)
    retention_check = "spark.databricks.delta.retentionDurationCheck.enabled"
    with session_settings(spark, {retention_check: "false"}):
        DeltaTable.forPath(spark, seq_path).vacuum(0)
    gone = run_batch_inference(spark, lake, str(bundles.first), batch_size=16)
    assert gone.mode == MODE_FULL and "unavailable" in gone.mode_reason, gone.mode_reason
    assert (gone.encoded, gone.changed) == (1, 1)

    # an overwrite of user_sequences
    hist[users[3]] = grown(hist, users[3])
    write_user_sequences(spark, lake, hist)
    over = run_batch_inference(spark, lake, str(bundles.first), batch_size=16)
    assert over.mode == MODE_FULL and "is an overwrite" in over.mode_reason
    assert (over.encoded, over.changed) == (1, 1)

    # user_sequences deleted and built again: its versions restart, its table id changes
    shutil.rmtree(seq_path)
    hist[users[4]] = grown(hist, users[4])
    sync_sequences(spark, lake, hist)
    again = run_batch_inference(spark, lake, str(bundles.first), batch_size=16)
    assert again.mode == MODE_FULL and "user_sequences was created again" in again.mode_reason
    assert (again.encoded, again.changed) == (1, 1)
    assert_same_states(states_rows(lake), full_oracle(spark, tmp_path, hist, bundles.first))
