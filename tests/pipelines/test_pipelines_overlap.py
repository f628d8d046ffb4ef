"""Writes that another run can overlap, in one process with real Spark + Delta.

The other writer is made to land at the worst moment - between this run's read and its commit -
through the ``fence`` hook that ``sync_table`` calls right before it commits (the lake lease's
check in the jobs): no mock, the interleaving is real Delta commits. The process-level proof (two
real jobs started together) is tests/reliability/test_reliability_overlap.py.
"""
from __future__ import annotations

import shutil
from datetime import datetime, timezone

import pytest
from delta.tables import DeltaTable

import ctt_contracts as C
from pipelines import lease
from pipelines.build import run_build_sequences
from pipelines.build_config import BuildConfig
from pipelines.cli import build_sequences_main, run_generate
from pipelines.delta_io import (SYNC_ATTEMPTS, ConcurrentWriteError, DuplicateKeyError,
                                read_table, sync_table, table_version)
from pipelines.synthetic import SyntheticConfig

pytestmark = pytest.mark.spark

NOW = datetime(2025, 1, 1, tzinfo=timezone.utc)
T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
SCHEMA = C.spark_schema(C.T_USER_SEQUENCES)
GEN = SyntheticConfig(n_users=40, n_items=200, malformed_frac=0.02, seed=3)
BUILD = BuildConfig(max_len=5)
OUTPUT_KEYS = {C.T_ITEMS: [C.ITEM_ID], C.T_USERS: [C.USER_ID], C.T_EVENTS: C.RAW_EVENTS_COLUMNS,
               C.T_SEQUENCES: C.SEQUENCES_KEY, C.T_CONTEXT_ROWS: C.CONTEXT_ROWS_KEY,
               C.T_USER_SEQUENCES: [C.USER_ID]}


def _row(user: int, tag: str):
    return (user, T0, [user], [0], tag)


def _rows(df):
    return sorted(tuple(r) for r in df.collect())


def _blind_append(spark, path: str, rows) -> None:
    """What an older version (or a writer outside the pipeline) did: a plain append."""
    spark.createDataFrame(rows, SCHEMA).write.format("delta").mode("append").save(path)


class Interloper:
    """A fence that lets another writer commit right before this run's commit, `times` times."""

    def __init__(self, spark, path: str, batches):
        self.spark, self.path, self.batches, self.calls = spark, path, list(batches), 0

    def __call__(self) -> None:
        self.calls += 1
        if self.batches:
            _blind_append(self.spark, self.path, self.batches.pop(0))


def test_a_commit_between_read_and_write_is_diffed_again_never_duplicated(spark, tmp_path):
    path = str(tmp_path / "t")
    mk = lambda rows: spark.createDataFrame(rows, SCHEMA)  # noqa: E731
    sync_table(spark, mk([_row(1, "a"), _row(2, "b")]), path, "t", SCHEMA, [C.USER_ID])
    want = [_row(1, "a"), _row(2, "b"), _row(3, "c")]

    # the other run adds the same new row first: this run finds it there and adds nothing
    same = Interloper(spark, path, [[_row(3, "c")]])
    res = sync_table(spark, mk(want), path, "t", SCHEMA, [C.USER_ID], fence=same)
    assert _rows(read_table(spark, path)) == _rows(mk(want))
    assert same.calls == 1 and not res.changed and res.version == table_version(spark, path)

    # the other run adds a row this run's content does not have: this run's content wins
    other = Interloper(spark, path, [[_row(4, "d")]])
    want = [_row(1, "a"), _row(2, "b2"), _row(3, "c")]
    res = sync_table(spark, mk(want), path, "t", SCHEMA, [C.USER_ID], fence=other)
    assert _rows(read_table(spark, path)) == _rows(mk(want))
    assert other.calls == 2 and (res.updated, res.deleted) == (1, 1)  # second diff: b->b2, -d


def test_a_table_contested_at_every_attempt_stops_the_run_with_a_whole_version(spark, tmp_path):
    path = str(tmp_path / "t")
    mk = lambda rows: spark.createDataFrame(rows, SCHEMA)  # noqa: E731
    sync_table(spark, mk([_row(1, "a")]), path, "t", SCHEMA, [C.USER_ID])
    batches = [[_row(10 + i, "x")] for i in range(SYNC_ATTEMPTS)]
    storm = Interloper(spark, path, list(batches))
    with pytest.raises(ConcurrentWriteError, match="another writer changed it during each of"):
        sync_table(spark, mk([_row(1, "a"), _row(2, "b")]), path, "t", SCHEMA, [C.USER_ID],
                   fence=storm)
    # only the other writer's commits: this run never committed half of anything
    assert storm.calls == SYNC_ATTEMPTS
    assert _rows(read_table(spark, path)) == _rows(mk([_row(1, "a")] + [b[0] for b in batches]))


