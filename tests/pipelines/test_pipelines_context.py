"""Context rows: top-k by confidence, renormalised weights, pseudo for every example, real only
where the label conversion logged a subject item."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest
from pyspark.sql import functions as F

import ctt_contracts as C
from pipelines.context import build_context_rows, top_k_categories

pytestmark = pytest.mark.spark

T = datetime(2024, 1, 1, tzinfo=timezone.utc)


def items(spark):
    rows = [
        (1, [4, 2, 9, 7], [0.9, 0.6, 0.3, 0.2], 0),  # top-3: 4, 2, 9 -> 0.9/1.8, 0.6/1.8, 0.3/1.8
        (2, [5], [0.4], 0),  # one category -> weight 1.0
        (3, [8, 3, 6], [0.5, 0.5, 0.5], 0),  # all tied -> ids ascending: 3, 6, 8
    ]
    return spark.createDataFrame(rows, C.spark_schema(C.T_ITEMS))


def test_top_k_normalises_and_breaks_ties(spark):
    cats = top_k_categories(F.col(C.CATEGORY_IDS), F.col(C.CATEGORY_WEIGHTS), 3)
    df = items(spark).select(C.ITEM_ID, cats.alias("c"))
    got = {r[C.ITEM_ID]: (r["c"]["ids"], r["c"]["weights"]) for r in df.collect()}
    assert got[1][0] == [4, 2, 9]
    assert got[1][1] == pytest.approx([0.5, 1 / 3, 1 / 6], abs=1e-6)
    assert got[2] == ([5], [1.0])
    assert got[3][0] == [3, 6, 8] and got[3][1] == pytest.approx([1 / 3] * 3, abs=1e-6)
    for _, weights in got.values():
        assert sum(weights) == pytest.approx(1.0, abs=1e-6)


def test_pseudo_for_every_example_real_only_with_subject(spark):
    ex = spark.createDataFrame(
        [(1, T, [2], [0], 1, 3), (1, T, [2], [0], 2, None), (2, T, [1], [0], 3, 1)],
        "user_id long, as_of_ts timestamp, item_ids array<long>, event_ts array<long>, "
        "label_item_id long, subject_item_id long")
    rows = build_context_rows(ex, items(spark), k=2)
    assert rows.columns == C.CONTEXT_ROWS_COLUMNS
    got = sorted((r[C.USER_ID], r[C.LABEL_ITEM_ID], r[C.CONTEXT_SOURCE], r[C.CONTEXT_CATEGORY_IDS],
                  [round(w, 4) for w in r[C.CONTEXT_WEIGHTS]], r[C.SUBJECT_ITEM_ID])
                 for r in rows.collect())
    assert got == [
        (1, 1, C.CONTEXT_PSEUDO, [4, 2], [0.6, 0.4], None),  # pseudo rows carry no subject
        (1, 1, C.CONTEXT_REAL, [3, 6], [0.5, 0.5], 3),  # subject item 3
        (1, 2, C.CONTEXT_PSEUDO, [5], [1.0], None),  # no subject: no real row
        (2, 3, C.CONTEXT_PSEUDO, [3, 6], [0.5, 0.5], None),
        (2, 3, C.CONTEXT_REAL, [4, 2], [0.6, 0.4], 1),
    ]
    assert [f.name for f in C.spark_schema(C.T_CONTEXT_ROWS).fields] == C.CONTEXT_ROWS_COLUMNS
    assert set(C.CONTEXT_ROWS_KEY) <= set(C.CONTEXT_ROWS_COLUMNS)
    assert C.SUBJECT_ITEM_ID not in C.CONTEXT_ROWS_KEY  # a value of the example, not a key part
    with pytest.raises(ValueError):
        build_context_rows(ex, items(spark), k=0)
