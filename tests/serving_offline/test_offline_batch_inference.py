"""Batch inference in Spark -> user_states (Delta) -> Feast snapshot -> SQLite online store.

One scenario, in order, because each step depends on the previous state of the lake and of the
online store (and Spark steps are the slow part of the suite):
1. first run: every user encoded; states == encode_user_state in torch (1e-5); Feast serves
   exactly the Delta vectors (1e-6) and the model_version;
2. rerun with nothing new: nothing encoded, no Delta commit;
3. one history changes, one user disappears: one user re-encoded, one state deleted; the
   incremental materialization updates that user online and leaves the others untouched;
4. a new model_version: every user re-encoded, and served online with the new version.
Steps 3 and 4 go online through ``feast_ops.materialize_window`` (the daily refresh's path).
"""
from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pytest
from offline_lake import (delta_version, histories, read_states, reference_states,
                          write_user_sequences, write_users_items)

import ctt_contracts as C
from pipelines import feast_ops
from pipelines.inference import run_batch_inference

STATE_REFS = [C.feature_ref(C.FV_USER_SEQUENCE_STATE, C.HIDDEN_STATE),
              C.feature_ref(C.FV_USER_SEQUENCE_STATE, C.MODEL_VERSION)]


def _states_by_user(lake):
    return {int(r[C.USER_ID]): r for _, r in read_states(lake).iterrows()}


def _assert_states_equal(lake, bundle_dir, hist):
    got = _states_by_user(lake)
    expected = reference_states(bundle_dir, hist)
    assert set(got) == set(hist)
    for user, state in expected.items():
        np.testing.assert_allclose(np.asarray(got[user][C.HIDDEN_STATE], dtype=np.float32), state,
                                   atol=1e-5, rtol=0, err_msg=f"user {user}")


def _online(store, users):
    resp = store.get_online_features(features=STATE_REFS,
                                     entity_rows=[{C.USER_ID: int(u)} for u in users]).to_dict()
    return {u: (None if s is None else np.asarray(s, dtype=np.float32), v)
            for u, s, v in zip(resp[C.USER_ID], resp[C.HIDDEN_STATE], resp[C.MODEL_VERSION])}


def _assert_online_matches_delta(store, lake, users):
    delta = _states_by_user(lake)
    online = _online(store, users)
    for u in users:
        state, version = online[u]
        assert state is not None, f"user {u} has no state online"
        np.testing.assert_allclose(state, np.asarray(delta[u][C.HIDDEN_STATE], dtype=np.float32),
                                   atol=1e-6, rtol=0, err_msg=f"user {u}")
        assert version == delta[u][C.MODEL_VERSION]


def _refresh_online(store, lake, first=False):
    """Export, then Feast's own materialize-incremental the first time and the refresh's
    windowed one (``feast_ops.materialize_window``) afterwards."""
    feast_ops.export_feature_tables(lake)
    if first:
        feast_ops.materialize_incremental(store, datetime.now(timezone.utc))
    else:
        feast_ops.materialize_window(store, datetime.now(timezone.utc))


@pytest.mark.spark
@pytest.mark.integration
@pytest.mark.usefixtures("small_delta_snapshots")
def test_batch_inference_to_online_store(spark, tmp_path, bundles):
    lake = str(tmp_path / "lake")
    hist = histories()
    write_user_sequences(spark, lake, hist)
    write_users_items(lake, sorted(hist))

    # 1) first run
    first = run_batch_inference(spark, lake, str(bundles.first), batch_size=16, partitions=3)
    assert (first.users, first.encoded, first.new_users, first.deleted, first.committed) == (
        len(hist), len(hist), len(hist), 0, True)
    _assert_states_equal(lake, bundles.first, hist)
    states1 = _states_by_user(lake)
    assert {r[C.MODEL_VERSION] for r in states1.values()} == {first.model_version}
    assert len({r[C.STATE_TS] for r in states1.values()}) == 1  # one state_ts per run
    v1 = delta_version(lake, C.T_USER_STATES)
    assert first.states_version == v1

    store = feast_ops.apply(lake, tmp_path / "feast")
    _refresh_online(store, lake, first=True)
    _assert_online_matches_delta(store, lake, sorted(hist))
    profile = store.get_online_features(
        features=[C.feature_ref(C.FV_USER_PROFILE, C.GENDER),
                  C.feature_ref(C.FV_ITEM_CATEGORIES, C.CATEGORY_IDS)],
        entity_rows=[{C.USER_ID: sorted(hist)[0], C.ITEM_ID: 11}]).to_dict()
    assert profile[C.GENDER][0] in C.GENDERS and profile[C.CATEGORY_IDS][0]

    # 2) nothing new: no encode, no commit
    again = run_batch_inference(spark, lake, str(bundles.first), batch_size=16)
    assert (again.encoded, again.deleted, again.committed) == (0, 0, False)
    assert delta_version(lake, C.T_USER_STATES) == v1 == again.states_version

    # 3) one history grows, one user disappears
    changed_user, gone_user = sorted(hist)[4], sorted(hist)[7]
    items, ts = hist[changed_user]
    hist[changed_user] = (items + [items[0]], ts + [ts[-1] + 60])
    del hist[gone_user]
    write_user_sequences(spark, lake, hist)
    third = run_batch_inference(spark, lake, str(bundles.first), batch_size=16)
    assert (third.encoded, third.changed, third.new_users, third.deleted) == (1, 1, 0, 1)
    assert delta_version(lake, C.T_USER_STATES) == v1 + 1 == third.states_version
    _assert_states_equal(lake, bundles.first, hist)
    states3 = _states_by_user(lake)
    assert states3[changed_user][C.STATE_TS] > states1[changed_user][C.STATE_TS]
    assert all(states3[u][C.STATE_TS] == states1[u][C.STATE_TS] for u in hist if u != changed_user)

    online_before = _online(store, sorted(hist))
    _refresh_online(store, lake)
    online_after = _online(store, sorted(hist))
    _assert_online_matches_delta(store, lake, sorted(hist))
    assert not np.allclose(online_after[changed_user][0], online_before[changed_user][0])
    assert all(np.array_equal(online_after[u][0], online_before[u][0]) for u in hist if u != changed_user)

    # 4) a new model version invalidates every state
    fourth = run_batch_inference(spark, lake, str(bundles.second), batch_size=16)
    assert fourth.model_version != first.model_version
    assert (fourth.encoded, fourth.model_changed) == (len(hist), len(hist))
    _assert_states_equal(lake, bundles.second, hist)
    _refresh_online(store, lake)
    _assert_online_matches_delta(store, lake, sorted(hist))
    assert {v for _, v in _online(store, sorted(hist)).values()} == {fourth.model_version}


