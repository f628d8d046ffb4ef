"""Subject items derived from browsing (pipelines/subjects.py) on tiny hand-made event frames:
both modes, session vs time window, ties in time, logged subjects winning, coverage counts."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

import ctt_contracts as C
from pipelines.sequences import conversions
from pipelines.subjects import (DERIVE_LAST_OTHER_VIEW, DERIVE_LAST_VIEW, DERIVE_NONE,
                                ORIGIN_LOGGED, ORIGIN_SESSION, ORIGIN_WINDOW, SUBJECT_ORIGIN,
                                SubjectCoverage, derive_subjects, load_coverage, store_coverage,
                                subject_coverage)

pytestmark = pytest.mark.spark

T0 = datetime(2024, 3, 1, tzinfo=timezone.utc)
V, CV = C.EVENT_VIEW, C.EVENT_CONVERSION


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def frame(spark, rows):
    """rows: (user, item, type, minute, session, logged subject)."""
    data = [(u, i, t, at(m), None, subj, sess) for u, i, t, m, sess, subj in rows]
    return spark.createDataFrame(data, C.spark_schema(C.T_EVENTS))


def derived(spark, rows, mode, window=60):
    """(user, minute, converted item) -> (subject, origin)."""
    conv = conversions(derive_subjects(frame(spark, rows), mode, window))
    return {(r[C.USER_ID], round((r[C.EVENT_TS].replace(tzinfo=timezone.utc) - T0)
                                 .total_seconds() / 60, 3), r[C.ITEM_ID]):
            (r[C.SUBJECT_ITEM_ID], r[SUBJECT_ORIGIN]) for r in conv.collect()}


# user 1: session "a": views 5, 6, 7 then converts 7 (the logger's view of 7 right before)
SESSION_ROWS = [
    (1, 5, V, 0, "a", None), (1, 6, V, 1, "a", None), (1, 7, V, 2, "a", None),
    (1, 7, CV, 3, "a", None),
    # user 2: views 8 in another session a minute before, nothing in its own session
    (2, 8, V, 9, "b", None), (2, 9, CV, 10, "c", None),
    # user 3: a view 3 hours earlier in the same session still counts (sessions ignore the window)
    (3, 4, V, 0, "d", None), (3, 9, CV, 180, "d", None),
    # user 4: runs of views: 5, 7, 6, 7 -> last other than 7 is 6; then 7 is converted
    (4, 5, V, 0, "e", None), (4, 7, V, 1, "e", None), (4, 6, V, 2, "e", None),
    (4, 7, V, 3, "e", None), (4, 7, V, 4, "e", None), (4, 7, CV, 5, "e", None),
    # user 5: only views of the converted item -> no other view
    (5, 7, V, 0, "f", None), (5, 7, V, 1, "f", None), (5, 7, CV, 2, "f", None),
    # user 6: a view after the conversion never counts; a logged subject always wins
    (6, 3, CV, 0, "g", None), (6, 4, V, 1, "g", None),
    (6, 5, V, 2, "g", None), (6, 6, CV, 3, "g", 2),
]


def test_last_view_and_last_other_view_in_session(spark):
    last = derived(spark, SESSION_ROWS, DERIVE_LAST_VIEW)
    other = derived(spark, SESSION_ROWS, DERIVE_LAST_OTHER_VIEW)
    assert last[(1, 3, 7)] == (7, ORIGIN_SESSION) and other[(1, 3, 7)] == (6, ORIGIN_SESSION)
    assert last[(2, 10, 9)] == (None, None) == other[(2, 10, 9)]  # other session: not used
    assert last[(3, 180, 9)] == (4, ORIGIN_SESSION) == other[(3, 180, 9)]
    assert last[(4, 5, 7)] == (7, ORIGIN_SESSION) and other[(4, 5, 7)] == (6, ORIGIN_SESSION)
    assert last[(5, 2, 7)] == (7, ORIGIN_SESSION) and other[(5, 2, 7)] == (None, None)
    assert last[(6, 0, 3)] == (None, None) == other[(6, 0, 3)]  # the views came later
    assert last[(6, 3, 6)] == (2, ORIGIN_LOGGED) == other[(6, 3, 6)]  # logged beats view 5
    none = derived(spark, SESSION_ROWS, DERIVE_NONE)
    assert {k: v for k, v in none.items() if v[0] is not None} == {(6, 3, 6): (2, ORIGIN_LOGGED)}


def test_time_window_without_sessions(spark):
    rows = [
        (1, 5, V, 0, None, None), (1, 6, V, 100, None, None), (1, 7, CV, 159, None, None),
        (2, 5, V, 0, None, None), (2, 7, CV, 61, None, None),  # 61 min > 60: too old
        (3, 5, V, 0, None, None), (3, 7, CV, 60, None, None),  # exactly 60 min: inside
        # a session-less conversion ignores views that carry a session id
        (4, 5, V, 10, "s", None), (4, 7, CV, 11, None, None),
    ]
    got = derived(spark, rows, DERIVE_LAST_VIEW)
    assert got[(1, 159, 7)] == (6, ORIGIN_WINDOW)
    assert got[(2, 61, 7)] == (None, None)
    assert got[(3, 60, 7)] == (5, ORIGIN_WINDOW)
    assert got[(4, 11, 7)] == (None, None)
    assert derived(spark, rows, DERIVE_LAST_VIEW, window=120)[(2, 61, 7)] == (5, ORIGIN_WINDOW)
    # last_other_view looks back past the converted item's own views, still within the window
    rows = [(1, 5, V, 0, None, None), (1, 7, V, 50, None, None), (1, 7, CV, 70, None, None),
            (2, 5, V, 30, None, None), (2, 7, V, 50, None, None), (2, 7, CV, 70, None, None)]
    got = derived(spark, rows, DERIVE_LAST_OTHER_VIEW)
    assert got[(1, 70, 7)] == (None, None)  # view of 5 is 70 min old
    assert got[(2, 70, 7)] == (5, ORIGIN_WINDOW)


def test_same_instant_views_count_and_clicks_are_browsing(spark):
    rows = [
        # a view in the same second as the conversion counts (the logger's view before a cart)
        (1, 5, V, 0, "a", None), (1, 7, CV, 1, "a", None), (1, 8, V, 1, "a", None),
        # a click is browsing too; a later view one second after does not count
        (2, 4, C.EVENT_CLICK, 0, "b", None), (2, 7, CV, 1, "b", None),
        (2, 9, V, 1 + 1 / 60, "b", None),
        # two views in the same instant: the larger item id is "last" (deterministic)
        (3, 4, V, 0, "c", None), (3, 6, V, 0, "c", None), (3, 7, CV, 1, "c", None),
    ]
    got = derived(spark, rows, DERIVE_LAST_VIEW)
    assert got[(1, 1, 7)] == (8, ORIGIN_SESSION)
    assert got[(2, 1, 7)] == (4, ORIGIN_SESSION)
    assert got[(3, 1, 7)] == (6, ORIGIN_SESSION)


def test_duplicate_conversion_rows_logged_wins_over_derived(spark):
    rows = [(1, 5, V, 0, "a", None), (1, 7, CV, 1, "a", None), (1, 7, CV, 1, "a", 3)]
    got = derived(spark, rows, DERIVE_LAST_VIEW)
    assert got == {(1, 1, 7): (3, ORIGIN_LOGGED)}


def test_coverage_counts_and_store_is_idempotent(spark, tmp_path):
    conv = conversions(derive_subjects(frame(spark, SESSION_ROWS), DERIVE_LAST_VIEW, 60))
    cov = subject_coverage(conv, DERIVE_LAST_VIEW, 60)
    # 7 conversions: 1 logged; derived for users 1, 3, 4, 5 (three of them = converted item)
    assert cov == SubjectCoverage(DERIVE_LAST_VIEW, 60, 7, 1, 4, 0, 3)
    assert (cov.derived, cov.without_subject) == (4, 2)
    assert cov.as_dict()["share_derived"] == pytest.approx(4 / 7, abs=1e-6)
    assert "none 2 (28.6%)" in cov.line()
    lake = str(tmp_path / "lake")
    assert store_coverage(spark, lake, cov) and load_coverage(spark, lake) == cov
    assert not store_coverage(spark, lake, cov)  # unchanged: no second commit
    other = subject_coverage(
        conversions(derive_subjects(frame(spark, SESSION_ROWS), DERIVE_LAST_OTHER_VIEW, 60)),
        DERIVE_LAST_OTHER_VIEW, 60)
    assert other == SubjectCoverage(DERIVE_LAST_OTHER_VIEW, 60, 7, 1, 3, 0, 0)
    assert store_coverage(spark, lake, other) and load_coverage(spark, lake) == other


def test_bad_arguments():
    with pytest.raises(ValueError, match="derive mode"):
        derive_subjects(None, "first_view")
    with pytest.raises(ValueError, match="> 0 minutes"):
        derive_subjects(None, DERIVE_LAST_VIEW, 0)
