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

Timestamp formats: ``epoch_s`` / ``epoch_ms`` (integer or decimal numbers), ``iso`` (anything
Spark casts to a timestamp), or a Spark datetime pattern such as ``yyyy-MM-dd HH:mm:ss``.
Values without a zone are UTC (the session time zone pinned by ``pipelines.spark``). Native
timestamp columns (Parquet) are used as they are.

Categories: either one delimited column (``"Action|Comedy"``, or with confidence weights
``"3:0.9|7:0.4"``; a token without a weight gets 1.0) or 0/1 flag columns (MovieLens 100k genre
flags -> the set flags, each with weight 1.0). Category ids: integer tokens are used as they are;
otherwise names get ids from a vocabulary (given, or the sorted distinct names of the file,
returned so callers can store it). Advertiser 0 means "unknown advertiser".
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines import contracts as C
from pipelines.delta_io import RAW_ROW_JSON, WriteResult, write_raw

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


# --------------------------------------------------------------------------------------
# Mappings
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EventMapping:
    """Source columns of the event log. Exactly one of `event_type_col` / `event_type`."""

    user_col: str
    item_col: str
    ts_col: str
    ts_format: str = TS_EPOCH_SECONDS
    event_type_col: Optional[str] = None
    event_type: Optional[str] = None  # constant, e.g. every rating is a conversion
    event_type_map: Mapping[str, str] = field(default_factory=dict)  # source value -> contract
    subject_col: Optional[str] = None
    surface_col: Optional[str] = None
    surface: Optional[str] = None  # constant surface when the log has no column

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
    """Source columns of the items file. Exactly one of `categories_col` / `category_flag_cols`."""

    item_col: str
    categories_col: Optional[str] = None
    category_sep: str = "|"
    weight_sep: str = ":"
    category_flag_cols: Tuple[str, ...] = ()
    advertiser_col: Optional[str] = None

    def __post_init__(self) -> None:
        if (self.categories_col is None) == (not self.category_flag_cols):
            raise ValueError("give exactly one of categories_col (delimited) or "
                             "category_flag_cols (0/1 columns)")
        if self.category_sep == self.weight_sep:
            raise ValueError("category_sep and weight_sep must differ")


@dataclass(frozen=True)
class UserMapping:
    """Source columns of the users file; absent columns mean "unknown" for every user."""

    user_col: str
    age_col: Optional[str] = None
    age_is_bucket: bool = False  # the column already holds 0..7 buckets (else years)
    country_col: Optional[str] = None
    gender_col: Optional[str] = None
    gender_map: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_GENDER_MAP))


# --------------------------------------------------------------------------------------
# Reading and parsing
# --------------------------------------------------------------------------------------
def read_source(spark: SparkSession, path: str, fmt: str, sep: str = ",",
                header: bool = True) -> DataFrame:
    """CSV with every column as a string (nothing guessed, nothing lost), or Parquet as typed."""
    if fmt == "csv":
        return (spark.read.option("header", str(header).lower()).option("sep", sep)
                .option("inferSchema", "false").option("mode", "PERMISSIVE").csv(path))
    if fmt == "parquet":
        return spark.read.parquet(path)
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


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


def _with_row_json(df: DataFrame, originals: Dict[str, Column], failures: List[Column]) -> DataFrame:
    """RAW_ROW_JSON = original strings (contract names) when any value failed to parse."""
    any_failed = F.lit(False)
    for failed in failures:
        any_failed = any_failed | F.coalesce(failed, F.lit(False))
    original = F.to_json(F.struct(*[c.alias(n) for n, c in originals.items()]),
                         {"ignoreNullFields": "false"})
    return df.withColumn(RAW_ROW_JSON, F.when(any_failed, original))


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
                   mapping.subject_col, mapping.surface_col], "events")
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
    }
    typed = {
        C.USER_ID: parse_long(orig[C.USER_ID]),
        C.ITEM_ID: parse_long(orig[C.ITEM_ID]),
        C.EVENT_TYPE: _event_type(src, mapping),
        C.EVENT_TS: parse_timestamp(src, mapping.ts_col, mapping.ts_format),
        C.SURFACE: orig[C.SURFACE],
        C.SUBJECT_ITEM_ID: parse_long(orig[C.SUBJECT_ITEM_ID]),
    }
    out = src.select(*[typed[c].alias(c) for c in C.RAW_EVENTS_COLUMNS],
                     *[orig[c].alias(f"__orig_{c}") for c in C.RAW_EVENTS_COLUMNS])
    originals = {c: F.col(f"__orig_{c}") for c in C.RAW_EVENTS_COLUMNS}
    failures = [_failed(originals[c], F.col(c)) for c in (C.USER_ID, C.ITEM_ID, C.EVENT_TS,
                                                           C.SUBJECT_ITEM_ID)]
    out = _with_row_json(out, originals, failures)
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