def test_window_rows_reads_only_the_window(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    ts = [t0.replace(hour=h) for h in (1, 2, 3)]
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({C.USER_ID: [1, 2, 3], C.STATE_TS: pa.array(ts, pa.timestamp("us", "UTC"))}),
                   path)
    got = feast_ops.window_rows(path, C.STATE_TS, ts[0], ts[2])
    assert got.column(C.USER_ID).to_pylist() == [2, 3]  # start excluded, end included
    empty = feast_ops.window_rows(path, C.STATE_TS, ts[2], ts[2].replace(hour=9))
    assert empty.num_rows == 0 and empty.schema.names == [C.USER_ID, C.STATE_TS]


@pytest.mark.spark
def test_missing_user_sequences_is_a_clear_error(spark, tmp_path, bundles):
    with pytest.raises(FileNotFoundError, match="build_sequences"):
        run_batch_inference(spark, str(tmp_path / "empty_lake"), str(bundles.first))


@pytest.mark.spark
@pytest.mark.usefixtures("small_delta_snapshots")
def test_duplicate_user_states_are_refused_with_the_repair_then_reencoded(spark, tmp_path, bundles):
    """user_states with a user twice (what two overlapping first runs of the previous version left:
    two blind appends) is refused, naming table, key and repair command, before anything is
    encoded or written; ``repair_duplicates`` deletes those users' states and re-encodes them.
    Every write to user_states, the first run's included, is one Delta conflict-checks."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    from pipelines.delta_io import DuplicateKeyError, read_table

    lake = str(tmp_path / "lake")
    hist = histories(n_users=12)
    write_user_sequences(spark, lake, hist)
    run_batch_inference(spark, lake, str(bundles.first), batch_size=16)
    path = C.LakePaths(lake).table(C.T_USER_STATES)
    twice = sorted(hist)[:2]
    (read_table(spark, path).where(F.col(C.USER_ID).isin(twice))
     .write.format("delta").mode("append").save(path))
    version = delta_version(lake, C.T_USER_STATES)

    with pytest.raises(DuplicateKeyError) as err:
        run_batch_inference(spark, lake, str(bundles.first), batch_size=16)
    msg = str(err.value)
    assert msg.startswith(f"{C.T_USER_STATES} ({path}): 2 key(s) of ({C.USER_ID}) occur more than once")
    assert f"{C.USER_ID}={twice[0]}" in msg
    assert f"--lake {lake} --bundle {bundles.first.resolve()} --repair-duplicates" in msg
    assert delta_version(lake, C.T_USER_STATES) == version

    fixed = run_batch_inference(spark, lake, str(bundles.first), batch_size=16, repair_duplicates=True)
    assert (fixed.encoded, fixed.new_users, fixed.committed) == (2, 2, True)
    states = read_states(lake)
    assert sorted(states[C.USER_ID]) == sorted(hist)
    _assert_states_equal(lake, bundles.first, hist)
    ours = [h for h in DeltaTable.forPath(spark, path).history().collect()
            if h["operation"] == "MERGE"]
    assert len(ours) == 3 and not any(h["isBlindAppend"] for h in ours)  # first run, repair, re-encode
