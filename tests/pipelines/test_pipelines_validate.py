"""Validation on tiny hand-made frames: every quarantine reason, first-failing-wins, reconciliation."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

import ctt_contracts as C
from pipelines.delta_io import raw_schema
from pipelines.validate import (event_reasons, format_reports, report_from_reasons, validate_events,
                                validate_items, validate_users)

pytestmark = pytest.mark.spark

NOW = datetime(2024, 6, 1, tzinfo=timezone.utc)


def ts(day: int, sec: int = 0) -> datetime:
    return datetime(2024, 3, day, 0, 0, sec, tzinfo=timezone.utc)


def items_df(spark, rows):
    return spark.createDataFrame(rows, raw_schema(C.T_RAW_ITEMS))


def events_df(spark, rows):
    """rows: the contract columns without session_id, then row_json (session_id left null)."""
    return spark.createDataFrame([(*r[:-1], None, r[-1]) for r in rows],
                                 raw_schema(C.T_RAW_EVENTS))


def users_df(spark, rows):
    return spark.createDataFrame(rows, raw_schema(C.T_RAW_USERS))


def reasons_by_key(quarantine, key):
    return sorted((json.loads(r[C.ROW_JSON]).get(key), r[C.REASON]) for r in quarantine.collect())


def test_items_every_reason_and_canonical_order(spark):
    rows = [
        (1, [3, 1], [0.5, 0.9], 7, None),  # clean, unsorted -> sorted by weight desc
        (2, [4, 2], [0.5, 0.5], 7, None),  # clean, tie in weight -> category id asc
        (None, [1], [0.5], 7, None),  # null id
        (3, [1], [0.5], None, None),  # null advertiser
        (-4, [1], [0.5], 7, None),  # negative id
        (5, [1], [0.5], C.MAX_ID + 1, None),  # advertiser out of range
        (6, None, [0.5], 7, None),  # null ids array
        (7, [], [], 7, None),  # empty
        (8, [1, 2], [0.5], 7, None),  # length mismatch
        (9, [1], [1.5], 7, None),  # weight > 1
        (10, [1], [0.0], 7, None),  # weight 0
        (11, [-1], [0.5], 7, None),  # negative category
        (12, [1, 1], [0.5, 0.4], 7, None),  # repeated category
        (13, list(range(C.MAX_CATEGORIES_PER_ITEM + 1)), [0.5] * (C.MAX_CATEGORIES_PER_ITEM + 1),
         7, None),  # too many
        (14, [1], [float("nan")], 7, None),  # NaN weight
        (15, [1], [0.5], 7, None),  # duplicate key: two rows, one kept
        (15, [2], [0.5], 7, None),
        (None, None, None, 7, '{"item_id":"zz"}'),  # ingest kept the original text
    ]
    clean, quarantine = validate_items(items_df(spark, rows))
    got = {r[C.ITEM_ID]: (r[C.CATEGORY_IDS], [round(w, 3) for w in r[C.CATEGORY_WEIGHTS]])
           for r in clean.collect()}
    assert got == {1: ([1, 3], [0.9, 0.5]), 2: ([2, 4], [0.5, 0.5]), 15: ([1], [0.5])}
    reasons = [r[C.REASON] for r in quarantine.collect()]
    assert sorted(reasons) == sorted(
        [C.R_NULL_ID] * 3 + [C.R_ID_OUT_OF_RANGE] * 2 + [C.R_MALFORMED_CATEGORIES] * 9
        + [C.R_DUPLICATE_KEY])
    texts = [r[C.ROW_JSON] for r in quarantine.collect()]
    assert '{"item_id":"zz"}' in texts  # original string preserved, not the typed nulls
    dup = [json.loads(r[C.ROW_JSON]) for r in quarantine.collect() if r[C.REASON] == C.R_DUPLICATE_KEY]
    assert dup == [{C.ITEM_ID: 15, C.CATEGORY_IDS: [2], C.CATEGORY_WEIGHTS: [0.5],
                    C.ADVERTISER_ID: 7}]  # the smaller JSON text ([1]) is kept


def test_users_demographics_and_duplicates(spark):
    rows = [
        (1, 3, "US", "f", None),
        (2, 0, "unknown", "unknown", None),  # unknowns are valid values
        (3, 8, "US", "f", None),  # age bucket out of range
        (4, None, "US", "f", '{"age_bucket":"old"}'),  # unparseable age
        (5, 2, "US", "q", None),  # gender not in the vocabulary
        (6, 2, "  ", "m", None),  # blank country
        (7, 2, None, "m", None),  # null country
        (None, 2, "US", "m", None),
        (2**62 + 5, 2, "US", "m", None),
        (1, 3, "US", "f", None),  # exact duplicate of user 1
    ]
    clean, quarantine = validate_users(users_df(spark, rows))
    assert sorted(r[C.USER_ID] for r in clean.collect()) == [1, 2]
    reasons = sorted(r[C.REASON] for r in quarantine.collect())
    assert reasons == sorted([C.R_BAD_DEMOGRAPHICS] * 5 + [C.R_NULL_ID, C.R_ID_OUT_OF_RANGE,
                                                           C.R_DUPLICATE_KEY])


def test_events_every_reason_first_failing_wins_and_reconciles(spark):
    items = items_df(spark, [(1, [1], [1.0], 0, None), (2, [2], [1.0], 0, None)])
    clean_items, _ = validate_items(items)
    good = (10, 1, C.EVENT_VIEW, ts(1), "s", 2, None)
    rows = [
        good, good, good,  # 3 exact copies: 1 clean, 2 duplicate_event
        (10, 1, C.EVENT_VIEW, ts(1), "other", 2, None),  # differs in surface: not a duplicate
        (11, 2, C.EVENT_CONVERSION, ts(2), None, None, None),  # clean, no subject
        (None, 1, "bogus", ts(1), None, None, None),  # null id wins over unknown type
        (12, None, C.EVENT_VIEW, ts(1), None, None, None),
        (12, 1, C.EVENT_VIEW, ts(1), None, None, '{"subject_item_id":"xyz"}'),  # bad subject
        (-1, 1, C.EVENT_VIEW, ts(1), None, None, None),
        (12, 1, C.EVENT_VIEW, ts(1), None, C.MAX_ID + 1, None),
        (12, 1, "bogus", None, None, None, None),  # unknown type wins over null ts
        (12, 1, None, ts(1), None, None, None),
        (12, 1, C.EVENT_CLICK, None, None, None, '{"event_ts":"yesterday"}'),
        (12, 1, C.EVENT_CLICK, datetime(2030, 1, 1, tzinfo=timezone.utc), None, None, None),
        (12, 1, C.EVENT_CLICK, datetime(1999, 12, 31, 23, 59, 59, tzinfo=timezone.utc), None,
         None, None),
        (12, 99, C.EVENT_CLICK, ts(1), None, None, None),  # unknown item
        (12, 1, C.EVENT_CLICK, ts(1), None, 99, None),  # unknown subject item
        (12, 99, C.EVENT_CLICK, ts(1), None, None, None),  # a bad row's copy keeps the bad reason
    ]
    raw = events_df(spark, rows)
    clean, quarantine = validate_events(raw, clean_items, NOW)
    assert clean.count() == 3
    got = sorted(r[C.REASON] for r in quarantine.collect())
    expected = sorted([C.R_DUPLICATE_EVENT] * 2 + [C.R_NULL_ID] * 3 + [C.R_ID_OUT_OF_RANGE] * 2
                      + [C.R_UNKNOWN_EVENT_TYPE] * 2 + [C.R_BAD_TIMESTAMP, C.R_FUTURE_TIMESTAMP,
                                                        C.R_ANCIENT_TIMESTAMP]
                      + [C.R_UNKNOWN_ITEM] * 3)
    assert got == expected
    originals = [r[C.ROW_JSON] for r in quarantine.collect()]
    assert '{"subject_item_id":"xyz"}' in originals and '{"event_ts":"yesterday"}' in originals
    report = report_from_reasons(C.T_RAW_EVENTS, event_reasons(raw, clean_items, NOW))
    assert report.n_input == len(rows) == report.n_clean + report.n_quarantined
    assert report.counts[C.R_DUPLICATE_EVENT] == 2 and report.reconciles
    assert list(report.counts) == [r for r in C.QUARANTINE_REASONS if r in report.counts]
    assert "[ok]" in format_reports([report])


def test_future_is_relative_to_the_explicit_now(spark):
    items, _ = validate_items(items_df(spark, [(1, [1], [1.0], 0, None)]))
    raw = events_df(spark, [(1, 1, C.EVENT_VIEW, ts(5), None, None, None)])
    before = datetime(2024, 3, 4, tzinfo=timezone.utc)
    assert validate_events(raw, items, before)[1].first()[C.REASON] == C.R_FUTURE_TIMESTAMP
    assert validate_events(raw, items, NOW)[0].count() == 1
    with pytest.raises(ValueError, match="timezone-aware"):
        validate_events(raw, items, datetime(2024, 6, 1))
