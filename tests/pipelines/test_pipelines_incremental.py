"""The incremental build against the full one, on real local Spark + Delta, small hand-built logs.

A lake is built once, then grown by appends of raw events (the path ingest --mode append and
the generator use: ``delta_io.write_raw``); after each incremental build a copy of the lake is
rebuilt with ``full=True`` and every table must hold the same rows (quarantine compared without
its ingestion time, which is the time a row was first quarantined). The increments carry the
cases that differ between the two if the increment is handled wrongly: a late event older than
the stored split cutoffs, rows with an unknown event type or an unknown item, an exact copy of
a clean event already in the lake, two copies within one increment, a row in the future that a
later run accepts, and a crash between the outputs and the progress record.
"""
from __future__ import annotations

import os
import shutil
from datetime import datetime, timedelta, timezone

import pytest
from delta.tables import DeltaTable
from pyspark.sql import functions as F

import ctt_contracts as C
from pipelines.build import run_build_sequences
from pipelines.build_config import BuildConfig
from pipelines.build_progress import FULL, INCREMENTAL, load_progress, progress_path
from pipelines.cli import build_sequences_main
from pipelines.delta_io import read_table, table_properties, table_version, write_raw
from pipelines.sequences import load_cutoffs
from pipelines.spark import ADAPTIVE_CONF, ICT_PROPERTY, SHUFFLE_PARTITIONS_CONF, session_settings
from pipelines.subjects import load_coverage

pytestmark = pytest.mark.spark

UTC = timezone.utc
NOW1 = datetime(2024, 7, 1, tzinfo=UTC)
NOW2 = datetime(2024, 8, 1, tzinfo=UTC)
NOW3 = datetime(2024, 9, 1, tzinfo=UTC)
BUILD = BuildConfig(max_len=3, min_history=1, context_top_k=2, val_frac=0.2, test_frac=0.2)
ALL_OUTPUTS = (C.T_ITEMS, C.T_USERS, C.T_EVENTS, C.T_SEQUENCES, C.T_CONTEXT_ROWS,
               C.T_USER_SEQUENCES)
PER_USER = (C.T_SEQUENCES, C.T_CONTEXT_ROWS, C.T_USER_SEQUENCES)
CONV, VIEW = C.EVENT_CONVERSION, C.EVENT_VIEW


def day(n: int, hour: int = 12) -> datetime:
    """Day n of 2024 (1-based)."""
    return datetime(2024, 1, 1, hour, tzinfo=UTC) + timedelta(days=n - 1)


def ev(user, item, etype, ts, subject=None, surface="search", session=None):
    return (user, item, etype, ts, surface, subject, session)


ITEMS = [(i, [i % 3, 3 + i % 2], [0.7, 0.3], 100 + i % 2) for i in range(1, 9)]
USERS = [(u, u % 8, "de", "f") for u in range(1, 7)]
BASE = [
    ev(1, 1, VIEW, day(10)), ev(1, 1, CONV, day(10, 13), subject=2), ev(1, 2, CONV, day(40)),
    ev(1, 3, CONV, day(100)), ev(1, 4, CONV, day(150)),
    ev(2, 2, CONV, day(20)), ev(2, 5, CONV, day(60), subject=1), ev(2, 6, CONV, day(130)),
    ev(3, 3, CONV, day(30)), ev(3, 7, CONV, day(90)), ev(3, 8, CONV, day(160)),
    ev(4, 1, CONV, day(50)), ev(4, 2, CONV, day(120), subject=3),
    ev(5, 5, CONV, day(70)), ev(5, 6, CONV, day(170)),
    ev(4, 1, CONV, day(50)),  # a copy in the first load: quarantined as duplicate_event
    ev(2, 99, CONV, day(25)),  # unknown item
]
INCREMENT_1 = [
    ev(1, 5, CONV, day(175)), ev(2, 7, CONV, day(178), subject=8),
    ev(6, 1, CONV, day(176)), ev(6, 2, CONV, day(179)),  # a new user
    ev(3, 4, "purchase", day(177)),  # unknown event type
    ev(2, 98, CONV, day(177)),  # unknown item
    ev(1, 2, CONV, day(40)),  # exact copy of a clean event of the first load
    ev(5, 8, CONV, NOW1 + timedelta(days=10)),  # in the future of this run, not of the next
]
INCREMENT_2 = [
    ev(3, 6, CONV, day(5)),  # late: older than every stored split cutoff
    ev(6, 3, CONV, day(200)), ev(6, 3, CONV, day(200)),  # two copies in one increment
    ev(6, 4, VIEW, day(201)),  # a view only: user 6 is touched, no new example from it
    ev(4, 5, VIEW, day(202)),  # user 4's only new row is a view: stored, nothing recomputed
]


