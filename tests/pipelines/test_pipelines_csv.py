"""CSV import robustness: RFC 4180 quoting, records with the wrong number of fields quarantined
with their text, the fail-fast threshold in ingest and build, append row counts, and a lake
written before session_id existed."""
from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone

import pytest
from pyspark.sql import functions as F
from pyspark.sql import types as T

import ctt_contracts as C
from pipelines import ingest as I
from pipelines.build import run_build_sequences
from pipelines.build_config import BuildConfig
from pipelines.cli import ingest_main
from pipelines.delta_io import RAW_ROW_JSON, create_table, raw_schema, read_table, table_exists
from pipelines.validate import (QuarantineThresholdExceeded, validate_events, validate_items,
                                validate_users)

pytestmark = pytest.mark.spark

NOW = datetime(2024, 6, 1, tzinfo=timezone.utc)
EV_MAP = I.EventMapping(user_col="user", item_col="item", ts_col="ts", event_type_col="action",
                        event_type_map={"buy": C.EVENT_CONVERSION}, surface_col="surface")
# Records: 1 plain, 2 a quoted separator + "" escapes, 3 a quoted newline, 4 too few fields,
# 5 too many fields, 6 plain again. Seven physical lines, six records.
EVENTS_CSV = (
    'user,item,action,ts,surface\n'
    '1,10,view,1709251200,home\n'
    '1,11,buy,1709251260,"say ""hi"", then buy"\n'
    '2,10,view,1709251300,"two\nlines"\n'
    '2,11,buy\n'
    '3,10,view,1709251400,home,EXTRA\n'
    '3,11,buy,1709251500,home\n'
)
ITEMS_CSV = 'item_id,categories\n10,1|2\n11,"2"\n12\n'
USERS_CSV = 'user,age\n1,30\n2,40,extra\n'


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_rfc4180_quoting_and_wrong_field_counts(spark, tmp_path):
    path = _write(tmp_path, "events.csv", EVENTS_CSV)
    raw = I.ingest_events(spark, path, "csv", EV_MAP)
    rows = raw.collect()
    assert len(rows) == 6  # one row per record, the quoted newline stays inside its field
    surfaces = {r[C.SURFACE] for r in rows}
    assert {'say "hi", then buy', "two\nlines"} <= surfaces
    items, _ = I.ingest_items(spark, _write(tmp_path, "items.csv", ITEMS_CSV), "csv",
                              I.ItemMapping(item_col="item_id", categories_col="categories"))
    clean_items, q_items = validate_items(items)
    assert sorted(r[C.ITEM_ID] for r in clean_items.collect()) == [10, 11]
    assert [r[C.REASON] for r in q_items.collect()] == [C.R_WRONG_FIELD_COUNT]
    clean, quarantine = validate_events(raw, clean_items, NOW)
    assert clean.count() == 4
    bad = {json.loads(r[C.ROW_JSON])[C.SOURCE_RECORD]: r[C.REASON] for r in quarantine.collect()}
    # the source record is kept verbatim, extra fields included: nothing is lost silently
    assert bad == {"2,11,buy": C.R_WRONG_FIELD_COUNT,
                   "3,10,view,1709251400,home,EXTRA": C.R_WRONG_FIELD_COUNT}
    assert raw.where(F.col(RAW_ROW_JSON).isNotNull()).count() == 2  # only the broken records

    users = I.ingest_users(spark, _write(tmp_path, "users.csv", USERS_CSV), "csv",
                           I.UserMapping(user_col="user", age_col="age"))
    clean_users, q_users = validate_users(users)
    assert [r[C.USER_ID] for r in clean_users.collect()] == [1]
    assert [(json.loads(r[C.ROW_JSON])[C.SOURCE_RECORD], r[C.REASON])
            for r in q_users.collect()] == [("2,40,extra", C.R_WRONG_FIELD_COUNT)]



def _ingest_args(lake, events, *extra):
    return ["--lake", lake, "--events", events, "--user-col", "user", "--item-col", "item",
            "--ts-col", "ts", "--event-type-col", "action", "--event-type-map", "buy=conversion",
            *extra]


GOOD_LOG = "user,item,action,ts\n" + "".join(
    f"{u},{10 + (k % 3)},{'buy' if k % 2 else 'view'},{1709251200 + 60 * k}\n"
    for u in (1, 2) for k in range(6))
ITEMS = "item_id,categories\n10,1\n11,2\n12,1|2\n"


def test_ingest_stops_on_a_wrong_timestamp_format_and_writes_nothing(spark, tmp_path, capsys):
    lake = str(tmp_path / "lake")
    events = _write(tmp_path, "log.csv", GOOD_LOG)
    with pytest.raises(SystemExit) as stop:
        ingest_main(_ingest_args(lake, events, "--ts-format", "yyyy-MM-dd HH:mm:ss"))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "12 of 12 rows (100.0%)" in err and C.R_BAD_TIMESTAMP in err
    assert '"event_ts":"170925' in err  # an example row with the original text
    assert not table_exists(spark, C.LakePaths(lake).table(C.T_RAW_EVENTS))
    versions = ingest_main(_ingest_args(lake, events, "--ts-format", "yyyy-MM-dd HH:mm:ss",
                                        "--max-quarantine-frac", "1"))
    assert versions == {C.T_RAW_EVENTS: 1}  # overridden: imported, the build will quarantine


