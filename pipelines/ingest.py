"""Import a real event log (CSV or Parquet) into raw_events / raw_items / raw_users.

Why mappings instead of a fixed format: every public log names and encodes things differently
(MovieLens: userId, movieId, rating, timestamp in epoch seconds, genres "Action|Comedy";
RetailRocket: visitorid, itemid, event in {view, addtocart, transaction}, epoch millis). A
frozen dataclass per table says which source column feeds which contract column and how to
parse it; ``benchmarks/movielens.py`` builds them in Python, ``ctt-ingest`` from flags.

Nothing is dropped here. A value that does not parse (``"abc"`` as a user id, ``"yesterday"``
as a timestamp, ``"x"`` as a weight) becomes null in its typed column, and the row keeps its
original string values as JSON (keyed by contract column names) in ``delta_io.RAW_ROW_JSON``;
validation then quarantines the row with that original text. Missing optional columns map to
the contract's "unknown" values (age bucket 0, country "unknown", gender "unknown", advertiser 0,
surface null, subject null) -- absent is not malformed.

CSV is read as RFC 4180: fields in double quotes may hold the separator, newlines and ``""``
(an escaped quote). A record with too few or too many fields is not repaired (its values would
land in the wrong columns): it is kept verbatim under ``ctt_contracts.SOURCE_RECORD`` in the row's
JSON and validation quarantines it as ``wrong_number_of_fields``. Quoted newlines mean a record
boundary is only known by reading a file from its start, so each CSV file is read by one task
(Spark's multiLine mode): give a folder of files to read a large log in parallel. A line-split
read would be faster but silently truncates a quoted newline in the last column, so there is no
such mode.

Timestamp formats: ``epoch_s`` / ``epoch_ms`` (integer or decimal numbers), ``iso`` (anything
Spark casts to a timestamp), or a Spark datetime pattern such as ``yyyy-MM-dd HH:mm:ss``; text
in single quotes is a literal, so REES46's ``2019-10-01 00:00:04 UTC`` is
``yyyy-MM-dd HH:mm:ss 'UTC'`` (``yyyy-MM-dd HH:mm:ss z`` also reads the zone name). Values
without a zone are UTC (the session time zone pinned by ``pipelines.spark``). Native timestamp
columns (Parquet) are used as they are.

Sessions: an optional column mapped to ``session_id`` (any string). Build-time subject
derivation (``pipelines.subjects``) looks for the viewed item inside the conversion's session.

Categories: either one delimited column of an items file (``"Action|Comedy"``, or with
confidence weights ``"3:0.9|7:0.4"``; a token without a weight gets 1.0), 0/1 flag columns
(MovieLens 100k genre flags -> the set flags, each with weight 1.0), or -- for logs without an
items file -- a category column of the event log itself (``items_from_events``: each item gets
the categories it was logged with, weighted by their share of its events).

Category ids (``category_ids`` is ``array<int>``): when every category name is a canonical
integer of at most 9 digits, the ids are the names themselves; otherwise (names such as
"Comedy", or REES46's 19-digit ids like 2053013555631882655, beyond int32) categories are
re-indexed densely 0..n-1 in sorted order (numeric order when all names are integers). The
vocabulary (name -> id) is returned, printed as counts, stored under ``<lake>/_meta/`` by the
importer and can be written to a JSON file; an appended increment extends the stored vocabulary
(new names get new ids), so ids never change meaning between increments. Advertiser 0 means
"unknown advertiser".
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

import ctt_contracts as C
from ctt_contracts.flags import comma_separated, described, key_value_pairs
from pipelines.delta_io import (RAW_ROW_JSON, WriteResult, raw_schema, read_table, table_exists,
                                table_version, write_raw)

TS_EPOCH_SECONDS = "epoch_s"
TS_EPOCH_MILLIS = "epoch_ms"
TS_ISO = "iso"
FORMATS = ("csv", "parquet")
UNKNOWN_ADVERTISER = 0

DEFAULT_GENDER_MAP: Mapping[str, str] = {
    "f": "f", "female": "f", "w": "f", "woman": "f",
    "m": "m", "male": "m", "man": "m",
    "x": "x", "other": "x", "nonbinary": "x", "non-binary": "x", "diverse": "x",
    "unknown": "unknown", "u": "unknown", "?": "unknown",
}
# Upper bounds (exclusive) of age buckets 1..6 in years; 65+ is bucket 7; 0 stays "unknown".
AGE_BUCKET_UPPER_BOUNDS: Tuple[int, ...] = (18, 25, 35, 45, 55, 65)
TRUE_FLAGS = ("1", "true", "t", "yes", "y")
FALSE_FLAGS = ("0", "false", "f", "no", "n")

# Spark's corrupt-record column of a CSV read (internal, never written as a column).
CSV_RECORD_COL = "__ctt_source_record"

# The category vocabulary of an imported lake (a Delta table: works on any lake URI).
CATEGORY_NAME = "category_name"
CATEGORY_ID = "category_id"
_INT32_NAME = re.compile(r"0|[1-9][0-9]{0,8}")  # canonical, fits int32: "007" is not one
_DIGITS = re.compile(r"[0-9]+")


# --------------------------------------------------------------------------------------
# Mappings
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EventMapping:
    """Source columns of the event log. Exactly one of `event_type_col` / `event_type`. Each
    field is a flag of ingest (``ctt_contracts.flags``: ``--user-col`` for ``user_col``)."""

    user_col: str = field(metadata=described("user id column"))
    item_col: str = field(metadata=described("item id column"))
    ts_col: str = field(metadata=described("event time column"))
    ts_format: str = field(default=TS_EPOCH_SECONDS, metadata=described(
        "epoch_s | epoch_ms | iso | a Spark datetime pattern (e.g. 'yyyy-MM-dd HH:mm:ss'; text "
        "in single quotes is literal: REES46's '2019-10-01 00:00:04 UTC' is "
        "\"yyyy-MM-dd HH:mm:ss 'UTC'\"); values without a zone are UTC"))
    event_type_col: Optional[str] = field(default=None, metadata=described(
        "column holding the event type"))
    event_type: Optional[str] = field(default=None, metadata=described(
        "constant event type for every row (e.g. every rating = conversion)",
        choices=C.EVENT_TYPES))
    event_type_map: Mapping[str, str] = field(default_factory=dict, metadata=described(
        "source=contract pairs, e.g. 'addtocart=click,transaction=conversion' or "
        "'cart=conversion,purchase=conversion' (REES46)", parse=key_value_pairs))
    subject_col: Optional[str] = field(default=None, metadata=described(
        "subject item id column (optional)"))
    surface_col: Optional[str] = field(default=None, metadata=described(
        "surface column (optional)"))
    surface: Optional[str] = field(default=None, metadata=described(
        "constant surface when the log has no column (optional)"))
    session_col: Optional[str] = field(default=None, metadata=described(
        "session id column (optional, any string) -> session_id; build_sequences "
        "--derive-subject looks for views in the same session"))

    def __post_init__(self) -> None:
        if (self.event_type_col is None) == (self.event_type is None):
            raise ValueError("give exactly one of event_type_col (a column) or event_type "
                             "(a constant such as 'conversion')")
        if self.event_type is not None and self.event_type not in C.EVENT_TYPES:
            raise ValueError(f"event_type {self.event_type!r} not in {C.EVENT_TYPES}")
        bad = {v for v in self.event_type_map.values() if v not in C.EVENT_TYPES}
        if bad:
            raise ValueError(f"event_type_map targets {sorted(bad)} not in {C.EVENT_TYPES}")
        if self.surface_col is not None and self.surface is not None:
            raise ValueError("give at most one of surface_col / surface")


@dataclass(frozen=True)
class ItemMapping:
    """Source columns of the items file. Exactly one of `categories_col` / `category_flag_cols`.
    The fields but `item_col` are flags of ingest as they are (``ctt_contracts.flags``)."""

    item_col: str  # flag --item-id-col, default: the events' --item-col
    categories_col: Optional[str] = field(default=None, metadata=described(
        "delimited categories, e.g. 'Action|Comedy' or '3:0.9|7:0.4'"))
    category_sep: str = field(default="|", metadata=described(
        "separator between the categories of --categories-col"))
    weight_sep: str = field(default=":", metadata=described(
        "separator between a category and its weight in --categories-col"))
    category_flag_cols: Tuple[str, ...] = field(default=(), metadata=described(
        "comma-separated 0/1 columns, one per category (e.g. MovieLens genres)",
        parse=comma_separated))
    advertiser_col: Optional[str] = field(default=None, metadata=described(
        "advertiser column (optional)"))

    def __post_init__(self) -> None:
        if (self.categories_col is None) == (not self.category_flag_cols):
            raise ValueError("give exactly one of categories_col (delimited) or "
                             "category_flag_cols (0/1 columns)")
        if self.category_sep == self.weight_sep:
            raise ValueError("category_sep and weight_sep must differ")


@dataclass(frozen=True)
class UserMapping:
    """Source columns of the users file; absent columns mean "unknown" for every user. The
    fields but `user_col` and `gender_map` are flags of ingest as they are (``ctt_contracts.flags``)."""

    user_col: str  # flag --users-user-col, default: the events' --user-col
    age_col: Optional[str] = field(default=None, metadata=described("age column (optional)"))
    age_is_bucket: bool = field(default=False, metadata=described(
        "the age column already holds buckets 0..7 (else years)"))
    country_col: Optional[str] = field(default=None, metadata=described(
        "country column (optional)"))
    gender_col: Optional[str] = field(default=None, metadata=described(
        "gender column (optional)"))
    # flag --gender-map: pairs added to these defaults
    gender_map: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_GENDER_MAP))


# --------------------------------------------------------------------------------------
# Reading and parsing
# --------------------------------------------------------------------------------------
def read_source(spark: SparkSession, path: str, fmt: str, sep: str = ",",
                header: bool = True) -> DataFrame:
    """CSV with every column as a string (nothing guessed, nothing lost), or Parquet as typed.

    CSV follows RFC 4180 (see the module docstring); the result has one more column,
    CSV_RECORD_COL, holding the record's text when it had the wrong number of fields.
    """
    if fmt == "parquet":
        return spark.read.parquet(path)
    if fmt != "csv":
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    reader = (spark.read.option("header", str(header).lower()).option("sep", sep)
              .option("quote", '"').option("escape", '"')
              .option("multiLine", "true").option("inferSchema", "false"))
    columns = reader.csv(path).columns  # the header (or _c0.. without one)
    if CSV_RECORD_COL in columns:
        raise ValueError(f"{path}: a source column is named {CSV_RECORD_COL!r}, which the "
                         f"importer reserves")
    schema = T.StructType([T.StructField(c, T.StringType(), True) for c in columns]
                          + [T.StructField(CSV_RECORD_COL, T.StringType(), True)])
    return (reader.schema(schema).option("mode", "PERMISSIVE")
            .option("columnNameOfCorruptRecord", CSV_RECORD_COL).csv(path))


def _source_record(df: DataFrame) -> Optional[Column]:
    """The malformed record's text (null for good records), or None for sources without one."""
    return F.col(CSV_RECORD_COL) if CSV_RECORD_COL in df.columns else None


