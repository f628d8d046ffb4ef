"""Sequences, split and user_sequences on tiny hand-made event frames with exact expected output."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

import ctt_contracts as C
from pipelines.sequences import (SplitCutoffs, assign_split, build_examples, build_sequences,
                                 build_user_sequences, conversions, derive_cutoffs,
                                 example_keys_from_ranked, examples_from_ranked, rank_conversions)

pytestmark = pytest.mark.spark

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
S0 = int(T0.timestamp())


def at(sec: float) -> datetime:
    return T0 + timedelta(seconds=sec)


def events(spark, rows):
    """rows: (user, item, type, second offset, subject)."""
    data = [(u, i, t, at(s), None, subj, None) for u, i, t, s, subj in rows]
    return spark.createDataFrame(data, C.spark_schema(C.T_EVENTS))


def conv(u, i, s, subj=None):
    return (u, i, C.EVENT_CONVERSION, s, subj)


def examples_of(df):
    return sorted((r[C.USER_ID], int(r[C.AS_OF_TS].timestamp()) - S0, r[C.LABEL_ITEM_ID],
                   list(r[C.ITEM_IDS]), [t - S0 for t in r[C.EVENT_TS]])
                  for r in df.collect())


def test_examples_history_strictly_before_and_ordered(spark):
    ev = events(spark, [
        conv(1, 10, 0), (1, 11, C.EVENT_VIEW, 5, None), conv(1, 12, 10), conv(1, 13, 20),
        conv(2, 20, 0),  # user 2 has one conversion: no example
    ])
    got = examples_of(build_examples(conversions(ev), cap=100))
    assert got == [(1, 10, 12, [10], [0]), (1, 20, 13, [10, 12], [0, 10])]


def test_ties_in_time_share_history_and_never_see_each_other(spark):
    ev = events(spark, [conv(1, 5, 0), conv(1, 9, 10), conv(1, 7, 10), conv(1, 8, 20)])
    got = examples_of(build_examples(conversions(ev), cap=100))
    assert got == [
        (1, 10, 7, [5], [0]), (1, 10, 9, [5], [0]),  # tie at t=10: both see only item 5
        (1, 20, 8, [5, 7, 9], [0, 10, 10]),  # later: tie ordered by item id
    ]


def test_cap_keeps_newest_and_ties_across_the_cap_boundary(spark):
    rows = [conv(1, 100 + k, k) for k in range(5)] + [conv(1, 200, 4)]  # 200 ties with 104 at t=4
    got = examples_of(build_examples(conversions(events(spark, rows)), cap=2))
    assert got == [
        (1, 1, 101, [100], [0]),
        (1, 2, 102, [100, 101], [0, 1]),
        (1, 3, 103, [101, 102], [1, 2]),
        (1, 4, 104, [102, 103], [2, 3]),
        (1, 4, 200, [102, 103], [2, 3]),
    ]


def test_min_history_and_duplicate_conversions_count_once(spark):
    ev = events(spark, [
        conv(1, 10, 0, subj=None), conv(1, 10, 0, subj=7), conv(1, 10, 0, subj=3),  # one purchase
        conv(1, 11, 5), conv(1, 12, 9, subj=4),
    ])
    c = conversions(ev)
    assert sorted((r[C.ITEM_ID], r[C.SUBJECT_ITEM_ID]) for r in c.collect()) == [
        (10, 3), (11, None), (12, 4)]
    got = examples_of(build_examples(c, cap=100, min_history=2))
    assert got == [(1, 9, 12, [10, 11], [0, 5])]
    ex = build_examples(c, cap=100, min_history=1)
    assert sorted(r[C.SUBJECT_ITEM_ID] or 0 for r in ex.collect()) == [0, 4]
    first = examples_of(build_examples(c, cap=100, min_history=0))  # first conversion kept, no history
    assert [(r[2], r[3]) for r in first] == [(10, []), (11, [10]), (12, [10, 11])]
    with pytest.raises(ValueError):
        build_examples(c, min_history=-1)


@pytest.mark.parametrize("cap,min_history", [(100, 0), (100, 1), (100, 2), (2, 2), (1, 1)])
def test_example_keys_are_the_examples_rows_without_arrays(spark, cap, min_history):
    """The context rows are built from the keys alone: they must select the very rows whose
    history reaches min_history, ties and the cap included."""
    ev = events(spark, [conv(1, 5, 0, subj=3), conv(1, 9, 10), conv(1, 7, 10, subj=4),
                        conv(1, 8, 20), conv(1, 6, 20), conv(1, 2, 30, subj=9),
                        conv(2, 1, 0), conv(2, 2, 0), conv(3, 4, 7)])
    ranked = rank_conversions(conversions(ev))
    cols = [C.USER_ID, C.AS_OF_TS, C.LABEL_ITEM_ID, C.SUBJECT_ITEM_ID]
    full = examples_from_ranked(ranked, cap, min_history)
    keys = example_keys_from_ranked(ranked, cap, min_history)
    assert keys.columns == cols
    assert sorted(keys.collect()) == sorted(full.select(*cols).collect())
    assert keys.count() == sum(1 for r in full.collect() if len(r[C.ITEM_IDS]) >= min_history)


def test_split_boundaries(spark):
    ev = events(spark, [conv(1, 1, 0)] + [conv(1, 10 + k, 100 * k) for k in range(1, 5)])
    ex = build_examples(conversions(ev), cap=100)
    cut = SplitCutoffs(at(200), at(400))
    got = sorted((int(r[C.AS_OF_TS].timestamp()) - S0, r[C.SPLIT])
                 for r in assign_split(ex, cut).collect())
    # label at exactly val_start -> val; exactly test_start -> test
    assert got == [(100, C.SPLIT_TRAIN), (200, C.SPLIT_VAL), (300, C.SPLIT_VAL), (400, C.SPLIT_TEST)]
    seq = build_sequences(ex, cut)
    assert seq.columns == C.SEQUENCES_COLUMNS
    with pytest.raises(ValueError):
        SplitCutoffs(at(400), at(200))


def test_derive_cutoffs_from_conversion_quantiles(spark):
    ev = events(spark, [conv(u, 1, s) for u, s in enumerate(range(0, 100))])  # 100 conversions
    cut = derive_cutoffs(conversions(ev), val_frac=0.1, test_frac=0.2)
    assert cut.origin == "quantiles"
    assert int(cut.val_start.timestamp()) - S0 == 69  # 70 % quantile of 0..99
    assert int(cut.test_start.timestamp()) - S0 == 79
    with pytest.raises(ValueError):
        derive_cutoffs(conversions(ev), 0.6, 0.5)


def test_user_sequences_latest_capped_with_hash(spark):
    ev = events(spark, [conv(1, 10, 0), conv(1, 12, 5), conv(1, 11, 5), conv(1, 13, 9),
                        conv(2, 20, 3), (3, 30, C.EVENT_CLICK, 1, None)])
    us = build_user_sequences(conversions(ev), cap=3)
    assert us.columns == C.USER_SEQUENCES_COLUMNS
    got = {r[C.USER_ID]: (int(r[C.AS_OF_TS].timestamp()) - S0, list(r[C.ITEM_IDS]),
                          [t - S0 for t in r[C.EVENT_TS]], r[C.SEQUENCE_HASH])
           for r in us.collect()}
    assert set(got) == {1, 2}  # user 3 has no conversion
    assert got[1][:3] == (9, [11, 12, 13], [5, 5, 9])
    assert got[2][:3] == (3, [20], [3])
    # the hash is a function of the arrays only: same history -> same hash, other -> other
    ev2 = events(spark, [conv(7, 20, 4)])
    other = build_user_sequences(conversions(ev2), cap=3).first()[C.SEQUENCE_HASH]
    assert other != got[2][3]  # different event time
    same = build_user_sequences(conversions(events(spark, [conv(8, 20, 3)])), cap=3).first()
    assert same[C.SEQUENCE_HASH] == got[2][3]
