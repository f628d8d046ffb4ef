"""A log in the exact REES46 layout (views, carts, purchases; `... UTC` timestamps; 19-digit
category ids; sessions; no items file, no users file) imported and built end to end with derived
subjects, plus the vocabulary rules. The CSV is written by the test, never read from the data
folder."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from pyspark.sql import functions as F

import ctt_contracts as C
from pipelines import feast_ops
from pipelines import ingest as I
from pipelines.build import run_build_sequences
from pipelines.build_config import BuildConfig
from pipelines.cli import build_parser, ingest_main, ingest_parser, run_ingest
from pipelines.delta_io import read_table, table_exists
from pipelines.subjects import (DERIVE_LAST_OTHER_VIEW, DERIVE_LAST_VIEW, SubjectCoverage,
                                load_coverage)

HEADER = "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session"
CAT_A, CAT_B, CAT_C = "2053013552326770905", "2053013555631882655", "2232732093077520756"
ROWS = [
    # user 541, one session: browses 100, 200, 300, carts 300, buys 300
    f"2019-10-01 00:00:00 UTC,view,100,{CAT_B},electronics.smartphone,apple,489.07,541,s1",
    f"2019-10-01 00:00:10 UTC,view,200,{CAT_B},electronics.smartphone,xiaomi,130.01,541,s1",
    f"2019-10-01 00:01:00 UTC,view,300,{CAT_C},,shiseido,35.79,541,s1",
    f"2019-10-01 00:01:05 UTC,cart,300,{CAT_C},,shiseido,35.79,541,s1",
    f"2019-10-01 00:02:00 UTC,purchase,300,{CAT_C},,shiseido,35.79,541,s1",
    # user 542: buys what it viewed; an hour later views 400 then 100, buys 400
    f"2019-10-01 00:05:00 UTC,view,100,{CAT_B},electronics.smartphone,apple,489.07,542,s2",
    f"2019-10-01 00:06:00 UTC,purchase,100,{CAT_B},electronics.smartphone,apple,489.07,542,s2",
    f"2019-10-01 01:00:00 UTC,view,400,{CAT_A},appliances.environment.water_heater,aqua,33.20,542,s3",
    f"2019-10-01 01:01:00 UTC,view,100,{CAT_B},electronics.smartphone,apple,489.07,542,s3",
    f"2019-10-01 01:02:00 UTC,purchase,400,{CAT_A},appliances.environment.water_heater,aqua,33.20,542,s3",
    # user 543: a purchase without any view
    f"2019-10-01 02:00:00 UTC,purchase,200,{CAT_B},electronics.smartphone,xiaomi,130.01,543,s4",
]
TS_FORMAT = "yyyy-MM-dd HH:mm:ss 'UTC'"
NOW = datetime(2024, 1, 1, tzinfo=timezone.utc)
LATER = datetime(2030, 1, 1, tzinfo=timezone.utc)  # cutoffs after every label: all train
BUILD = BuildConfig(val_start=LATER, test_start=LATER)


def rees46_args(events: str, lake: str, *extra: str):
    return ["--lake", lake, "--events", events, "--user-col", "user_id", "--item-col", "product_id",
            "--ts-col", "event_time", "--ts-format", TS_FORMAT, "--event-type-col", "event_type",
            "--event-type-map", "view=view,cart=conversion,purchase=conversion",
            "--session-col", "user_session", "--item-categories-from-events", "category_id",
            *extra]


@pytest.fixture()
def rees46_csv(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("\n".join([HEADER, *ROWS]) + "\n", encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------ vocabulary (pure)
def test_vocabulary_identity_dense_and_extension():
    assert I.build_vocabulary(["3", "17"]) == {"3": 3, "17": 17}
    # beyond int32 (or not canonical): dense, in numeric order
    assert I.build_vocabulary([CAT_C, CAT_A, CAT_B]) == {CAT_A: 0, CAT_B: 1, CAT_C: 2}
    assert I.build_vocabulary(["10", "9", "007"]) == {"007": 0, "9": 1, "10": 2}
    assert I.build_vocabulary(["b", "a"]) == {"a": 0, "b": 1}
    # extending a stored vocabulary keeps its ids; new names follow the same rule
    assert I.build_vocabulary(["5", "3"], {"3": 3}) == {"3": 3, "5": 5}
    base = {CAT_A: 0, CAT_B: 1}
    assert I.build_vocabulary([CAT_C, CAT_A], base) == {CAT_A: 0, CAT_B: 1, CAT_C: 2}
    assert I.build_vocabulary(["x"], {"3": 3}) == {"3": 3, "x": 4}
    line = I.vocabulary_summary({CAT_A: 0, CAT_B: 1, CAT_C: 2}, base)
    assert "3 categories (1 new)" in line and "densely" in line and CAT_A not in line


def test_help_documents_the_new_options():
    text = ingest_parser().format_help()
    for flag in ("--session-col", "--item-categories-from-events", "--vocabulary-out",
                 "--max-quarantine-frac", "'UTC'", "2053013555631882655"):
        assert flag in text, flag
    text = build_parser().format_help()
    for flag in ("--derive-subject", "last_other_view", "--subject-window-minutes",
                 "--max-quarantine-frac"):
        assert flag in text, flag


# ------------------------------------------------------------------ end to end
@pytest.mark.spark
def test_rees46_layout_imports_and_builds_without_users(spark, rees46_csv, tmp_path, capsys):
    lake, vocab_file = str(tmp_path / "lake"), tmp_path / "vocab.json"
    versions = ingest_main(rees46_args(rees46_csv, lake, "--vocabulary-out", str(vocab_file)))
    out = capsys.readouterr().out
    assert set(versions) == {C.T_RAW_EVENTS, C.T_RAW_ITEMS}  # no users file, no raw_users
    assert "category vocabulary: 3 categories (3 new), ids 0..2" in out and CAT_A not in out
    assert '"raw_events": 11' in out and '"raw_items": 4' in out
    assert json.loads(vocab_file.read_text()) == {CAT_A: 0, CAT_B: 1, CAT_C: 2}
    assert I.load_vocabulary(spark, lake) == {CAT_A: 0, CAT_B: 1, CAT_C: 2}

    raw = read_table(spark, C.LakePaths(lake).table(C.T_RAW_EVENTS))
    first = raw.orderBy(C.EVENT_TS).first()
    assert first[C.EVENT_TS] == datetime(2019, 10, 1)  # session zone UTC: naive UTC
    assert first[C.SESSION_ID] == "s1" and first[C.EVENT_TYPE] == C.EVENT_VIEW
    assert raw.where(F.col(C.ROW_JSON).isNotNull()).count() == 0
    items = {r[C.ITEM_ID]: (list(r[C.CATEGORY_IDS]), list(r[C.CATEGORY_WEIGHTS]))
             for r in read_table(spark, C.LakePaths(lake).table(C.T_RAW_ITEMS)).collect()}
    assert items == {100: ([1], [1.0]), 200: ([1], [1.0]), 300: ([2], [1.0]), 400: ([0], [1.0])}

    cfg = BuildConfig(val_start=LATER, test_start=LATER, derive_subject=DERIVE_LAST_OTHER_VIEW)
    res = run_build_sequences(spark, lake, cfg, now=NOW)
    assert all(r.reconciles and r.n_quarantined == 0 for r in res.reports)
    assert C.T_RAW_USERS not in res.input_versions
    paths = C.LakePaths(lake)
    assert read_table(spark, paths.table(C.T_USERS)).count() == 0
    events = read_table(spark, paths.table(C.T_EVENTS))
    assert events.schema == C.spark_schema(C.T_EVENTS)
    assert events.where(F.col(C.SESSION_ID).isNull()).count() == 0
    assert events.where(F.col(C.SUBJECT_ITEM_ID).isNotNull()).count() == 0  # logged as it was
    # 5 conversions: 541's cart and purchase of 300 come from 200 (the last *other* view);
    # 542's purchase of 400 from 100; 542's purchase of 100 and 543's have no other view
    want = SubjectCoverage(DERIVE_LAST_OTHER_VIEW, 60, 5, 0, 3, 0, 0)
    assert res.subject_coverage == want == load_coverage(spark, lake)
    assert res.summary()["subject_coverage"]["share_derived"] == pytest.approx(0.6)
    real = (read_table(spark, paths.table(C.T_CONTEXT_ROWS))
            .where(F.col(C.CONTEXT_SOURCE) == C.CONTEXT_REAL).collect())
    # the examples: 541 buys 300 (history [300]), 542 buys 400 (history [100])
    assert sorted((r[C.USER_ID], r[C.LABEL_ITEM_ID], list(r[C.CONTEXT_CATEGORY_IDS]))
                  for r in real) == [(541, 300, [1]), (542, 400, [1])]

    again = run_build_sequences(spark, lake, cfg, now=NOW)
    assert not any(w.changed for w in again.writes) and again.versions == res.versions
    assert again.subject_coverage == want

    last = run_build_sequences(spark, lake, BuildConfig(
        val_start=LATER, test_start=LATER, derive_subject=DERIVE_LAST_VIEW), now=NOW)
    assert last.subject_coverage == SubjectCoverage(DERIVE_LAST_VIEW, 60, 5, 0, 4, 0, 3)
    assert load_coverage(spark, lake) == last.subject_coverage

    # Feast's user profile snapshot of an empty users table: zero rows, the snapshot's schema
    profile = feast_ops.export_snapshot(lake, C.T_USER_PROFILE_FEATURES, now=NOW)
    assert profile.written and profile.rows == 0
    import pyarrow.parquet as pq

    table = pq.read_table(profile.path)
    assert table.num_rows == 0
    assert table.schema.names == feast_ops.SNAPSHOT_SCHEMAS[
        C.T_USER_PROFILE_FEATURES].names
    item_snap = feast_ops.export_snapshot(lake, C.T_ITEM_CATEGORY_FEATURES, now=NOW)
    assert item_snap.rows == 4


@pytest.mark.spark
def test_zone_name_pattern_reads_the_same_instants(spark, rees46_csv):
    common = dict(user_col="user_id", item_col="product_id", ts_col="event_time",
                  event_type_col="event_type")
    literal = I.ingest_events(spark, rees46_csv, "csv", I.EventMapping(ts_format=TS_FORMAT, **common))
    zoned = I.ingest_events(spark, rees46_csv, "csv",
                            I.EventMapping(ts_format="yyyy-MM-dd HH:mm:ss z", **common))
    a = sorted(r[C.EVENT_TS] for r in literal.collect())
    assert a == sorted(r[C.EVENT_TS] for r in zoned.collect()) and None not in a


@pytest.mark.spark
def test_append_extends_the_vocabulary_and_adds_only_new_items(spark, rees46_csv, tmp_path,
                                                               capsys):
    lake = str(tmp_path / "lake")
    ingest_main(rees46_args(rees46_csv, lake))
    more = tmp_path / "more.csv"
    new_cat = "2053013553341792533"  # sorts before the others, still gets the next id
    more.write_text("\n".join([
        HEADER,
        f"2019-10-01 03:00:00 UTC,view,500,{new_cat},,,1.00,541,s9",
        f"2019-10-01 03:01:00 UTC,purchase,500,{new_cat},,,1.00,541,s9",
        f"2019-10-01 03:02:00 UTC,view,100,{CAT_B},,,1.00,541,s9",
    ]) + "\n", encoding="utf-8")
    capsys.readouterr()
    args = ingest_parser().parse_args(rees46_args(str(more), lake, "--mode", "append"))
    result = run_ingest(spark, args, now=NOW)
    assert result.rows_written() == {C.T_RAW_EVENTS: 3, C.T_RAW_ITEMS: 1}
    assert result.vocabulary == {CAT_A: 0, CAT_B: 1, CAT_C: 2, new_cat: 3}
    assert I.load_vocabulary(spark, lake) == result.vocabulary
    assert "4 categories (1 new)" in capsys.readouterr().out
    paths = C.LakePaths(lake)
    assert read_table(spark, paths.table(C.T_RAW_EVENTS)).count() == len(ROWS) + 3
    items = read_table(spark, paths.table(C.T_RAW_ITEMS))
    assert items.count() == 5 and items.where(F.col(C.ITEM_ID) == 500).first()[
        C.CATEGORY_IDS] == [3]
    res = run_build_sequences(spark, lake, BUILD, now=NOW)
    assert all(r.n_quarantined == 0 for r in res.reports)
    assert not table_exists(spark, paths.table(C.T_RAW_USERS))


def test_feast_serves_unknown_demographics_without_users(tmp_path):
    """No users file -> an empty users table: the profile snapshot is empty, apply and
    materialize work, and a user's profile lookup is None (the resolver's "unknown")."""
    from datetime import timedelta

    import pyarrow as pa
    from deltalake import write_deltalake

    lake, paths = str(tmp_path / "lake"), C.LakePaths(str(tmp_path / "lake"))
    write_deltalake(paths.table(C.T_USERS), pa.table({
        C.USER_ID: pa.array([], pa.int64()), C.AGE_BUCKET: pa.array([], pa.int32()),
        C.COUNTRY: pa.array([], pa.string()), C.GENDER: pa.array([], pa.string())}))
    write_deltalake(paths.table(C.T_ITEMS), pa.table({
        C.ITEM_ID: pa.array([100], pa.int64()), C.CATEGORY_IDS: pa.array([[1]], pa.list_(pa.int32())),
        C.CATEGORY_WEIGHTS: pa.array([[1.0]], pa.list_(pa.float32())),
        C.ADVERTISER_ID: pa.array([0], pa.int64())}))
    state_ts = datetime.now(timezone.utc) - timedelta(minutes=5)
    write_deltalake(paths.table(C.T_USER_STATES), pa.table({
        C.USER_ID: pa.array([541], pa.int64()),
        C.HIDDEN_STATE: pa.array([[0.5] * 4], pa.list_(pa.float32())),
        C.MODEL_VERSION: pa.array(["v1"]), C.STATE_TS: pa.array([state_ts], pa.timestamp("us", tz="UTC")),
        C.SEQUENCE_HASH: pa.array(["h"])}))
    results = {r.snapshot: r for r in feast_ops.export_feature_tables(lake)}
    assert results[C.T_USER_PROFILE_FEATURES].rows == 0
    feast_data = tmp_path / "feast"
    store = feast_ops.apply(lake, feast_data)
    feast_ops.materialize(store, state_ts - timedelta(days=1), datetime.now(timezone.utc))
    with feast_ops.feast_env(lake, feast_data):
        got = store.get_online_features(
            features=[C.feature_ref(C.FV_USER_PROFILE, C.AGE_BUCKET),
                      C.feature_ref(C.FV_USER_PROFILE, C.GENDER),
                      C.feature_ref(C.FV_USER_SEQUENCE_STATE, C.MODEL_VERSION)],
            entity_rows=[{C.USER_ID: 541}]).to_dict()
    assert got[C.AGE_BUCKET] == [None] and got[C.GENDER] == [None]
    assert got[C.MODEL_VERSION] == ["v1"]
