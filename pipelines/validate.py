"""Row checks: raw DataFrame -> (clean rows, quarantine rows with a reason).

Why: nothing is silently dropped. Every raw row ends up either in the clean table or in the
quarantine table with exactly one reason from ``ctt_contracts.QUARANTINE_REASONS``, and the counts
reconcile: ``input rows == clean rows + quarantined rows`` (an exact duplicate keeps one copy in
clean and sends every other copy to quarantine).

First failing reason wins, checked in this order (the order of ``QUARANTINE_REASONS``):

all     0 wrong_number_of_fields      the source record (CSV) had too few or too many fields
                                      (ingest keeps it verbatim under SOURCE_RECORD in row_json)
events  1 null_or_unparseable_id      user_id / item_id null, or subject_item_id present in the
                                      source but not parseable as a long
        2 id_out_of_range             user_id / item_id / subject_item_id < 0 or > MAX_ID
        3 unknown_event_type          event_type null or not one of EVENT_TYPES
        4 null_or_unparseable_timestamp
        5 timestamp_in_future         event_ts > `now` (an explicit argument, for testability)
        6 timestamp_before_2000       event_ts < 2000-01-01T00:00:00Z
        7 unknown_item                item_id, or a non-null subject_item_id, not in the clean items
        8 duplicate_event             exact copy (all columns) of an earlier row that passed 1-7
items   1 null_or_unparseable_id      item_id / advertiser_id null
        2 id_out_of_range             item_id / advertiser_id < 0 or > MAX_ID
        3 malformed_category_arrays   either array null or empty, more than MAX_CATEGORIES_PER_ITEM,
                                      lengths differ, a category id null/negative/repeated, a weight
                                      null/NaN/outside (0, 1]
        4 duplicate_key               another row with the same item_id passed 1-3; the row with the
                                      smallest JSON text is kept (deterministic), the others go here
users   1 null_or_unparseable_id      user_id null
        2 id_out_of_range
        3 bad_demographics            age_bucket null or outside 0..AGE_BUCKETS-1, gender null or not
                                      in GENDERS, country null or blank (unknown is "unknown", not null)
        4 duplicate_key               as for items

Checks 0-6 of events and 0-3 of items / users look at the row alone (``row_local_reason``): the
importer uses them to stop early when most of a source would be quarantined.

Clean items are canonicalised: (category_ids, category_weights) sorted by weight descending,
ties by category id ascending (the contract's "sorted descending", made deterministic).

`row_json` of a quarantined row is the raw row's RAW_ROW_JSON (original strings kept by ingest
when a value failed to parse) or else the row serialised with nulls kept.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Dict, List, Optional, Sequence, Tuple

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.window import Window

import ctt_contracts as C
from pipelines.delta_io import RAW_ROW_JSON, ts_literal

_REASON = "__reason"  # internal: the first failing reason of a row, null when clean
REASON_COLUMN = _REASON  # for callers that pick rows of a reasoned DataFrame by reason


# --------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------
@dataclass
class ValidationReport:
    """Counts of one validation run; `reconciles` is the invariant the job asserts."""

    source_table: str
    n_input: int
    n_clean: int
    counts: Dict[str, int] = field(default_factory=dict)  # reason -> quarantined rows

    @property
    def n_quarantined(self) -> int:
        return sum(self.counts.values())

    @property
    def reconciles(self) -> bool:
        return self.n_input == self.n_clean + self.n_quarantined

    def as_dict(self) -> Dict[str, object]:
        return {"source_table": self.source_table, "input": self.n_input, "clean": self.n_clean,
                "quarantined": self.n_quarantined, "reasons": dict(self.counts),
                "reconciles": self.reconciles}


def report_from_reasons(source_table: str, reasoned: DataFrame) -> ValidationReport:
    """Count a DataFrame carrying the internal reason column (one pass)."""
    rows = reasoned.groupBy(_REASON).count().collect()
    counts = {r[_REASON]: int(r["count"]) for r in rows if r[_REASON] is not None}
    n_clean = sum(int(r["count"]) for r in rows if r[_REASON] is None)
    n_input = n_clean + sum(counts.values())
    return ValidationReport(source_table, n_input, n_clean,
                            {k: counts[k] for k in C.QUARANTINE_REASONS if k in counts})


def format_reports(reports: Sequence[ValidationReport]) -> str:
    """The printed table: one line per (source, reason) plus the reconciliation per source."""
    lines = [f"{'source':<12} {'reason':<32} {'rows':>10}"]
    for rep in reports:
        for reason, n in rep.counts.items():
            lines.append(f"{rep.source_table:<12} {reason:<32} {n:>10}")
        status = "ok" if rep.reconciles else "MISMATCH"
        lines.append(f"{rep.source_table:<12} {'input = clean + quarantined':<32} "
                     f"{rep.n_input:>10} = {rep.n_clean} + {rep.n_quarantined} [{status}]")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------
def _first_failing(checks: Sequence[Tuple[Column, str]]) -> Column:
    """CASE WHEN check1 THEN reason1 WHEN ... END: the first failing reason wins."""
    expr = None
    for failed, reason in checks:
        expr = F.when(failed, F.lit(reason)) if expr is None else expr.when(failed, F.lit(reason))
    return expr


def _out_of_range(col: Column) -> Column:
    return (col < 0) | (col > F.lit(C.MAX_ID))


def _row_json(df: DataFrame, columns: Sequence[str]) -> Column:
    """Original strings when ingest kept them, else the typed row as JSON with nulls kept."""
    typed = F.to_json(F.struct(*[F.col(c) for c in columns]), {"ignoreNullFields": "false"})
    if RAW_ROW_JSON in df.columns:
        return F.coalesce(F.col(RAW_ROW_JSON), typed)
    return typed


def _malformed_record(df: DataFrame) -> Column:
    """True when ingest kept the source record because it had the wrong number of fields."""
    if RAW_ROW_JSON not in df.columns:
        return F.lit(False)
    return F.get_json_object(F.col(RAW_ROW_JSON), f"$.{C.SOURCE_RECORD}").isNotNull()


def _unparsed(df: DataFrame, column: str) -> Column:
    """True when ingest saw a non-empty original value for `column` but could not parse it."""
    if RAW_ROW_JSON not in df.columns:
        return F.lit(False)
    original = F.get_json_object(F.col(RAW_ROW_JSON), f"$.{column}")
    return original.isNotNull() & (F.trim(original) != "") & F.col(column).isNull()


def split_reasoned(reasoned: DataFrame, columns: Sequence[str],
                   source_table: str) -> Tuple[DataFrame, DataFrame]:
    """(clean rows with the contract columns, quarantine rows: row_json, source_table, reason)."""
    clean = reasoned.where(F.col(_REASON).isNull()).select(*columns)
    quarantine = reasoned.where(F.col(_REASON).isNotNull()).select(
        F.col(C.ROW_JSON), F.lit(source_table).alias(C.SOURCE_TABLE),
        F.col(_REASON).alias(C.REASON),
    )
    return clean, quarantine


def _mark_duplicates(df: DataFrame, partition: Sequence[str], order: Sequence[Column],
                     reason: str) -> DataFrame:
    """Among rows without a reason yet, every row after the first of its partition gets `reason`."""
    alive = F.col(_REASON).isNull()
    w = Window.partitionBy(alive, *partition).orderBy(*order)
    rank = F.row_number().over(w)
    return df.withColumn(_REASON, F.when(alive & (rank > 1), F.lit(reason)).otherwise(F.col(_REASON)))


# --------------------------------------------------------------------------------------
# Items
# --------------------------------------------------------------------------------------
def malformed_categories(ids: Column, weights: Column) -> Column:
    """True when the category arrays break the contract (see the module docstring)."""
    n = F.size(ids)
    return (
        ids.isNull() | weights.isNull() | (n == 0) | (n > C.MAX_CATEGORIES_PER_ITEM)
        | (n != F.size(weights))
        | F.exists(ids, lambda x: x.isNull() | (x < 0))
        | (F.size(F.array_distinct(ids)) != n)
        | F.exists(weights, lambda w: w.isNull() | F.isnan(w) | (w <= 0) | (w > 1))
    )


def sort_categories(df: DataFrame) -> DataFrame:
    """Sort each item's (category, weight) pairs in the contract order (weight desc, then
    category id asc: ``ctt_contracts.category_order``)."""
    from pipelines.context import ordered_categories

    return (df.withColumn("__pairs", ordered_categories(F.col(C.CATEGORY_IDS),
                                                        F.col(C.CATEGORY_WEIGHTS)))
            .withColumn(C.CATEGORY_IDS, F.col("__pairs.ids"))
            .withColumn(C.CATEGORY_WEIGHTS, F.col("__pairs.weights"))
            .drop("__pairs"))


def item_checks(raw_items: DataFrame) -> List[Tuple[Column, str]]:
    """The row-local checks of an item row, in order."""
    item, adv = F.col(C.ITEM_ID), F.col(C.ADVERTISER_ID)
    return [
        (_malformed_record(raw_items), C.R_WRONG_FIELD_COUNT),
        (item.isNull() | adv.isNull(), C.R_NULL_ID),
        (_out_of_range(item) | _out_of_range(adv), C.R_ID_OUT_OF_RANGE),
        (malformed_categories(F.col(C.CATEGORY_IDS), F.col(C.CATEGORY_WEIGHTS)),
         C.R_MALFORMED_CATEGORIES),
    ]


def _keyed_reasons(raw: DataFrame, columns: Sequence[str], checks: List[Tuple[Column, str]],
                   key: str) -> DataFrame:
    """raw rows + internal reason column + row_json, for a table with one row per `key` (items,
    users): the first failing row-local check, else duplicate_key for each row of a repeated
    key but the first (in row_json order)."""
    df = raw.withColumn(C.ROW_JSON, _row_json(raw, columns))
    df = df.withColumn(_REASON, _first_failing(checks))
    return _mark_duplicates(df, [key], [F.col(C.ROW_JSON)], C.R_DUPLICATE_KEY)


def item_reasons(raw_items: DataFrame) -> DataFrame:
    """raw items + internal reason column + row_json."""
    return _keyed_reasons(raw_items, C.ITEMS_COLUMNS, item_checks(raw_items), C.ITEM_ID)


def validate_items(raw_items: DataFrame) -> Tuple[DataFrame, DataFrame]:
    """raw_items -> (clean items with sorted categories, quarantine rows)."""
    clean, quarantine = split_reasoned(item_reasons(raw_items), C.ITEMS_COLUMNS, C.T_RAW_ITEMS)
    return sort_categories(clean), quarantine


# --------------------------------------------------------------------------------------
# Users
# --------------------------------------------------------------------------------------
def bad_demographics(age: Column, country: Column, gender: Column) -> Column:
    return (
        age.isNull() | (age < 0) | (age >= C.AGE_BUCKETS)
        | gender.isNull() | ~gender.isin(*C.GENDERS)
        | country.isNull() | (F.trim(country) == "")
    )


def user_checks(raw_users: DataFrame) -> List[Tuple[Column, str]]:
    """The row-local checks of a user row, in order."""
    user = F.col(C.USER_ID)
    return [
        (_malformed_record(raw_users), C.R_WRONG_FIELD_COUNT),
        (user.isNull(), C.R_NULL_ID),
        (_out_of_range(user), C.R_ID_OUT_OF_RANGE),
        (bad_demographics(F.col(C.AGE_BUCKET), F.col(C.COUNTRY), F.col(C.GENDER)),
         C.R_BAD_DEMOGRAPHICS),
    ]


def user_reasons(raw_users: DataFrame) -> DataFrame:
    """raw users + internal reason column + row_json."""
    return _keyed_reasons(raw_users, C.USERS_COLUMNS, user_checks(raw_users), C.USER_ID)


def validate_users(raw_users: DataFrame) -> Tuple[DataFrame, DataFrame]:
    return split_reasoned(user_reasons(raw_users), C.USERS_COLUMNS, C.T_RAW_USERS)


# --------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------
_ITEM_OK = "__item_known"
_SUBJECT_OK = "__subject_known"


def _flag_known(df: DataFrame, item_ids: DataFrame, column: str, flag: str) -> DataFrame:
    """Left-join a boolean `flag`: is df[column] a clean item id? (item ids are unique)."""
    known = item_ids.select(F.col(C.ITEM_ID).alias("__known_id")).withColumn(flag, F.lit(True))
    return (df.join(known, df[column] == known["__known_id"], "left").drop("__known_id")
            .withColumn(flag, F.coalesce(F.col(flag), F.lit(False))))


def event_checks(raw_events: DataFrame, now: datetime) -> List[Tuple[Column, str]]:
    """The row-local checks of an event row, in order (everything before unknown_item)."""
    user, item, subject = F.col(C.USER_ID), F.col(C.ITEM_ID), F.col(C.SUBJECT_ITEM_ID)
    ts, etype = F.col(C.EVENT_TS), F.col(C.EVENT_TYPE)
    return [
        (_malformed_record(raw_events), C.R_WRONG_FIELD_COUNT),
        (user.isNull() | item.isNull() | _unparsed(raw_events, C.SUBJECT_ITEM_ID), C.R_NULL_ID),
        (_out_of_range(user) | _out_of_range(item) | (subject.isNotNull() & _out_of_range(subject)),
         C.R_ID_OUT_OF_RANGE),
        (etype.isNull() | ~etype.isin(*C.EVENT_TYPES), C.R_UNKNOWN_EVENT_TYPE),
        (ts.isNull(), C.R_BAD_TIMESTAMP),
        (ts > ts_literal(now), C.R_FUTURE_TIMESTAMP),
        (ts < F.timestamp_seconds(F.lit(C.MIN_EVENT_TS_SECONDS)), C.R_ANCIENT_TIMESTAMP),
    ]


def event_reasons(raw_events: DataFrame, clean_items: DataFrame, now: datetime,
                  clean_before: Optional[DataFrame] = None) -> DataFrame:
    """raw events + internal reason column + row_json (see the module docstring for the order).

    ``clean_before``: the clean events of earlier raw rows, when `raw_events` is only an
    increment of the log (an incremental build). A row passing checks 1-7 that equals one of
    them is a duplicate_event, as it would be if the whole log were validated at once: there
    the earlier copy is the one kept clean.
    """
    subject = F.col(C.SUBJECT_ITEM_ID)
    df = raw_events.withColumn(C.ROW_JSON, _row_json(raw_events, C.RAW_EVENTS_COLUMNS))
    df = _flag_known(df, clean_items, C.ITEM_ID, _ITEM_OK)
    df = _flag_known(df, clean_items, C.SUBJECT_ITEM_ID, _SUBJECT_OK)
    checks = event_checks(raw_events, now) + [
        (~F.col(_ITEM_OK) | (subject.isNotNull() & ~F.col(_SUBJECT_OK)), C.R_UNKNOWN_ITEM),
    ]
    df = df.withColumn(_REASON, _first_failing(checks)).drop(_ITEM_OK, _SUBJECT_OK)
    if clean_before is not None:
        df = _mark_seen(df, clean_before)
    order = [F.col(c) for c in C.RAW_EVENTS_COLUMNS]
    return _mark_duplicates(df, C.RAW_EVENTS_COLUMNS, order, C.R_DUPLICATE_EVENT)


_SEEN = "__seen_before"


def _mark_seen(df: DataFrame, clean_before: DataFrame) -> DataFrame:
    """Rows without a reason yet that equal an earlier clean event -> duplicate_event.

    The earlier events are narrowed to the increment's users first (a semi join), so the cost
    follows the increment, not the log. Clean events are unique by all their columns, so the
    null-safe join cannot multiply rows."""
    users = df.where(F.col(C.USER_ID).isNotNull()).select(C.USER_ID).distinct()
    seen = (clean_before.join(users, C.USER_ID, "left_semi")
            .select(*[F.col(c).alias(f"{_SEEN}_{c}") for c in C.RAW_EVENTS_COLUMNS])
            .withColumn(_SEEN, F.lit(True)))
    cond = [df[c].eqNullSafe(seen[f"{_SEEN}_{c}"]) for c in C.RAW_EVENTS_COLUMNS]
    joined = df.join(seen, cond, "left")
    dup = F.col(_REASON).isNull() & F.col(_SEEN).isNotNull()
    return (joined.withColumn(_REASON, F.when(dup, F.lit(C.R_DUPLICATE_EVENT))
                              .otherwise(F.col(_REASON)))
            .select(*df.columns))


def validate_events(raw_events: DataFrame, clean_items: DataFrame,
                    now: datetime) -> Tuple[DataFrame, DataFrame]:
    """raw_events -> (clean events, quarantine rows); `now` bounds future timestamps."""
    return split_reasoned(event_reasons(raw_events, clean_items, now), C.RAW_EVENTS_COLUMNS,
                          C.T_RAW_EVENTS)


# --------------------------------------------------------------------------------------
# Row-local reasons (no joins, no duplicates): what the importer can know before writing
# --------------------------------------------------------------------------------------
def row_local_reason(raw: DataFrame, source_table: str, now: datetime) -> Column:
    """The first failing row-local reason of a raw row (null when none), as in the build."""
    if source_table == C.T_RAW_EVENTS:
        return _first_failing(event_checks(raw, now))
    if source_table == C.T_RAW_ITEMS:
        return _first_failing(item_checks(raw))
    if source_table == C.T_RAW_USERS:
        return _first_failing(user_checks(raw))
    raise ValueError(f"{source_table!r} is not a raw table")


_COLUMNS_OF = {C.T_RAW_EVENTS: C.RAW_EVENTS_COLUMNS, C.T_RAW_ITEMS: C.ITEMS_COLUMNS,
               C.T_RAW_USERS: C.USERS_COLUMNS}


def row_local_reasons(raw: DataFrame, source_table: str, now: datetime) -> DataFrame:
    """raw rows + row_json + the internal reason column, row-local checks only (for
    ``report_from_reasons`` / ``reason_examples`` before anything is written)."""
    df = raw.withColumn(C.ROW_JSON, _row_json(raw, _COLUMNS_OF[source_table]))
    return df.withColumn(_REASON, row_local_reason(raw, source_table, now))


# --------------------------------------------------------------------------------------
# Fail fast: a source that would be mostly quarantined is a mapping error, not bad data
# --------------------------------------------------------------------------------------
DEFAULT_MAX_QUARANTINE_FRAC = 0.5


class QuarantineThresholdExceeded(RuntimeError):
    """More than the allowed share of a source would be quarantined; nothing was written."""


def over_threshold(report: ValidationReport, max_frac: float) -> bool:
    """True when more than `max_frac` of the source's rows are quarantined (empty sources pass)."""
    return report.n_input > 0 and report.n_quarantined > max_frac * report.n_input


def reason_examples(reasoned: DataFrame) -> Dict[str, str]:
    """reason -> one quarantined row's JSON (the smallest, so the choice is deterministic)."""
    rows = (reasoned.where(F.col(_REASON).isNotNull()).groupBy(_REASON)
            .agg(F.min(C.ROW_JSON).alias("example")).collect())
    return {r[_REASON]: r["example"] for r in rows}


def threshold_message(report: ValidationReport, max_frac: float, examples: Dict[str, str],
                      top: int = 3, max_chars: int = 300) -> str:
    """What was quarantined, the top reasons with one example row each."""
    share = report.n_quarantined / report.n_input
    lines = [f"{report.source_table}: {report.n_quarantined} of {report.n_input} rows "
             f"({share:.1%}) would be quarantined, more than the allowed {max_frac:.0%}. "
             f"Top reasons:"]
    for reason, n in sorted(report.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]:
        example = examples.get(reason, "")
        if len(example) > max_chars:
            example = example[:max_chars] + "..."
        lines.append(f"  {reason}: {n} rows, e.g. {example}")
    return "\n".join(lines)