def _write(spark, lake, table, rows, mode):
    return write_raw(spark, spark.createDataFrame(rows, C.spark_schema(table)), lake, table, mode)


def _rows(spark, lake, table):
    df = read_table(spark, C.LakePaths(lake).table(table))
    if table == C.T_QUARANTINE:
        df = df.drop(C.INGESTED_AT)
    return sorted((tuple(r) for r in df.collect()), key=repr)


def _snapshot(spark, lake):
    return {t: _rows(spark, lake, t) for t in (*ALL_OUTPUTS, C.T_QUARANTINE)}


def _assert_equals_full_rebuild(spark, lake, tmp_path, now, name):
    """A copy of the lake rebuilt in full from its raw tables holds the same rows."""
    copy = str(tmp_path / f"full-{name}")
    shutil.copytree(lake, copy)
    res = run_build_sequences(spark, copy, BUILD, now=now, full=True)
    assert res.mode == FULL and res.mode_reason == "--full given"
    got, want = _snapshot(spark, lake), _snapshot(spark, copy)
    for table in want:
        assert got[table] == want[table], table
    assert load_coverage(spark, lake) == load_coverage(spark, copy)
    return res


def _version(spark, lake, table):
    return table_version(spark, C.LakePaths(lake).table(table))


def _changed_users(spark, lake, table, after_version):
    """Users with a row in the table's change data feed after `after_version` (or None when
    the table had no commit since)."""
    path = C.LakePaths(lake).table(table)
    if table_version(spark, path) == after_version:
        return set()
    feed = (spark.read.format("delta").option("readChangeFeed", "true")
            .option("startingVersion", after_version + 1).load(path))
    return {r[C.USER_ID] for r in feed.select(C.USER_ID).distinct().collect()}


def _enable_feed(spark, lake):
    for table in PER_USER[:2]:  # user_sequences has it already
        spark.sql(f"ALTER TABLE delta.`{C.LakePaths(lake).table(table)}` SET TBLPROPERTIES "
                  f"('delta.enableChangeDataFeed' = 'true')")


def _maintain(spark, lake):
    """What docs/operations.md tells operators to run: purge the deletion vectors, vacuum."""
    for table in (C.T_SEQUENCES, C.T_USER_SEQUENCES, C.T_RAW_EVENTS):
        path = C.LakePaths(lake).table(table)
        spark.sql(f"REORG TABLE delta.`{path}` APPLY (PURGE)")
        spark.sql(f"VACUUM delta.`{path}`")


@pytest.fixture(scope="module")
def base_lake(spark, tmp_path_factory):
    lake = str(tmp_path_factory.mktemp("incr") / "lake")
    _write(spark, lake, C.T_RAW_ITEMS, ITEMS, "overwrite")
    _write(spark, lake, C.T_RAW_USERS, USERS, "overwrite")
    _write(spark, lake, C.T_RAW_EVENTS, BASE, "overwrite")
    first = run_build_sequences(spark, lake, BUILD, now=NOW1)
    assert first.mode == FULL and "no build progress" in first.mode_reason
    return lake