@pytest.fixture(scope="module")
def built(spark, tmp_path_factory):
    """A generated lake, built twice (the second run after an append of a few events)."""
    lake = str(tmp_path_factory.mktemp("overlap") / "lake")
    run_generate(spark, lake, GEN, partitions=2)
    run_build_sequences(spark, lake, BUILD, now=NOW)
    return lake


def _table_rows(spark, lake, name):
    return _rows(read_table(spark, C.LakePaths(lake).table(name)))


def test_no_derived_write_is_a_blind_append(spark, built):
    """Delta conflict-checks a commit only if it read the table: every data commit of every
    output table (and of user_states, see the batch-inference tests) must be one that did."""
    for table in (*OUTPUT_KEYS, C.T_QUARANTINE):
        history = DeltaTable.forPath(spark, C.LakePaths(built).table(table)).history().collect()
        data = [h for h in history if h["operation"] != "CREATE TABLE"]
        assert data, table
        assert not [h["version"] for h in data if h["isBlindAppend"]], table


def test_duplicate_keys_are_refused_with_table_key_and_repair_then_repaired(spark, built, tmp_path,
                                                                            capsys):
    lake = str(tmp_path / "lake")
    shutil.copytree(built, lake)
    paths = C.LakePaths(lake)
    clean = {t: _table_rows(spark, lake, t) for t in OUTPUT_KEYS}
    # what two overlapping builds of the previous version left: blind re-appends of new rows
    for table in (C.T_EVENTS, C.T_SEQUENCES):
        path = paths.table(table)
        read_table(spark, path).limit(7).write.format("delta").mode("append").save(path)
    versions = {t: table_version(spark, paths.table(t)) for t in OUTPUT_KEYS}

    with pytest.raises(DuplicateKeyError) as err:
        run_build_sequences(spark, lake, BUILD, now=NOW)
    msg = str(err.value)
    assert msg.startswith(f"{C.T_EVENTS} ({paths.table(C.T_EVENTS)}): 7 key(s) of "
                          f"({', '.join(C.RAW_EVENTS_COLUMNS)}) occur more than once")
    assert f"python jobs/build_sequences.py --lake {lake} --repair-duplicates" in msg
    assert {t: table_version(spark, paths.table(t)) for t in OUTPUT_KEYS} == versions

    with pytest.raises(SystemExit) as exit_:  # the job: one line, its own exit code
        build_sequences_main(["--lake", lake, "--max-len", str(BUILD.max_len),
                              "--now", NOW.isoformat()])
    assert exit_.value.code == lease.EXIT_DUPLICATES
    assert capsys.readouterr().err.startswith(f"build_sequences: {C.T_EVENTS} (")

    repaired = run_build_sequences(spark, lake, BUILD, now=NOW, repair_duplicates=True)
    assert {t: _table_rows(spark, lake, t) for t in OUTPUT_KEYS} == clean
    by_table = {w.table: w for w in repaired.writes}
    assert by_table[C.T_EVENTS].inserted == 7 and by_table[C.T_SEQUENCES].inserted == 7
    out = capsys.readouterr().out
    assert f"{C.T_EVENTS}: repaired 7 duplicated key(s)" in out
    assert f"{C.T_SEQUENCES}: repaired 7 duplicated key(s)" in out


def test_a_build_refuses_to_start_while_another_holds_the_lake(spark, built, tmp_path, capsys):
    lake = str(tmp_path / "lake")
    shutil.copytree(built, lake)
    versions = {t: table_version(spark, C.LakePaths(lake).table(t)) for t in OUTPUT_KEYS}
    other = lease.acquire(lake, lease.SCOPE_BUILD, "build_sequences", ttl_s=60)
    try:
        with pytest.raises(SystemExit) as exit_:
            build_sequences_main(["--lake", lake, "--max-len", str(BUILD.max_len),
                                  "--now", NOW.isoformat()])
        assert exit_.value.code == lease.EXIT_CONTENDED
        err = capsys.readouterr().err
        assert "is writing the build_sequences tables" in err and err.count("\n") == 1
    finally:
        other.release()
    assert {t: table_version(spark, C.LakePaths(lake).table(t)) for t in OUTPUT_KEYS} == versions