def _require(df: DataFrame, columns: Sequence[Optional[str]], what: str) -> None:
    missing = [c for c in columns if c is not None and c not in df.columns]
    if missing:
        raise ValueError(f"{what}: columns {missing} not in the source; it has {df.columns}")


def _text(df: DataFrame, column: str) -> Column:
    """The source value as trimmed text, null when empty."""
    text = F.trim(F.col(column).cast(T.StringType()))
    return F.when(text != "", text)


def parse_long(text: Column) -> Column:
    """bigint or null (no exception under ANSI mode)."""
    return text.try_cast(T.LongType())


def parse_timestamp(df: DataFrame, column: str, fmt: str) -> Column:
    """Typed timestamp or null, per the module docstring's formats."""
    if isinstance(df.schema[column].dataType, (T.TimestampType, T.TimestampNTZType, T.DateType)):
        return F.col(column).cast(T.TimestampType())
    text = _text(df, column)
    if fmt in (TS_EPOCH_SECONDS, TS_EPOCH_MILLIS):
        scale = 1_000_000 if fmt == TS_EPOCH_SECONDS else 1_000
        number = text.try_cast(T.DecimalType(20, 6))
        micros = (number * F.lit(scale)).try_cast(T.LongType())
        return F.timestamp_micros(micros)
    if fmt == TS_ISO:
        return text.try_cast(T.TimestampType())
    return F.try_to_timestamp(text, F.lit(fmt))


