"""Ingest of a real-looking log (examples/) and of the supported formats, checked through
validation: unparseable values become nulls and are quarantined with their original text."""
from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest

import ctt_contracts as C
from pipelines import ingest as I
from pipelines.delta_io import RAW_ROW_JSON
from pipelines.validate import validate_events, validate_items, validate_users

pytestmark = pytest.mark.spark

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NOW = datetime(2024, 6, 1, tzinfo=timezone.utc)

EVENTS_MAP = I.EventMapping(
    user_col="user", item_col="item", ts_col="timestamp", ts_format="yyyy-MM-dd HH:mm:ss",
    event_type_col="action", event_type_map={"purchase": C.EVENT_CONVERSION},
    subject_col="subject", surface_col="surface")
ITEMS_MAP = I.ItemMapping(item_col="item_id", categories_col="categories",
                          advertiser_col="advertiser")
USERS_MAP = I.UserMapping(user_col="user", age_col="age", country_col="country",
                          gender_col="gender")


@pytest.fixture(scope="module")
def example(spark):
    events = I.ingest_events(spark, str(EXAMPLES / "events.csv"), "csv", EVENTS_MAP)
    items, vocab = I.ingest_items(spark, str(EXAMPLES / "items.csv"), "csv", ITEMS_MAP)
    users = I.ingest_users(spark, str(EXAMPLES / "users.csv"), "csv", USERS_MAP)
    return events, items, users, vocab


def test_example_items(example):
    _, items, _, vocab = example
    assert vocab == {str(i): i for i in range(8)}  # integer category tokens keep their ids
    clean, quarantine = validate_items(items)
    assert clean.count() == 40
    reasons = Counter(r[C.REASON] for r in quarantine.collect())
    assert reasons == {C.R_MALFORMED_CATEGORIES: 3, C.R_NULL_ID: 1, C.R_DUPLICATE_KEY: 1}
    originals = {r[C.ROW_JSON] for r in quarantine.collect()}
    assert any('"1:abc"' in o for o in originals)  # the unparseable weight, verbatim
    assert any('"zz"' in o for o in originals)
    by_id = {r[C.ITEM_ID]: r for r in clean.collect()}
    assert by_id[5][C.CATEGORY_WEIGHTS] == [1.0] * len(by_id[5][C.CATEGORY_IDS])  # no weights
    assert by_id[1][C.CATEGORY_IDS] == [2, 3, 5]
    assert by_id[1][C.CATEGORY_WEIGHTS] == pytest.approx([0.84, 0.18, 0.14])


def test_example_users(example):
    _, _, users, _ = example
    clean, quarantine = validate_users(users)
    assert clean.count() == 20
    assert Counter(r[C.REASON] for r in quarantine.collect()) == {
        C.R_BAD_DEMOGRAPHICS: 2, C.R_DUPLICATE_KEY: 1, C.R_NULL_ID: 1}
    got = {r[C.USER_ID]: (r[C.AGE_BUCKET], r[C.COUNTRY], r[C.GENDER]) for r in clean.collect()}
    assert got[1] == (2, "DE", "m")  # 22 years -> bucket 2, "M" -> "m"
    assert got[3][2] in C.GENDERS
    src = pd.read_csv(EXAMPLES / "users.csv", dtype=str, keep_default_na=False)
    row4 = src[src.user == "4"].iloc[0]
    assert got[4][0] == 0 if row4.age == "" else got[4][0] > 0  # missing age -> unknown (0)
    assert all(c != "" for _, c, _ in got.values())  # blank country -> "unknown"
    bad = [json.loads(r[C.ROW_JSON]) for r in quarantine.collect()]
    assert {C.USER_ID: "21", C.AGE_BUCKET: "old", C.COUNTRY: "US", C.GENDER: "F"} in bad


def test_example_events_every_bad_row_quarantined_with_original_text(example):
    events, items, _, _ = example
    clean_items, _ = validate_items(items)
    clean, quarantine = validate_events(events, clean_items, NOW)
    n_rows = len(pd.read_csv(EXAMPLES / "events.csv", dtype=str))
    assert events.count() == n_rows
    reasons = Counter(r[C.REASON] for r in quarantine.collect())
    assert reasons == {
        C.R_NULL_ID: 2, C.R_ID_OUT_OF_RANGE: 1, C.R_UNKNOWN_EVENT_TYPE: 1, C.R_BAD_TIMESTAMP: 1,
        C.R_ANCIENT_TIMESTAMP: 1, C.R_FUTURE_TIMESTAMP: 1, C.R_UNKNOWN_ITEM: 2,
        C.R_DUPLICATE_EVENT: 1}
    assert clean.count() + sum(reasons.values()) == n_rows
    texts = [json.loads(r[C.ROW_JSON]) for r in quarantine.collect()]
    assert {C.USER_ID: "abc"}.items() <= next(t for t in texts if t[C.USER_ID] == "abc").items()
    assert any(t[C.EVENT_TS] == "not-a-date" for t in texts)
    assert any(t.get(C.SUBJECT_ITEM_ID) == "xyz" for t in texts)
    types = Counter(r[C.EVENT_TYPE] for r in clean.collect())
    assert set(types) == set(C.EVENT_TYPES) and types[C.EVENT_CONVERSION] > 50
    # A good row's raw JSON is null: originals are only kept when something failed to parse.
    assert events.where(events[RAW_ROW_JSON].isNotNull()).count() == 3  # abc, not-a-date, xyz