def test_increments_equal_a_full_rebuild_and_touch_only_their_users(spark, base_lake, tmp_path):
    lake = str(tmp_path / "lake")
    shutil.copytree(base_lake, lake)
    props = DeltaTable.forPath(spark, C.LakePaths(lake).table(C.T_RAW_EVENTS)).detail().first()
    assert props["properties"]["delta.enableChangeDataFeed"] == "true"
    cutoffs = load_cutoffs(spark, lake)
    assert cutoffs.val_start > day(5)  # the late event of increment 2 is older than the split

    # increment 1: new and known users, bad rows, a copy of a clean event, a future row
    raw_v = _write(spark, lake, C.T_RAW_EVENTS, INCREMENT_1, "append").version
    res = run_build_sequences(spark, lake, BUILD, now=NOW1)
    assert res.mode == INCREMENTAL, res.mode_reason
    assert res.input_versions[C.T_RAW_EVENTS] == raw_v
    assert res.summary()["mode"] == INCREMENTAL
    assert res.users_recomputed == 3  # 1, 2, 6 (user 1's copy counts, 3's row is malformed)
    (rep,) = res.reports
    assert (rep.n_input, rep.n_clean) == (len(INCREMENT_1), 4)
    assert rep.counts == {C.R_UNKNOWN_EVENT_TYPE: 1, C.R_FUTURE_TIMESTAMP: 1,
                          C.R_UNKNOWN_ITEM: 1, C.R_DUPLICATE_EVENT: 1}
    _assert_equals_full_rebuild(spark, lake, tmp_path, NOW1, "1")
    assert load_progress(spark, lake).inputs[C.T_RAW_EVENTS].version == raw_v

    # increment 2 at a later time: the future row of increment 1 is due now, a late event
    _enable_feed(spark, lake)
    _maintain(spark, lake)  # an operator's purge and vacuum are no reason for a full rebuild
    before = {t: _version(spark, lake, t) for t in (*ALL_OUTPUTS, C.T_QUARANTINE)}
    old = {t: _rows(spark, lake, t) for t in PER_USER}
    progress_v = table_version(spark, progress_path(lake))
    _write(spark, lake, C.T_RAW_EVENTS, INCREMENT_2, "append")
    res = run_build_sequences(spark, lake, BUILD, now=NOW2)
    assert res.mode == INCREMENTAL, res.mode_reason
    assert res.users_recomputed == 3  # 3 (late event), 6, and 5 (its future row is due); not 4
    assert (4, 5) in {(r[0], r[1]) for r in _rows(spark, lake, C.T_EVENTS)}
    assert load_cutoffs(spark, lake) == cutoffs  # the stored split is kept
    late = [r for r in _rows(spark, lake, C.T_SEQUENCES)
            if r[0] == 3 and r[C.SEQUENCES_COLUMNS.index(C.LABEL_ITEM_ID)] == 7]
    assert late and late[0][C.SEQUENCES_COLUMNS.index(C.ITEM_IDS)][0] == 6  # history gains it
    by_table = {w.table: w for w in res.writes}
    assert not by_table[C.T_ITEMS].changed and not by_table[C.T_USERS].changed
    for table in PER_USER:  # only the touched users' rows changed, in the feed and in the
        assert _changed_users(spark, lake, table, before[table]) <= {3, 5, 6}, table  # table
        untouched = lambda rows: [r for r in rows if r[0] not in (3, 5, 6)]  # noqa: E731
        assert untouched(_rows(spark, lake, table)) == untouched(old[table]), table
        metrics = DeltaTable.forPath(spark, C.LakePaths(lake).table(table)).history(1).first()
        w = by_table[table]
        assert int(metrics["operationMetrics"].get("numTargetRowsDeleted", 0)) == w.deleted
    full = _assert_equals_full_rebuild(spark, lake, tmp_path, NOW2, "2")
    assert full.users_recomputed == 6

    # a crash after every output but before the progress record: the next run redoes the
    # increment and ends where the uninterrupted run did (quarantine rows are not doubled)
    done = _snapshot(spark, lake)
    DeltaTable.forPath(spark, progress_path(lake)).restoreToVersion(progress_v)
    res = run_build_sequences(spark, lake, BUILD, now=NOW2)
    assert res.mode == INCREMENTAL, res.mode_reason
    assert _snapshot(spark, lake) == done
    assert not any(w.changed for w in res.writes), [w.line() for w in res.writes]

    # nothing new: no commit to any output table
    versions = {t: _version(spark, lake, t) for t in (*ALL_OUTPUTS, C.T_QUARANTINE)}
    res = run_build_sequences(spark, lake, BUILD, now=NOW3)
    assert res.mode == INCREMENTAL and res.users_recomputed == 0
    assert not any(w.changed for w in res.writes)
    assert {t: _version(spark, lake, t) for t in versions} == versions