def _failed(original: Column, parsed: Column) -> Column:
    """A non-empty source value that did not parse."""
    return original.isNotNull() & parsed.isNull()


def _with_row_json(df: DataFrame, originals: Dict[str, Column], failures: List[Column],
                   record: Optional[Column] = None) -> DataFrame:
    """RAW_ROW_JSON = original strings (contract names) when any value failed to parse; plus the
    whole source record under SOURCE_RECORD when the record had the wrong number of fields."""
    any_failed = F.lit(False)
    for failed in failures:
        any_failed = any_failed | F.coalesce(failed, F.lit(False))
    fields = [c.alias(n) for n, c in originals.items()]
    original = F.to_json(F.struct(*fields), {"ignoreNullFields": "false"})
    row_json = F.when(any_failed, original)
    if record is not None:
        whole = F.to_json(F.struct(*fields, record.alias(C.SOURCE_RECORD)),
                          {"ignoreNullFields": "false"})
        row_json = F.when(record.isNotNull(), whole).otherwise(row_json)
    return df.withColumn(RAW_ROW_JSON, row_json)


def _record_alias(src: DataFrame) -> List[Column]:
    """The source-record column carried through a select (empty for Parquet)."""
    return [F.col(CSV_RECORD_COL)] if CSV_RECORD_COL in src.columns else []


