"""The build job end to end on Delta: contract schemas, reconciliation, idempotency (same content,
same versions), incremental appends touching only the affected users, the ingest CLI on
examples/, and one real `spark-submit jobs/build_sequences.py` run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from pyspark.sql import functions as F
from pyspark.sql import types as T

import ctt_contracts as C
from pipelines.build import run_build_sequences
from pipelines.build_config import BuildConfig
from pipelines.cli import ingest_main, run_generate
from pipelines.delta_io import (MERGE_TAG, TAG_DELETE, TAG_UPSERT, conform, create_table,
                                merge_tagged, read_table, sync_quarantine, sync_table,
                                table_exists, table_version, write_raw)
from pipelines.sequences import load_cutoffs
from pipelines.synthetic import PLANTED, SyntheticConfig

pytestmark = pytest.mark.spark

REPO = Path(__file__).resolve().parents[2]
NOW = datetime(2025, 1, 1, tzinfo=timezone.utc)
GEN = SyntheticConfig(preset=PLANTED, n_users=60, n_items=400, malformed_frac=0.02, seed=5)
BUILD = BuildConfig(max_len=5)  # a small cap so that it binds on this data
OUTPUTS = (C.T_SEQUENCES, C.T_CONTEXT_ROWS, C.T_USER_SEQUENCES)


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("lake") / "lake")
    run_generate(spark, root, GEN, partitions=2)
    return root


def _table(spark, lake, name, version=None):
    return read_table(spark, C.LakePaths(lake).table(name), version)


def _rows(df):
    return sorted(tuple(r) for r in df.collect())


def test_build_contract_tables_then_rerun_is_a_noop(spark, lake):
    first = run_build_sequences(spark, lake, BUILD, now=NOW)
    for rep in first.reports:
        assert rep.reconciles, rep
    events_rep = next(r for r in first.reports if r.source_table == C.T_RAW_EVENTS)
    assert set(events_rep.counts) == {C.R_UNKNOWN_EVENT_TYPE, C.R_FUTURE_TIMESTAMP,
                                      C.R_UNKNOWN_ITEM, C.R_DUPLICATE_EVENT}
    quarantine = _table(spark, lake, C.T_QUARANTINE)
    got = {r[C.REASON]: r["count"] for r in quarantine.groupBy(C.REASON).count().collect()}
    assert got == events_rep.counts
    assert _table(spark, lake, C.T_EVENTS).count() == events_rep.n_clean
    for name in (C.T_EVENTS, C.T_ITEMS, C.T_USERS, C.T_QUARANTINE, C.T_SEQUENCES,
                 C.T_USER_SEQUENCES):
        assert _table(spark, lake, name).schema == C.spark_schema(name), name
    assert _table(spark, lake, C.T_CONTEXT_ROWS).schema == C.spark_schema(C.T_CONTEXT_ROWS)
    seq = _table(spark, lake, C.T_SEQUENCES)
    ctx = _table(spark, lake, C.T_CONTEXT_ROWS)
    assert {r[C.SPLIT] for r in seq.select(C.SPLIT).distinct().collect()} == set(C.SPLITS)
    assert seq.agg(F.max(F.size(C.ITEM_IDS))).first()[0] == BUILD.max_len
    n_pseudo = ctx.where(F.col(C.CONTEXT_SOURCE) == C.CONTEXT_PSEUDO).count()
    assert n_pseudo == seq.count()
    # every synthetic conversion logs its subject item -> one real row per example too
    assert ctx.where(F.col(C.CONTEXT_SOURCE) == C.CONTEXT_REAL).count() == n_pseudo
    _assert_subjects_match_events(spark, lake)
    props = spark.sql(f"DESCRIBE DETAIL delta.`{C.LakePaths(lake).table(C.T_USER_SEQUENCES)}`")
    assert props.first()["properties"]["delta.enableChangeDataFeed"] == "true"
    assert load_cutoffs(spark, lake).origin == "quantiles"

    snapshot = {t: _rows(_table(spark, lake, t)) for t in OUTPUTS}
    second = run_build_sequences(spark, lake, BUILD, now=NOW)
    assert not any(w.changed for w in second.writes)
    assert second.versions == first.versions
    assert {t: _rows(_table(spark, lake, t)) for t in OUTPUTS} == snapshot


def _assert_subjects_match_events(spark, lake):
    """Real context rows carry the subject item logged on their label conversion; pseudo rows
    carry none."""
    ctx = _table(spark, lake, C.T_CONTEXT_ROWS)
    pseudo = ctx.where(F.col(C.CONTEXT_SOURCE) == C.CONTEXT_PSEUDO)
    assert pseudo.where(F.col(C.SUBJECT_ITEM_ID).isNotNull()).count() == 0
    conv = (_table(spark, lake, C.T_EVENTS).where(F.col(C.EVENT_TYPE) == C.EVENT_CONVERSION)
            .select(F.col(C.USER_ID), F.col(C.EVENT_TS).alias(C.AS_OF_TS),
                    F.col(C.ITEM_ID).alias(C.LABEL_ITEM_ID), F.col(C.SUBJECT_ITEM_ID).alias("logged")))
    real = ctx.where(F.col(C.CONTEXT_SOURCE) == C.CONTEXT_REAL)
    joined = real.join(conv, C.SEQUENCES_KEY, "left")
    assert joined.count() == real.count() > 0
    assert joined.where(~F.col(C.SUBJECT_ITEM_ID).eqNullSafe(F.col("logged"))).count() == 0


def test_context_rows_of_an_older_build_gain_the_subject_column(spark, lake, tmp_path):
    """A lake whose context_rows predates subject_item_id (and deletion vectors): the next build
    appends the column and enables the vectors (one ALTER commit each), fills the column for the
    real rows, and the build after that commits nothing."""
    copy = str(tmp_path / "lake")
    shutil.copytree(lake, copy)
    path = C.LakePaths(copy).table(C.T_CONTEXT_ROWS)
    if not table_exists(spark, path):  # run alone, without the module's first build
        run_build_sequences(spark, copy, BUILD, now=NOW)
    old_schema = T.StructType([f for f in C.spark_schema(C.T_CONTEXT_ROWS).fields
                               if f.name != C.SUBJECT_ITEM_ID])
    old = read_table(spark, path).select(*old_schema.names).toPandas()
    shutil.rmtree(path)
    create_table(spark, path, old_schema)  # as the older build created it: NOT NULL enforced
    spark.createDataFrame(old, old_schema).write.format("delta").mode("append").save(path)
    assert C.SUBJECT_ITEM_ID not in read_table(spark, path).columns
    before = table_version(spark, path)
    res = {w.table: w for w in run_build_sequences(spark, copy, BUILD, now=NOW).writes}
    ctx = res[C.T_CONTEXT_ROWS]
    n_real = _table(spark, copy, C.T_CONTEXT_ROWS).where(
        F.col(C.CONTEXT_SOURCE) == C.CONTEXT_REAL).count()
    assert (ctx.operation, ctx.updated, ctx.inserted, ctx.deleted) == ("merge", n_real, 0, 0)
    assert ctx.version == before + 3  # the two ALTER TABLEs, then the MERGE filling the real rows
    assert _table(spark, copy, C.T_CONTEXT_ROWS).schema == C.spark_schema(C.T_CONTEXT_ROWS)
    _assert_subjects_match_events(spark, copy)
    again = run_build_sequences(spark, copy, BUILD, now=NOW)
    assert not any(w.changed for w in again.writes)


def test_sync_table_refuses_a_table_it_cannot_evolve(spark, tmp_path):
    """Only nullable columns appended at the end evolve in place; a table missing a NOT NULL
    contract column (or with its columns in another order) is an error that says to rebuild."""
    path = str(tmp_path / "ctx")
    schema = C.spark_schema(C.T_CONTEXT_ROWS)
    t = datetime(2024, 1, 1, tzinfo=timezone.utc)
    row = (1, t, 5, [2], [1.0], C.CONTEXT_REAL, 9)
    without_label = T.StructType([f for f in schema.fields if f.name != C.LABEL_ITEM_ID])
    spark.createDataFrame([row[:2] + row[3:]], without_label).write.format("delta").save(path)
    with pytest.raises(ValueError, match="Delete .* and rerun build_sequences"):
        sync_table(spark, spark.createDataFrame([row], schema), path, C.T_CONTEXT_ROWS, schema,
                   C.CONTEXT_ROWS_KEY)
    reordered = T.StructType(schema.fields[1:2] + schema.fields[:1] + schema.fields[2:])
    path2 = str(tmp_path / "ctx2")
    spark.createDataFrame([(t, 1) + row[2:]], reordered).write.format("delta").save(path2)
    with pytest.raises(ValueError, match="cannot be evolved in place"):
        sync_table(spark, spark.createDataFrame([row], schema), path2, C.T_CONTEXT_ROWS, schema,
                   C.CONTEXT_ROWS_KEY)


def test_conform_narrows_array_columns_and_refuses_null_elements(spark):
    """Arrays built by `transform` may hold nulls as far as Spark knows; the contract's arrays may
    not: conform for a MERGE re-types them (MERGE needs the exact type) and fails on a real null element."""
    from pyspark.errors import PySparkException

    schema = C.spark_schema(C.T_CONTEXT_ROWS)
    t = datetime(2024, 1, 1, tzinfo=timezone.utc)
    base = spark.createDataFrame([(1, t, 5, [2, 3], [0.5, 0.5], C.CONTEXT_REAL, 9)], schema)

    def with_ids(fn):
        return base.withColumn(C.CONTEXT_CATEGORY_IDS, F.transform(C.CONTEXT_CATEGORY_IDS, fn))

    ok = conform(with_ids(lambda c: c + 1), schema, for_merge=True)
    assert ok.schema[C.CONTEXT_CATEGORY_IDS].dataType == schema[C.CONTEXT_CATEGORY_IDS].dataType
    assert ok.first()[C.CONTEXT_CATEGORY_IDS] == [3, 4]
    bad = conform(with_ids(lambda c: F.when(c == 3, F.lit(None)).otherwise(c)), schema,
                  for_merge=True)
    with pytest.raises(PySparkException, match="context_category_ids: null element in an array"):
        bad.collect()


def test_appended_events_change_only_affected_users(spark, lake):
    before = {t: table_version(spark, C.LakePaths(lake).table(t)) for t in OUTPUTS}
    old_seq = _table(spark, lake, C.T_SEQUENCES, before[C.T_SEQUENCES])
    old_us = _table(spark, lake, C.T_USER_SEQUENCES, before[C.T_USER_SEQUENCES])
    affected = [3, 7]
    late = datetime(2024, 12, 1, tzinfo=timezone.utc)  # after every generated event
    new = spark.createDataFrame(
        [(u, 11, C.EVENT_CONVERSION, late, "search", 12, None) for u in affected]
        + [(3, 13, C.EVENT_VIEW, late, "search", 12, None)], C.spark_schema(C.T_RAW_EVENTS))
    write_raw(spark, new, lake, C.T_RAW_EVENTS, mode="append")
    res = run_build_sequences(spark, lake, BUILD, now=NOW)
    ops = {w.table: w for w in res.writes}
    assert ops[C.T_EVENTS].operation == "insert" and ops[C.T_EVENTS].inserted == 3
    assert ops[C.T_SEQUENCES].inserted == 2 and ops[C.T_SEQUENCES].deleted == 0
    assert ops[C.T_USER_SEQUENCES].updated == 2 and ops[C.T_USER_SEQUENCES].inserted == 0
    assert not ops[C.T_QUARANTINE].changed
    for name, old in ((C.T_SEQUENCES, old_seq), (C.T_USER_SEQUENCES, old_us)):
        now_df = _table(spark, lake, name)
        others = ~F.col(C.USER_ID).isin(affected)
        assert now_df.where(others).exceptAll(old.where(others)).count() == 0, name
        assert old.where(others).exceptAll(now_df.where(others)).count() == 0, name
    new_rows = _table(spark, lake, C.T_SEQUENCES).where(F.col(C.AS_OF_TS) == late).collect()
    assert {r[C.USER_ID] for r in new_rows} == set(affected)
    assert {r[C.SPLIT] for r in new_rows} == {C.SPLIT_TEST}  # stored cutoffs were reused
    changes = (spark.read.format("delta").option("readChangeFeed", "true")
               .option("startingVersion", before[C.T_USER_SEQUENCES] + 1)
               .load(C.LakePaths(lake).table(C.T_USER_SEQUENCES)))
    assert {r[C.USER_ID] for r in changes.collect()} == set(affected)


def test_sync_table_inserts_updates_deletes_by_key(spark, tmp_path):
    path = str(tmp_path / "t")
    schema = C.spark_schema(C.T_USER_SEQUENCES)
    t = datetime(2024, 1, 1, tzinfo=timezone.utc)
    mk = lambda rows: spark.createDataFrame(rows, schema)  # noqa: E731
    r1, r2, r3 = (1, t, [1], [0], "a"), (2, t, [2], [0], "b"), (3, t, [3], [0], "c")
    first = sync_table(spark, mk([r1, r2]), path, "t", schema, [C.USER_ID])
    assert first.operation == "create" and first.inserted == 2
    res = sync_table(spark, mk([(1, t, [1, 5], [0, 1], "a2"), r3]), path, "t", schema, [C.USER_ID])
    assert (res.operation, res.inserted, res.updated, res.deleted) == ("merge", 1, 1, 1)
    assert _rows(read_table(spark, path)) == _rows(mk([(1, t, [1, 5], [0, 1], "a2"), r3]))
    same = sync_table(spark, mk([(1, t, [1, 5], [0, 1], "a2"), r3]), path, "t", schema, [C.USER_ID])
    assert not same.changed and same.version == res.version
    with pytest.raises(ValueError, match="not unique"):
        sync_table(spark, mk([r3, (3, t, [4], [0], "d")]), path, "t", schema, [C.USER_ID])


def test_merge_tagged_upserts_and_deletes_in_one_commit(spark, tmp_path):
    """The tagged MERGE batch inference and sync_table share: upserts and deletes together in
    one commit; a delete of an absent key and the delete rows' other columns change nothing."""
    path = str(tmp_path / "states")
    schema = C.spark_schema(C.T_USER_STATES)
    t = datetime(2024, 1, 1, tzinfo=timezone.utc)
    staged_schema = T.StructType([*(T.StructField(f.name, f.dataType, True) for f in schema.fields),
                                  T.StructField(MERGE_TAG, T.StringType(), False)])
    mk = lambda rows: spark.createDataFrame(rows, staged_schema)  # noqa: E731
    create_table(spark, path, schema)
    merge_tagged(spark, path, schema, [C.USER_ID],
                 mk([(1, [0.5], "m1", t, "a", TAG_UPSERT), (2, [1.5], "m1", t, "b", TAG_UPSERT)]))
    before = table_version(spark, path)
    merge_tagged(spark, path, schema, [C.USER_ID],
                 mk([(1, [2.5], "m2", t, "a2", TAG_UPSERT), (2, None, None, None, None, TAG_DELETE),
                     (3, [3.5], "m2", t, "c", TAG_UPSERT), (9, None, None, None, None, TAG_DELETE)]))
    assert table_version(spark, path) == before + 1
    naive = t.replace(tzinfo=None)  # session zone is UTC
    assert _rows(read_table(spark, path).select(*schema.fieldNames())) == [
        (1, [2.5], "m2", naive, "a2"), (3, [3.5], "m2", naive, "c")]


