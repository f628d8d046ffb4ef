"""Context rows: the request-time context a training/evaluation example is scored with.

Two sources (``ctt_contracts.CONTEXT_PSEUDO`` / ``CONTEXT_REAL``):

* pseudo -- the *label* item's top-k categories by confidence weight, weights renormalised to sum
  to 1. Training never sees real context (seed 000): it learns from this label-derived stand-in,
  with heavy context dropout in the model so the sequence still matters. One row per example.
* real -- the same projection of the *subject item* of the label conversion (the item the user
  was viewing), with the subject's id in ``subject_item_id`` (null on pseudo rows). Only where the
  conversion has a subject item. The trainer carries it on every split: the subject-item
  baselines (category lookup, co-occurrence) learn from the training split's real rows.

The projection itself (top-k after sorting by weight desc, category id asc; weights
renormalised in double precision, stored as float) is ``ctt_contracts.project_context``, run
here as a Python UDF over the items table (one call per item, before the join to the examples):
the resolver applies the same function to a subject item at request time, so the two cannot
drift. (A plain pickled UDF, not the Arrow-optimised one: with Spark 4.2 the Arrow UDF hung
the context_rows MERGE of the build, each side waiting for the other on the worker socket.)
Its k is ``BuildConfig.context_top_k``, stored in the lake with the rest of the build
configuration; the trainer copies it into the bundle manifest for the resolver.

Rows are keyed by ``ctt_contracts.CONTEXT_ROWS_KEY`` (user_id, as_of_ts, label_item_id,
context_source); the join to ``sequences`` is on ``ctt_contracts.SEQUENCES_KEY``.
"""
from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

import ctt_contracts as C

_CTX_ITEM, _CTX = "__ctx_item", "__ctx"  # internal columns of the projected items
_PROJECTED = T.StructType([
    T.StructField("ids", T.ArrayType(T.IntegerType(), False)),
    T.StructField("weights", T.ArrayType(T.FloatType(), False)),
])


def top_k_categories(ids: Column, weights: Column, k: int) -> Column:
    """struct(ids array<int>, weights array<float>): ``ctt_contracts.project_context`` of the
    two arrays (top-k in the contract order, weights summing to 1)."""
    if k < 1:
        raise ValueError(f"context top-k must be >= 1, got {k}")

    def project(c, w):
        return C.project_context(c, w, k)

    return F.udf(project, _PROJECTED, useArrow=False)(ids, weights)


def ordered_categories(ids: Column, weights: Column) -> Column:
    """struct(ids, weights): the item's pairs in the contract order (``ctt_contracts
    .category_order``), weights unchanged; how validation canonicalises the items table."""
    def order(c, w):
        positions = C.category_order(list(c), list(w))
        return [int(c[i]) for i in positions], [float(w[i]) for i in positions]

    return F.udf(order, _PROJECTED, useArrow=False)(ids, weights)


def projected_items(items: DataFrame, k: int) -> DataFrame:
    """Clean items -> (item id, its projected context): the projection runs once per item."""
    return items.select(F.col(C.ITEM_ID).alias(_CTX_ITEM),
                        top_k_categories(F.col(C.CATEGORY_IDS), F.col(C.CATEGORY_WEIGHTS), k)
                        .alias(_CTX))


def _context_for(examples: DataFrame, projected: DataFrame, item_col: str,
                 source: str) -> DataFrame:
    """Join each example to the item in `item_col` and take that item's projected context."""
    joined = examples.join(projected, examples[item_col] == projected[_CTX_ITEM], "inner")
    subject = (F.col(C.SUBJECT_ITEM_ID) if source == C.CONTEXT_REAL
               else F.lit(None).cast(T.LongType()))
    return joined.select(
        C.USER_ID, C.AS_OF_TS, C.LABEL_ITEM_ID,
        F.col(f"{_CTX}.ids").alias(C.CONTEXT_CATEGORY_IDS),
        F.col(f"{_CTX}.weights").alias(C.CONTEXT_WEIGHTS),
        F.lit(source).alias(C.CONTEXT_SOURCE),
        subject.alias(C.SUBJECT_ITEM_ID),
    )


def pseudo_context(examples: DataFrame, projected: DataFrame) -> DataFrame:
    """One pseudo row per example (the label item is a clean item, so the inner join keeps all)."""
    return _context_for(examples, projected, C.LABEL_ITEM_ID, C.CONTEXT_PSEUDO)


def real_context(examples: DataFrame, projected: DataFrame) -> DataFrame:
    """One real row per example whose label conversion logged a subject item."""
    with_subject = examples.where(F.col(C.SUBJECT_ITEM_ID).isNotNull())
    return _context_for(with_subject, projected, C.SUBJECT_ITEM_ID, C.CONTEXT_REAL)


def build_context_rows(examples: DataFrame, items: DataFrame,
                       k: int = C.DEFAULT_CONTEXT_TOP_K) -> DataFrame:
    """examples (or their keys: ``sequences.example_keys_from_ranked``) + clean items ->
    context_rows. Both sources join the same projected items, so Spark broadcasts (and projects)
    them once."""
    projected = projected_items(items, k)
    return (pseudo_context(examples, projected).unionByName(real_context(examples, projected))
            .select(*C.CONTEXT_ROWS_COLUMNS))
