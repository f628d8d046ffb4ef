"""A scoped sync diffs against rows the caller already read (delta_io.KnownRows) while the table
is still at the version they were read at, and reads the table at any other version; given the
rows the new content adds as well, it inserts them without a diff.

Why: the incremental build reads the touched users' clean events to validate the increment, then
synchronised ``events`` for the same users by scanning the whole table again, a scan that cost
5.8 s on a 1M-user lake against 1.6 s on a 100k-user one for the same increment.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from pyspark.sql import functions as F

import ctt_contracts as C
from models.lake_read import read_arrow
from pipelines.delta_io import KnownRows, sync_table, table_version

pytestmark = pytest.mark.spark

DAY1 = datetime(2024, 3, 1, tzinfo=timezone.utc)
DAY2 = DAY1 + timedelta(days=1)
KEYS = C.RAW_EVENTS_COLUMNS
TOUCHED = (0, 4)


def _event(user: int, item: int, ts: datetime):
    return (user, item, C.EVENT_CONVERSION, ts, "home", None, None)


def _frame(spark, rows):
    return spark.createDataFrame(rows, C.spark_schema(C.T_EVENTS))


def test_known_rows_replace_the_scan_only_at_their_version(spark, tmp_path):
    path = tmp_path / C.T_EVENTS
    schema = C.spark_schema(C.T_EVENTS)
    day1 = [_event(u, u % 7, DAY1 + timedelta(minutes=u)) for u in range(40)]
    sync_table(spark, _frame(spark, day1).repartition(4), str(path), C.T_EVENTS, schema, KEYS)
    v1 = table_version(spark, str(path))
    before = [r for r in day1 if r[0] in TOUCHED]
    day2 = [_event(u, 100 + u, DAY2 + timedelta(minutes=u)) for u in TOUCHED]
    scope = spark.createDataFrame([(u,) for u in TOUCHED], f"{C.USER_ID} long")

    aside = tmp_path / "aside"  # a sync that read day 1's files fails while they are away
    aside.mkdir()
    day1_files = sorted(path.glob("*.parquet"))
    for f in day1_files:
        f.rename(aside / f.name)
    known = _frame(spark, before)  # the new content built from the known rows, as the build does
    res = sync_table(spark, known.unionByName(_frame(spark, day2)), str(path), C.T_EVENTS, schema,
                     KEYS, scope=scope, check_table_duplicates=False, known=KnownRows(v1, known))
    for f in day1_files:
        (aside / f.name).rename(f)
    assert (res.operation, res.inserted, res.deleted, res.updated) == ("insert", 2, 0, 0)
    got = read_arrow(str(path))[0].to_pandas()
    assert len(got) == 42 and not got.duplicated(KEYS).any()

    # the table moved on since v1: the (now wrong) known rows are ignored and the table is read
    res = sync_table(spark, _frame(spark, before + day2), str(path), C.T_EVENTS, schema, KEYS,
                     scope=scope, check_table_duplicates=False, known=KnownRows(v1, _frame(spark, [])))
    assert not res.changed and res.operation == "noop"


def _unreadable(df):
    """``df``, but reading any of its rows fails: proof that a sync did not diff against it."""
    return df.where(F.raise_error(F.lit("the sync read the known rows")).isNull())


def test_a_known_addition_is_inserted_without_a_diff_and_a_false_one_is_refused(spark, tmp_path):
    path = tmp_path / C.T_EVENTS
    schema = C.spark_schema(C.T_EVENTS)
    day1 = [_event(u, u % 7, DAY1 + timedelta(minutes=u)) for u in range(40)]
    sync_table(spark, _frame(spark, day1), str(path), C.T_EVENTS, schema, KEYS)
    v1 = table_version(spark, str(path))
    before = _frame(spark, [r for r in day1 if r[0] in TOUCHED])
    day2 = _frame(spark, [_event(u, 100 + u, DAY2 + timedelta(minutes=u)) for u in TOUCHED])
    scope = spark.createDataFrame([(u,) for u in TOUCHED], f"{C.USER_ID} long")

    res = sync_table(spark, before.unionByName(day2), str(path), C.T_EVENTS, schema, KEYS,
                     scope=scope, check_table_duplicates=False,
                     known=KnownRows(v1, _unreadable(before), added=day2))
    assert (res.operation, res.inserted, res.version) == ("insert", 2, v1 + 1)
    got = read_arrow(str(path))[0].to_pandas()
    assert len(got) == 42 and not got.duplicated(KEYS).any()

    nothing = sync_table(spark, before.unionByName(day2), str(path), C.T_EVENTS, schema, KEYS,
                         scope=scope, check_table_duplicates=False,
                         known=KnownRows(v1 + 1, _unreadable(before), added=day2.limit(0)))
    assert not nothing.changed and nothing.version == v1 + 1

    day3 = _frame(spark, [_event(0, 300, DAY2 + timedelta(days=1))])
    false = KnownRows(v1 + 1, _unreadable(before), added=day2.limit(1).unionByName(day3))
    with pytest.raises(ValueError, match="1 of the 2 rows the caller gave as new were already"):
        sync_table(spark, before.unionByName(day2).unionByName(day3), str(path), C.T_EVENTS,
                   schema, KEYS, scope=scope, check_table_duplicates=False, known=false)
    got = read_arrow(str(path))[0].to_pandas()
    assert len(got) == 43 and not got.duplicated(KEYS).any()  # the one new row, no copy