# --------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------
def _event_type(df: DataFrame, mapping: EventMapping) -> Column:
    if mapping.event_type is not None:
        return F.lit(mapping.event_type)
    raw = _text(df, mapping.event_type_col)
    if not mapping.event_type_map:
        return raw
    pairs = [F.lit(x) for kv in mapping.event_type_map.items() for x in kv]
    return F.coalesce(F.create_map(*pairs)[raw], raw)


def events_from_source(src: DataFrame, mapping: EventMapping) -> DataFrame:
    """Source rows -> raw_events rows (+ RAW_ROW_JSON). Pure DataFrame transform."""
    _require(src, [mapping.user_col, mapping.item_col, mapping.ts_col, mapping.event_type_col,
                   mapping.subject_col, mapping.surface_col, mapping.session_col], "events")
    orig = {
        C.USER_ID: _text(src, mapping.user_col),
        C.ITEM_ID: _text(src, mapping.item_col),
        C.EVENT_TYPE: (_text(src, mapping.event_type_col) if mapping.event_type_col
                       else F.lit(mapping.event_type).cast(T.StringType())),
        C.EVENT_TS: _text(src, mapping.ts_col),
        C.SURFACE: (_text(src, mapping.surface_col) if mapping.surface_col
                    else F.lit(mapping.surface).cast(T.StringType())),
        C.SUBJECT_ITEM_ID: (_text(src, mapping.subject_col) if mapping.subject_col
                            else F.lit(None).cast(T.StringType())),
        C.SESSION_ID: (_text(src, mapping.session_col) if mapping.session_col
                       else F.lit(None).cast(T.StringType())),
    }
    typed = {
        C.USER_ID: parse_long(orig[C.USER_ID]),
        C.ITEM_ID: parse_long(orig[C.ITEM_ID]),
        C.EVENT_TYPE: _event_type(src, mapping),
        C.EVENT_TS: parse_timestamp(src, mapping.ts_col, mapping.ts_format),
        C.SURFACE: orig[C.SURFACE],
        C.SUBJECT_ITEM_ID: parse_long(orig[C.SUBJECT_ITEM_ID]),
        C.SESSION_ID: orig[C.SESSION_ID],
    }
    out = src.select(*[typed[c].alias(c) for c in C.RAW_EVENTS_COLUMNS],
                     *[orig[c].alias(f"__orig_{c}") for c in C.RAW_EVENTS_COLUMNS],
                     *_record_alias(src))
    originals = {c: F.col(f"__orig_{c}") for c in C.RAW_EVENTS_COLUMNS}
    failures = [_failed(originals[c], F.col(c)) for c in (C.USER_ID, C.ITEM_ID, C.EVENT_TS,
                                                           C.SUBJECT_ITEM_ID)]
    out = _with_row_json(out, originals, failures, _source_record(out))
    return out.select(*C.RAW_EVENTS_COLUMNS, RAW_ROW_JSON)


def ingest_events(spark: SparkSession, path: str, fmt: str, mapping: EventMapping,
                  sep: str = ",") -> DataFrame:
    """Read an event log and map it to raw_events rows (lazy; write with `write_ingested`)."""
    return events_from_source(read_source(spark, path, fmt, sep), mapping)


# --------------------------------------------------------------------------------------
# Items
# --------------------------------------------------------------------------------------
def _tokens(text: Column, sep: str) -> Column:
    """Non-empty trimmed tokens of a delimited string (empty array for null)."""
    parts = F.split(F.coalesce(text, F.lit("")), re.escape(sep))
    return F.filter(F.transform(parts, lambda t: F.trim(t)), lambda t: t != "")


def _good_records(src: DataFrame) -> DataFrame:
    """Rows whose source record had the right number of fields (malformed ones name nothing)."""
    return src.where(F.col(CSV_RECORD_COL).isNull()) if CSV_RECORD_COL in src.columns else src