def test_users_to_recompute_are_converters_unless_views_can_become_subjects(spark):
    from pipelines.build import users_to_recompute
    from pipelines.subjects import DERIVE_LAST_VIEW, DERIVE_NONE

    rows = spark.createDataFrame([ev(1, 1, VIEW, day(1)), ev(2, 1, CONV, day(1)),
                                  ev(2, 2, VIEW, day(2)), ev(3, 3, VIEW, day(3))],
                                 C.spark_schema(C.T_RAW_EVENTS))
    users = lambda mode: sorted(r[0] for r in users_to_recompute(rows, mode).collect())  # noqa: E731
    assert users(DERIVE_NONE) == [2]
    assert users(DERIVE_LAST_VIEW) == [1, 2, 3]


def test_fallbacks_to_a_full_build_say_why(spark, base_lake, tmp_path, capsys):
    lake = str(tmp_path / "lake")
    shutil.copytree(base_lake, lake)
    snapshot = _snapshot(spark, lake)

    # raw_events overwritten (here with its own rows: content unchanged, history not an append)
    raw = read_table(spark, C.LakePaths(lake).table(C.T_RAW_EVENTS)).drop(C.RAW_ROW_JSON)
    _write(spark, lake, C.T_RAW_EVENTS, raw.collect(), "overwrite")
    res = run_build_sequences(spark, lake, BUILD, now=NOW1)
    assert res.mode == FULL and "raw_events" in res.mode_reason and "not an append" in \
        res.mode_reason, res.mode_reason
    assert _snapshot(spark, lake) == snapshot
    assert not any(w.changed for w in res.writes)

    # an item appended: an event quarantined as unknown_item becomes clean
    _write(spark, lake, C.T_RAW_ITEMS, [(99, [1], [1.0], 100)], "append")
    res = run_build_sequences(spark, lake, BUILD, now=NOW1)
    assert res.mode == FULL and res.mode_reason.startswith("raw_items changed"), res.mode_reason
    events = _rows(spark, lake, C.T_EVENTS)
    assert any(r[1] == 99 for r in events)

    # rows written into an output table by something other than a build
    path = C.LakePaths(lake).table(C.T_SEQUENCES)
    read_table(spark, path).limit(1).write.format("delta").mode("append").save(path)
    with pytest.raises(Exception, match="occur more than once"):
        run_build_sequences(spark, lake, BUILD, now=NOW1)
    assert "sequences v" in capsys.readouterr().out

    # the CLI flag
    summary = build_sequences_main(["--lake", lake, "--now", NOW1.isoformat(), "--max-len", "3",
                                    "--context-top-k", "2", "--val-frac", "0.2", "--test-frac",
                                    "0.2", "--full", "--repair-duplicates"])
    assert summary["mode"] == FULL and summary["mode_reason"] == "--full given"
    out = capsys.readouterr().out
    assert "build mode: full (--full given)" in out
    again = run_build_sequences(spark, lake, BUILD, now=NOW1)
    assert again.mode == INCREMENTAL and not any(w.changed for w in again.writes)