def test_quarantine_keeps_duplicates_and_first_ingestion_time(spark, tmp_path):
    lake = str(tmp_path / "lake")
    t1, t2 = datetime(2024, 1, 1, tzinfo=timezone.utc), datetime(2024, 2, 1, tzinfo=timezone.utc)
    mk = lambda rows: spark.createDataFrame(  # noqa: E731
        rows, f"{C.ROW_JSON} string, {C.SOURCE_TABLE} string, {C.REASON} string")
    a = ('{"user_id":"x"}', C.T_RAW_EVENTS, C.R_NULL_ID)
    b = ('{"item_id":1}', C.T_RAW_ITEMS, C.R_MALFORMED_CATEGORIES)
    c = ('{"user_id":2}', C.T_RAW_USERS, C.R_BAD_DEMOGRAPHICS)
    sources = [C.T_RAW_EVENTS, C.T_RAW_ITEMS, C.T_RAW_USERS]
    first = sync_quarantine(spark, mk([a, a, b]), lake, sources, t1)
    assert (first.inserted, first.deleted) == (3, 0)  # two identical bad rows stay two rows
    again = sync_quarantine(spark, mk([a, b, a]), lake, sources, t2)
    assert not again.changed and again.version == first.version
    third = sync_quarantine(spark, mk([a, b, c]), lake, sources, t2)
    assert (third.inserted, third.deleted) == (1, 1)
    got = sorted((r[C.REASON], r[C.INGESTED_AT]) for r in _table(spark, lake, C.T_QUARANTINE)
                 .collect())
    naive = lambda d: d.replace(tzinfo=None)  # noqa: E731  (session zone is UTC)
    assert got == sorted([(C.R_NULL_ID, naive(t1)), (C.R_MALFORMED_CATEGORIES, naive(t1)),
                          (C.R_BAD_DEMOGRAPHICS, naive(t2))])