def category_names(src: DataFrame, mapping: ItemMapping) -> List[str]:
    """Distinct category names of the file, sorted (the default vocabulary)."""
    toks = _tokens(_text(src, mapping.categories_col), mapping.category_sep)
    names = F.transform(toks, lambda t: F.trim(F.split(t, re.escape(mapping.weight_sep))[0]))
    rows = _good_records(src).select(F.explode(names).alias("n")).distinct().collect()
    return sorted(r["n"] for r in rows)


def _all_int32(names: Sequence[str]) -> bool:
    return all(_INT32_NAME.fullmatch(n) for n in names)


def _name_order(names: Sequence[str]) -> List[str]:
    """Distinct names sorted numerically when all are digit strings ("007" before "10"), else
    as text."""
    distinct = set(names)
    if all(_DIGITS.fullmatch(n) for n in distinct):
        return sorted(distinct, key=lambda n: (int(n), n))
    return sorted(distinct)


def is_identity(vocab: Mapping[str, int]) -> bool:
    """True when every name is a canonical int32 integer mapped to itself."""
    return all(_INT32_NAME.fullmatch(n) and int(n) == i for n, i in vocab.items())


def build_vocabulary(names: Sequence[str],
                     base: Optional[Mapping[str, int]] = None) -> Dict[str, int]:
    """name -> category id (see the module docstring), extending `base` when given.

    Without `base`: canonical int32 integer names map to themselves, any other set of names is
    re-indexed densely 0..n-1 in sorted order. With `base` (a stored vocabulary): its ids are kept;
    new names map to themselves if base and new names are all identity-able, else get ids after
    the largest one, in sorted order.
    """
    if not base:
        if names and _all_int32(names):
            return {n: int(n) for n in names}
        return {n: i for i, n in enumerate(_name_order(names))}
    out = dict(base)
    new = [n for n in _name_order(names) if n not in out]
    if is_identity(out) and _all_int32(new):
        out.update({n: int(n) for n in new})
        return out
    start = max(out.values()) + 1
    out.update({n: start + k for k, n in enumerate(new)})
    return out


def _delimited_categories(src: DataFrame, mapping: ItemMapping,
                          vocab: Mapping[str, int]) -> Tuple[Column, Column]:
    toks = _tokens(_text(src, mapping.categories_col), mapping.category_sep)
    wsep = re.escape(mapping.weight_sep)
    lookup = F.create_map(*[F.lit(x) for kv in vocab.items() for x in kv]) if vocab else None
    ids = F.transform(toks, lambda t: lookup[F.trim(F.split(t, wsep)[0])].cast(T.IntegerType()))
    weights = F.transform(toks, lambda t: F.when(
        F.size(F.split(t, wsep)) > 1,
        F.trim(F.element_at(F.split(t, wsep), 2)).try_cast(T.FloatType()),
    ).otherwise(F.lit(1.0).cast(T.FloatType())))
    # A token that is not in the vocabulary or a weight that is not a number: whole array null.
    ids = F.when(~F.exists(ids, lambda x: x.isNull()), ids)
    weights = F.when(~F.exists(weights, lambda x: x.isNull()), weights)
    return ids, weights


def _flag_categories(src: DataFrame, mapping: ItemMapping,
                     vocab: Mapping[str, int]) -> Tuple[Column, Column, Column]:
    flags = [F.lower(_text(src, c)) for c in mapping.category_flag_cols]
    bad = F.lit(False)
    for f in flags:
        bad = bad | (f.isNotNull() & ~f.isin(*TRUE_FLAGS, *FALSE_FLAGS))
    chosen = F.array(*[F.when(f.isin(*TRUE_FLAGS), F.lit(vocab[c]).cast(T.IntegerType()))
                       for f, c in zip(flags, mapping.category_flag_cols)])
    ids = F.filter(chosen, lambda x: x.isNotNull())
    weights = F.transform(ids, lambda _: F.lit(1.0).cast(T.FloatType()))
    return F.when(~bad, ids), F.when(~bad, weights), bad