def category_names(src: DataFrame, mapping: ItemMapping) -> List[str]:
    """Distinct category names of the file, sorted (the default vocabulary)."""
    toks = _tokens(_text(src, mapping.categories_col), mapping.category_sep)
    names = F.transform(toks, lambda t: F.trim(F.split(t, re.escape(mapping.weight_sep))[0]))
    rows = src.select(F.explode(names).alias("n")).distinct().collect()
    return sorted(r["n"] for r in rows)


def _all_integer(names: Sequence[str]) -> bool:
    return bool(names) and all(re.fullmatch(r"\d{1,9}", n) for n in names)


def build_vocabulary(names: Sequence[str]) -> Dict[str, int]:
    """name -> id: integer names map to themselves, other names to their sorted position."""
    if _all_integer(names):
        return {n: int(n) for n in names}
    return {n: i for i, n in enumerate(sorted(set(names)))}


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
                      vocab: Optional[Mapping[str, int]] = None
                      ) -> Tuple[DataFrame, Dict[str, int]]:
    """Source rows -> raw_items rows (+ RAW_ROW_JSON), and the category vocabulary used."""
    _require(src, [mapping.item_col, mapping.categories_col, mapping.advertiser_col,
                   *mapping.category_flag_cols], "items")
    if vocab is None and mapping.category_flag_cols:  # flag columns: ids in column order
        vocab = {c: i for i, c in enumerate(mapping.category_flag_cols)}
    vocab = dict(vocab) if vocab is not None else build_vocabulary(category_names(src, mapping))
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
    )
    originals = {C.ITEM_ID: F.col("__o_item"), C.CATEGORY_IDS: F.col("__o_cats"),
                 C.CATEGORY_WEIGHTS: F.col("__o_cats"), C.ADVERTISER_ID: F.col("__o_adv")}
    failures = [_failed(F.col("__o_item"), F.col(C.ITEM_ID)),
                _failed(F.col("__o_adv"), F.col(C.ADVERTISER_ID)), F.col("__cats_failed")]
    out = _with_row_json(out, originals, failures)
    return out.select(*C.ITEMS_COLUMNS, RAW_ROW_JSON), vocab


def ingest_items(spark: SparkSession, path: str, fmt: str, mapping: ItemMapping, sep: str = ",",
                 vocab: Optional[Mapping[str, int]] = None) -> Tuple[DataFrame, Dict[str, int]]:
    return items_from_source(read_source(spark, path, fmt, sep), mapping, vocab)


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
    )
    originals = {c: F.col(f"__orig_{c}") for c in C.USERS_COLUMNS}
    failures = [_failed(originals[C.USER_ID], F.col(C.USER_ID)),
                _failed(originals[C.AGE_BUCKET], F.col(C.AGE_BUCKET))]
    out = _with_row_json(out, originals, failures)
    return out.select(*C.USERS_COLUMNS, RAW_ROW_JSON)


def ingest_users(spark: SparkSession, path: str, fmt: str, mapping: UserMapping,
                 sep: str = ",") -> DataFrame:
    return users_from_source(read_source(spark, path, fmt, sep), mapping)


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------
def write_ingested(spark: SparkSession, lake: str, events: Optional[DataFrame] = None,
                   items: Optional[DataFrame] = None, users: Optional[DataFrame] = None,
                   mode: str = "overwrite") -> List[WriteResult]:
    """Write whichever raw tables are given (overwrite, or append for a new log increment)."""
    results = []
    for table, df in ((C.T_RAW_ITEMS, items), (C.T_RAW_USERS, users), (C.T_RAW_EVENTS, events)):
        if df is not None:
            results.append(write_raw(spark, df, lake, table, mode))
    return results