def test_timestamp_formats_and_parquet(spark, tmp_path):
    src = pd.DataFrame({
        "u": ["1", "2", "3", "4", "5"], "i": ["7", "7", "7", "7", "7"],
        "s": ["1709251200", "1709251200.5", "1e3x", "", "-1"],
        "ms": ["1709251200000", "1709251200500", "nan", "", "1"],
        "iso": ["2024-03-01T00:00:00Z", "2024-03-01 00:00:00.5", "tomorrow", "", "2024-03-01"],
    })
    src.to_csv(tmp_path / "log.csv", index=False)
    expected = [1709251200.0, 1709251200.5, None, None]
    for col, fmt in (("s", I.TS_EPOCH_SECONDS), ("ms", I.TS_EPOCH_MILLIS), ("iso", I.TS_ISO)):
        m = I.EventMapping(user_col="u", item_col="i", ts_col=col, ts_format=fmt,
                           event_type=C.EVENT_VIEW)
        rows = sorted(I.ingest_events(spark, str(tmp_path / "log.csv"), "csv", m).collect(),
                      key=lambda r: r[C.USER_ID])
        got = [r[C.EVENT_TS].timestamp() if r[C.EVENT_TS] else None for r in rows]
        assert got[:4] == expected, col
        assert rows[2][RAW_ROW_JSON] is not None and rows[3][RAW_ROW_JSON] is None, col
    # Parquet with typed columns: numbers and a native timestamp column.
    pq = pd.DataFrame({"u": [1, 2], "i": [7, 8],
                       "t": pd.to_datetime(["2024-03-01", "2024-03-02"], utc=True),
                       "kind": ["transaction", "view"]})
    pq.to_parquet(tmp_path / "log.parquet", coerce_timestamps="us")  # Spark reads micros
    m = I.EventMapping(user_col="u", item_col="i", ts_col="t", event_type_col="kind",
                       event_type_map={"transaction": C.EVENT_CONVERSION}, surface="web")
    rows = sorted(I.ingest_events(spark, str(tmp_path / "log.parquet"), "parquet", m).collect(),
                  key=lambda r: r[C.USER_ID])
    assert [(r[C.USER_ID], r[C.EVENT_TYPE], r[C.SURFACE]) for r in rows] == [
        (1, C.EVENT_CONVERSION, "web"), (2, C.EVENT_VIEW, "web")]
    assert rows[0][C.EVENT_TS] == datetime(2024, 3, 1)  # session zone is UTC


def test_genre_flags_and_named_categories(spark, tmp_path):
    pd.DataFrame({"movie": ["1", "2", "3"], "Action": ["1", "0", "2"], "Drama": ["1", "1", "0"],
                  "Comedy": ["0", "0", "0"]}).to_csv(tmp_path / "flags.csv", index=False)
    m = I.ItemMapping(item_col="movie", category_flag_cols=("Action", "Drama", "Comedy"))
    df, vocab = I.ingest_items(spark, str(tmp_path / "flags.csv"), "csv", m)
    assert vocab == {"Action": 0, "Drama": 1, "Comedy": 2}
    rows = {r[C.ITEM_ID]: r for r in df.collect()}
    assert rows[1][C.CATEGORY_IDS] == [0, 1] and rows[1][C.CATEGORY_WEIGHTS] == [1.0, 1.0]
    assert rows[2][C.CATEGORY_IDS] == [1] and rows[1][C.ADVERTISER_ID] == I.UNKNOWN_ADVERTISER
    assert rows[3][C.CATEGORY_IDS] is None and rows[3][RAW_ROW_JSON] is not None  # flag "2"
    pd.DataFrame({"movie": ["1", "2"], "genres": ["Drama|Action", "Western"]}).to_csv(
        tmp_path / "named.csv", index=False)
    m = I.ItemMapping(item_col="movie", categories_col="genres")
    df, vocab = I.ingest_items(spark, str(tmp_path / "named.csv"), "csv", m)
    assert vocab == {"Action": 0, "Drama": 1, "Western": 2}
    assert sorted(r[C.CATEGORY_IDS] for r in df.collect()) == [[1, 0], [2]]
    with pytest.raises(ValueError, match="not in the source"):
        I.ingest_items(spark, str(tmp_path / "named.csv"), "csv",
                       I.ItemMapping(item_col="nope", categories_col="genres"))
    with pytest.raises(ValueError, match="exactly one"):
        I.EventMapping(user_col="u", item_col="i", ts_col="t")