def items_from_source(src: DataFrame, mapping: ItemMapping,
                      vocab: Optional[Mapping[str, int]] = None,
                      base_vocab: Optional[Mapping[str, int]] = None
                      ) -> Tuple[DataFrame, Dict[str, int]]:
    """Source rows -> raw_items rows (+ RAW_ROW_JSON), and the category vocabulary used.

    `vocab` is used as it is; else the file's names extend `base_vocab` (a stored vocabulary).
    """
    _require(src, [mapping.item_col, mapping.categories_col, mapping.advertiser_col,
                   *mapping.category_flag_cols], "items")
    if vocab is None and mapping.category_flag_cols:  # flag columns: ids in column order
        vocab = {c: i for i, c in enumerate(mapping.category_flag_cols)}
    vocab = (dict(vocab) if vocab is not None
             else build_vocabulary(category_names(src, mapping), base_vocab))
    orig = {C.ITEM_ID: _text(src, mapping.item_col),
            C.ADVERTISER_ID: (_text(src, mapping.advertiser_col) if mapping.advertiser_col
                              else F.lit(str(UNKNOWN_ADVERTISER)))}
    if mapping.category_flag_cols:
        ids, weights, flags_bad = _flag_categories(src, mapping, vocab)
        cats_text = F.concat_ws(",", *[F.coalesce(_text(src, c), F.lit(""))
                                       for c in mapping.category_flag_cols])
        cats_failed = flags_bad
    else:
        ids, weights = _delimited_categories(src, mapping, vocab)
        cats_text = _text(src, mapping.categories_col)
        cats_failed = cats_text.isNotNull() & (ids.isNull() | weights.isNull())
    out = src.select(
        parse_long(orig[C.ITEM_ID]).alias(C.ITEM_ID), ids.alias(C.CATEGORY_IDS),
        weights.alias(C.CATEGORY_WEIGHTS), parse_long(orig[C.ADVERTISER_ID]).alias(C.ADVERTISER_ID),
        orig[C.ITEM_ID].alias("__o_item"), cats_text.alias("__o_cats"),
        orig[C.ADVERTISER_ID].alias("__o_adv"), cats_failed.alias("__cats_failed"),
        *_record_alias(src),
    )
    originals = {C.ITEM_ID: F.col("__o_item"), C.CATEGORY_IDS: F.col("__o_cats"),
                 C.CATEGORY_WEIGHTS: F.col("__o_cats"), C.ADVERTISER_ID: F.col("__o_adv")}
    failures = [_failed(F.col("__o_item"), F.col(C.ITEM_ID)),
                _failed(F.col("__o_adv"), F.col(C.ADVERTISER_ID)), F.col("__cats_failed")]
    out = _with_row_json(out, originals, failures, _source_record(out))
    return out.select(*C.ITEMS_COLUMNS, RAW_ROW_JSON), vocab


def ingest_items(spark: SparkSession, path: str, fmt: str, mapping: ItemMapping, sep: str = ",",
                 vocab: Optional[Mapping[str, int]] = None,
                 base_vocab: Optional[Mapping[str, int]] = None
                 ) -> Tuple[DataFrame, Dict[str, int]]:
    return items_from_source(read_source(spark, path, fmt, sep), mapping, vocab, base_vocab)


# --------------------------------------------------------------------------------------
# Items from the event log (logs without an items file)
# --------------------------------------------------------------------------------------
def event_category_names(src: DataFrame, category_col: str, category_sep: str) -> List[str]:
    """Distinct category names of the event log's category column."""
    _require(src, [category_col], "events (categories)")
    toks = _tokens(_text(src, category_col), category_sep)
    rows = _good_records(src).select(F.explode(toks).alias("n")).distinct().collect()
    return [r["n"] for r in rows]