def test_a_lake_copied_without_modification_times_stays_incremental(spark, base_lake, tmp_path):
    """`cp -r` and object-store copies give every file a new modification time, which is what a
    Delta table without in-commit timestamps reports as its commit times; the copy must still
    be recognised as the lake the last build read."""
    lake = tmp_path / "lake"
    shutil.copytree(base_lake, lake, copy_function=shutil.copyfile)
    later = datetime.now().timestamp() + 3600
    for f in lake.rglob("*"):
        os.utime(f, (later, later))
    path = C.LakePaths(str(lake)).table(C.T_RAW_ITEMS)
    assert table_properties(spark, path).get(ICT_PROPERTY) == "true"
    _write(spark, str(lake), C.T_RAW_EVENTS, [ev(6, 3, CONV, day(175))], "append")
    res = run_build_sequences(spark, str(lake), BUILD, now=NOW1)
    assert res.mode == INCREMENTAL, res.mode_reason
    assert res.users_recomputed == 1
    _assert_equals_full_rebuild(spark, str(lake), tmp_path, NOW1, "copied")


def test_a_small_increment_under_adaptive_execution_runs_without_it_and_restores_it(
        spark, base_lake, tmp_path, capsys):
    """A job's session has adaptive execution on and Spark's 200 shuffle partitions (the
    suite's session turns it off): after validation a small increment runs with it off and
    one shuffle partition per core, and the job's settings are back afterwards. (The other
    tests here prove incremental == full with adaptive execution off.)"""
    lake = str(tmp_path / "lake")
    shutil.copytree(base_lake, lake)
    _write(spark, lake, C.T_RAW_EVENTS, [ev(6, 3, CONV, day(175)), ev(1, 6, CONV, day(176))],
           "append")
    job = {ADAPTIVE_CONF: "true", SHUFFLE_PARTITIONS_CONF: "200"}
    with session_settings(spark, job):
        res = run_build_sequences(spark, lake, BUILD, now=NOW1)
        assert {k: spark.conf.get(k) for k in job} == job
    assert res.mode == INCREMENTAL and res.users_recomputed == 2
    n = spark.sparkContext.defaultParallelism
    # the 2 appended events and user 1's 5 events of the first load (user 6 is new)
    assert (f"increment: 7 rows with its users' earlier events: {ADAPTIVE_CONF}=false, "
            f"{SHUFFLE_PARTITIONS_CONF}={n}") in capsys.readouterr().out


def test_users_only_change_resyncs_the_users_table(spark, base_lake, tmp_path):
    lake = str(tmp_path / "lake")
    shutil.copytree(base_lake, lake)
    before = {t: _version(spark, lake, t) for t in PER_USER + (C.T_EVENTS,)}
    _write(spark, lake, C.T_RAW_USERS, USERS + [(7, 3, "fr", "m"), (8, 99, "fr", "m")], "overwrite")
    res = run_build_sequences(spark, lake, BUILD, now=NOW1)
    assert res.mode == INCREMENTAL and "raw_users changed" in res.mode_reason
    by_table = {w.table: w for w in res.writes}
    assert by_table[C.T_USERS].inserted == 1 and by_table[C.T_QUARANTINE].inserted == 1
    assert {t: _version(spark, lake, t) for t in before} == before
    reasons = F.col(C.SOURCE_TABLE) == C.T_RAW_USERS
    q = read_table(spark, C.LakePaths(lake).table(C.T_QUARANTINE)).where(reasons).collect()
    assert [r[C.REASON] for r in q] == [C.R_BAD_DEMOGRAPHICS]
    _assert_equals_full_rebuild(spark, lake, tmp_path, NOW1, "users")