def test_ingest_cli_on_examples_then_build(spark, tmp_path):
    lake = str(tmp_path / "lake")
    ex = REPO / "examples"
    ingest_main([
        "--lake", lake, "--events", str(ex / "events.csv"), "--user-col", "user",
        "--item-col", "item", "--ts-col", "timestamp", "--ts-format", "yyyy-MM-dd HH:mm:ss",
        "--event-type-col", "action", "--event-type-map", "purchase=conversion",
        "--subject-col", "subject", "--surface-col", "surface",
        "--items", str(ex / "items.csv"), "--categories-col", "categories",
        "--item-id-col", "item_id", "--advertiser-col", "advertiser",
        "--users", str(ex / "users.csv"), "--age-col", "age", "--country-col", "country",
        "--gender-col", "gender"])
    cfg = BuildConfig(val_start=datetime(2024, 3, 5, tzinfo=timezone.utc),
                      test_start=datetime(2024, 3, 6, tzinfo=timezone.utc))
    res = run_build_sequences(spark, lake, cfg, now=datetime(2024, 6, 1, tzinfo=timezone.utc))
    assert all(r.reconciles for r in res.reports)
    assert sum(r.n_quarantined for r in res.reports) == 10 + 5 + 4
    assert load_cutoffs(spark, lake).origin == "explicit"
    # user 1 bought items 3 and 7 in the same second: two examples, same history, and the
    # context rows stay distinguishable through label_item_id
    seq = _table(spark, lake, C.T_SEQUENCES).where(
        (F.col(C.USER_ID) == 1) & (F.col(C.AS_OF_TS) == datetime(2024, 3, 9, 10)))
    got = sorted((r[C.LABEL_ITEM_ID], tuple(r[C.ITEM_IDS])) for r in seq.collect())
    assert [g[0] for g in got] == [3, 7] and got[0][1] == got[1][1]
    ctx = _table(spark, lake, C.T_CONTEXT_ROWS).where(
        (F.col(C.USER_ID) == 1) & (F.col(C.AS_OF_TS) == datetime(2024, 3, 9, 10)))
    assert sorted(r[C.LABEL_ITEM_ID] for r in ctx.collect()) == [3, 7]  # pseudo only: no subject


def test_help_documents_every_option():
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "build_sequences.py"), "--help"],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout
    for flag in ("--lake", "--master", "--driver-memory", "--max-len", "--min-history", "--val-start", "--test-start",
                 "--val-frac", "--test-frac", "--context-top-k", "--now", "--repair-duplicates"):
        assert flag in out


def test_spark_submit_rerun_on_a_built_lake_commits_nothing(lake, tmp_path):
    """Same input -> the job run through spark-submit finds nothing to change."""
    copy = str(tmp_path / "lake")
    shutil.copytree(lake, copy)
    venv_bin = Path(sys.executable).parent
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable,
               SPARK_LOCAL_IP="127.0.0.1")
    cmd = [str(venv_bin / "spark-submit"), "--master", "local[2]",
           str(REPO / "jobs" / "build_sequences.py"), "--lake", copy, "--max-len",
           str(BUILD.max_len), "--shuffle-partitions", "4", "--now", NOW.isoformat()]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(next(line for line in proc.stdout.splitlines()
                              if line.startswith("summary:"))[len("summary:"):])
    assert not any(summary["changed"].values()), summary["changed"]
    assert set(summary["versions"]) >= set(OUTPUTS)