def items_from_events(src: DataFrame, mapping: EventMapping, category_col: str,
                      vocab: Mapping[str, int], category_sep: str = "|") -> DataFrame:
    """Event log rows -> one raw_items row per item id: the categories it was logged with.

    Why weights by share: a product logged under two categories (a re-categorisation mid-log)
    keeps both, the more frequent one first (weight = its share of the item's events, in (0, 1]).
    Rows whose item id does not parse, and malformed records, make no item (their events are
    quarantined anyway). An item logged only without a category gets empty arrays, which
    validation quarantines (malformed_category_arrays) -- and then its events (unknown_item).
    A name missing from `vocab` gives a null category id: the item is quarantined, not guessed.
    """
    _require(src, [mapping.item_col, category_col], "events (items)")
    spark = src.sparkSession
    good = _good_records(src)
    rows = good.select(
        parse_long(_text(good, mapping.item_col)).alias(C.ITEM_ID),
        F.explode_outer(_tokens(_text(good, category_col), category_sep)).alias(CATEGORY_NAME),
    ).where(F.col(C.ITEM_ID).isNotNull())
    counts = rows.groupBy(C.ITEM_ID, CATEGORY_NAME).agg(F.count(F.lit(1)).alias("__n"))
    vocab_df = spark.createDataFrame(list(vocab.items()),
                                     f"{CATEGORY_NAME} string, {CATEGORY_ID} int")
    named = counts.join(F.broadcast(vocab_df), CATEGORY_NAME, "left")
    per_item = named.groupBy(C.ITEM_ID).agg(
        F.array_sort(F.collect_list(F.when(F.col(CATEGORY_NAME).isNotNull(), F.struct(
            F.col(CATEGORY_ID).alias("c"), F.col("__n").alias("n"))))).alias("__cats"),
        F.sum(F.when(F.col(CATEGORY_NAME).isNotNull(), F.col("__n"))).alias("__total"))
    return per_item.select(
        C.ITEM_ID,
        F.transform("__cats", lambda p: p["c"]).alias(C.CATEGORY_IDS),
        F.transform("__cats", lambda p: (p["n"] / F.col("__total")).cast(T.FloatType()))
        .alias(C.CATEGORY_WEIGHTS),
        F.lit(UNKNOWN_ADVERTISER).cast(T.LongType()).alias(C.ADVERTISER_ID),
        F.lit(None).cast(T.StringType()).alias(RAW_ROW_JSON),
    )


def new_items_only(spark: SparkSession, lake: str, items: DataFrame) -> DataFrame:
    """Items whose id is not in raw_items yet (appending a log increment: a known item keeps the
    categories it was first imported with, instead of a second row quarantined as duplicate_key)."""
    path = C.LakePaths(lake).table(C.T_RAW_ITEMS)
    if not table_exists(spark, path):
        return items
    known = read_table(spark, path, table_version(spark, path)).select(C.ITEM_ID)
    return items.join(known, C.ITEM_ID, "left_anti")


# --------------------------------------------------------------------------------------
# The stored vocabulary
# --------------------------------------------------------------------------------------
def vocabulary_path(lake: str) -> str:
    return C.LakePaths(lake).meta(C.META_CATEGORY_VOCABULARY)


def load_vocabulary(spark: SparkSession, lake: str) -> Optional[Dict[str, int]]:
    """The vocabulary stored by the last import into `lake`, or None."""
    path = vocabulary_path(lake)
    if not table_exists(spark, path):
        return None
    return {r[CATEGORY_NAME]: int(r[CATEGORY_ID]) for r in read_table(spark, path).collect()}


def store_vocabulary(spark: SparkSession, lake: str, vocab: Mapping[str, int]) -> bool:
    """Replace the stored vocabulary if it differs (True when written)."""
    if load_vocabulary(spark, lake) == dict(vocab):
        return False
    df = spark.createDataFrame(sorted(vocab.items(), key=lambda kv: kv[1]),
                               f"{CATEGORY_NAME} string, {CATEGORY_ID} int")
    df.coalesce(1).write.format("delta").mode("overwrite").save(vocabulary_path(lake))
    return True


def vocabulary_summary(vocab: Mapping[str, int], base: Optional[Mapping[str, int]]) -> str:
    """One line of counts (the vocabulary itself can be thousands of names)."""
    new = len([n for n in vocab if not base or n not in base])
    kind = ("ids = the source's integer names" if is_identity(vocab)
            else "ids re-indexed densely (source names are not all int32 integers)")
    span = f"ids {min(vocab.values())}..{max(vocab.values())}" if vocab else "no ids"
    return f"category vocabulary: {len(vocab)} categories ({new} new), {span}; {kind}"


# --------------------------------------------------------------------------------------
# Users
# --------------------------------------------------------------------------------------
def age_to_bucket(years: Column) -> Column:
    """Age in years -> bucket 1..7 (negative ages -> -1, which validation rejects; null stays null)."""
    expr = F.when(years.isNull(), F.lit(None)).when(years < 0, F.lit(-1))
    for bucket, upper in enumerate(AGE_BUCKET_UPPER_BOUNDS, start=1):
        expr = expr.when(years < upper, F.lit(bucket))
    return expr.otherwise(F.lit(len(AGE_BUCKET_UPPER_BOUNDS) + 1)).cast(T.IntegerType())