def test_build_stops_when_a_source_is_mostly_quarantined(spark, tmp_path):
    lake = str(tmp_path / "lake")
    # an items file of another catalogue: every event's item is unknown
    ingest_main(_ingest_args(lake, _write(tmp_path, "log.csv", GOOD_LOG), "--items",
                             _write(tmp_path, "items.csv", "item_id,categories\n90,1\n"),
                             "--item-id-col", "item_id", "--categories-col", "categories"))
    with pytest.raises(QuarantineThresholdExceeded, match="unknown_item: 12 rows") as err:
        run_build_sequences(spark, lake, BuildConfig(), now=NOW)
    assert "raw_events: 12 of 12 rows (100.0%)" in str(err.value)
    paths = C.LakePaths(lake)
    assert not any(table_exists(spark, paths.table(t))
                   for t in (C.T_ITEMS, C.T_EVENTS, C.T_QUARANTINE, C.T_SEQUENCES))
    with pytest.raises(SystemExit):
        from pipelines.cli import build_sequences_main

        build_sequences_main(["--lake", lake, "--now", NOW.isoformat()])
    accept = BuildConfig(max_quarantine_frac=1.0, val_start=NOW, test_start=NOW)
    res = run_build_sequences(spark, lake, accept, now=NOW)
    assert next(r for r in res.reports if r.source_table == C.T_RAW_EVENTS).n_clean == 0


def test_append_reports_the_rows_it_wrote(spark, tmp_path, capsys):
    lake = str(tmp_path / "lake")
    items = _write(tmp_path, "items.csv", ITEMS)
    item_args = ["--items", items, "--item-id-col", "item_id", "--categories-col", "categories"]
    ingest_main(_ingest_args(lake, _write(tmp_path, "log.csv", GOOD_LOG), *item_args))
    assert '"raw_events": 12' in capsys.readouterr().out
    more = "user,item,action,ts\n" + "".join(f"3,10,buy,{1709260000 + k}\n" for k in range(5))
    ingest_main(_ingest_args(lake, _write(tmp_path, "more.csv", more), "--mode", "append"))
    out = capsys.readouterr().out
    assert '"raw_events": 5' in out
    line = next(x for x in out.splitlines() if x.startswith(C.T_RAW_EVENTS) and " v" in x)
    assert "append" in line and "+5 " in line
    assert read_table(spark, C.LakePaths(lake).table(C.T_RAW_EVENTS)).count() == 17


def test_lake_written_before_session_id_existed(spark, tmp_path):
    """Old raw_events / events tables get the nullable column on the next write (no rebuild)."""
    lake = str(tmp_path / "lake")
    ingest_main(_ingest_args(lake, _write(tmp_path, "log.csv", GOOD_LOG), "--items",
                             _write(tmp_path, "items.csv", ITEMS), "--item-id-col", "item_id",
                             "--categories-col", "categories"))
    run_build_sequences(spark, lake, BuildConfig(), now=NOW)
    paths = C.LakePaths(lake)
    for table, schema in ((C.T_RAW_EVENTS, raw_schema(C.T_RAW_EVENTS)),
                          (C.T_EVENTS, C.spark_schema(C.T_EVENTS))):  # recreate without it
        old_schema = T.StructType([f for f in schema.fields if f.name != C.SESSION_ID])
        rows = read_table(spark, paths.table(table)).select(*old_schema.fieldNames()).collect()
        shutil.rmtree(paths.table(table))
        create_table(spark, paths.table(table), old_schema)
        spark.createDataFrame(rows, old_schema).write.format("delta").mode("append").save(
            paths.table(table))
        assert read_table(spark, paths.table(table)).schema == old_schema
    res = run_build_sequences(spark, lake, BuildConfig(), now=NOW)  # reads raw as null sessions
    assert all(r.reconciles for r in res.reports)
    assert read_table(spark, paths.table(C.T_EVENTS)).schema == C.spark_schema(C.T_EVENTS)
    more = "user,item,action,ts,session\n3,10,buy,1709260000,s1\n"
    ingest_main(_ingest_args(lake, _write(tmp_path, "more.csv", more), "--mode", "append",
                             "--session-col", "session"))
    raw = read_table(spark, paths.table(C.T_RAW_EVENTS))
    assert raw.where(F.col(C.SESSION_ID) == "s1").count() == 1 and raw.count() == 13
    res = run_build_sequences(spark, lake, BuildConfig(), now=NOW)
    ops = {w.table: w for w in res.writes}
    assert ops[C.T_EVENTS].inserted == 1