def users_from_source(src: DataFrame, mapping: UserMapping) -> DataFrame:
    """Source rows -> raw_users rows (+ RAW_ROW_JSON)."""
    _require(src, [mapping.user_col, mapping.age_col, mapping.country_col, mapping.gender_col],
             "users")
    none = F.lit(None).cast(T.StringType())
    orig = {
        C.USER_ID: _text(src, mapping.user_col),
        C.AGE_BUCKET: _text(src, mapping.age_col) if mapping.age_col else none,
        C.COUNTRY: _text(src, mapping.country_col) if mapping.country_col else none,
        C.GENDER: _text(src, mapping.gender_col) if mapping.gender_col else none,
    }
    age_num = orig[C.AGE_BUCKET].try_cast(T.LongType())
    age = age_num.cast(T.IntegerType()) if mapping.age_is_bucket else age_to_bucket(age_num)
    age = F.when(orig[C.AGE_BUCKET].isNull(), F.lit(0)).otherwise(age)
    gmap = F.create_map(*[F.lit(x) for kv in mapping.gender_map.items() for x in kv])
    gender_raw = F.lower(orig[C.GENDER])
    gender = F.when(gender_raw.isNull(), F.lit("unknown")).otherwise(
        F.coalesce(gmap[gender_raw], gender_raw))
    out = src.select(
        parse_long(orig[C.USER_ID]).alias(C.USER_ID), age.cast(T.IntegerType()).alias(C.AGE_BUCKET),
        F.coalesce(orig[C.COUNTRY], F.lit(C.UNKNOWN_COUNTRY)).alias(C.COUNTRY),
        gender.alias(C.GENDER),
        *[orig[c].alias(f"__orig_{c}") for c in C.USERS_COLUMNS],
        *_record_alias(src),
    )
    originals = {c: F.col(f"__orig_{c}") for c in C.USERS_COLUMNS}
    failures = [_failed(originals[C.USER_ID], F.col(C.USER_ID)),
                _failed(originals[C.AGE_BUCKET], F.col(C.AGE_BUCKET))]
    out = _with_row_json(out, originals, failures, _source_record(out))
    return out.select(*C.USERS_COLUMNS, RAW_ROW_JSON)


def ingest_users(spark: SparkSession, path: str, fmt: str, mapping: UserMapping,
                 sep: str = ",") -> DataFrame:
    return users_from_source(read_source(spark, path, fmt, sep), mapping)


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------
def add_missing_columns(spark: SparkSession, path: str, schema: T.StructType) -> List[str]:
    """Add the schema's nullable columns an existing Delta table lacks (a lake written before the
    column existed, e.g. session_id); returns the added names. One commit only when needed."""
    if not table_exists(spark, path):
        return []
    current = read_table(spark, path).schema.fieldNames()
    added = []
    for pos, f in enumerate(schema.fields):
        if f.name in current:
            continue
        if not f.nullable:
            raise ValueError(f"{path} lacks the NOT NULL column {f.name!r}; rebuild the table")
        where = f"AFTER `{schema.fields[pos - 1].name}`" if pos > 0 else "FIRST"
        spark.sql(f"ALTER TABLE delta.`{path}` ADD COLUMNS "
                  f"(`{f.name}` {f.dataType.simpleString()} {where})")
        current.append(f.name)
        added.append(f.name)
    return added


def rows_written(spark: SparkSession, path: str, version: int) -> int:
    """Rows the commit `version` of the table at `path` wrote (Delta's numOutputRows)."""
    from delta.tables import DeltaTable

    row = (DeltaTable.forPath(spark, path).history().where(F.col("version") == version)
           .select("operationMetrics").first())
    if row is None:
        raise RuntimeError(f"{path}: commit {version} not found in the table history")
    return int((row["operationMetrics"] or {}).get("numOutputRows", 0) or 0)


def write_ingested(spark: SparkSession, lake: str, events: Optional[DataFrame] = None,
                   items: Optional[DataFrame] = None, users: Optional[DataFrame] = None,
                   mode: str = "overwrite") -> List[WriteResult]:
    """Write whichever raw tables are given (overwrite, or append for a new log increment).

    Each result's `inserted` is the number of rows its commit wrote (read back from the Delta
    log, so an append reports what it added, not +0).
    """
    results = []
    for table, df in ((C.T_RAW_ITEMS, items), (C.T_RAW_USERS, users), (C.T_RAW_EVENTS, events)):
        if df is not None:
            add_missing_columns(spark, C.LakePaths(lake).table(table), raw_schema(table))
            res = write_raw(spark, df, lake, table, mode)
            results.append(replace(res, inserted=rows_written(spark, res.path, res.version)))
    return results
