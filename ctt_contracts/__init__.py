"""Every table, column, feature and artifact name of the system, in one place.

Why one module: the Spark jobs, the trainer (which reads Delta without Spark), the Feast
definitions and the online resolver all meet on these names. Retyping a column name as a
string anywhere else is how training/serving skew starts, so every other module imports the
constants below instead. The same holds for the one rule they must all apply alike: the
context projection (:func:`project_context`), which the Spark build, the model fixtures and
the resolver call instead of re-implementing it.

A leaf: it imports nothing of the project (``pipelines/``, ``models/``, ``serving/`` and
``feature_repo/`` import it), only the standard library, and pyspark types only inside
:func:`spark_schema` so that torch code and the resolver can import names without Spark.
"""
from __future__ import annotations

import math
from array import array
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Dict, List, Optional, Sequence, Tuple

# --------------------------------------------------------------------------------------
# Event vocabulary
# --------------------------------------------------------------------------------------
EVENT_VIEW = "view"
EVENT_CLICK = "click"
EVENT_CONVERSION = "conversion"
EVENT_TYPES: Tuple[str, ...] = (EVENT_VIEW, EVENT_CLICK, EVENT_CONVERSION)

CONTEXT_PSEUDO = "pseudo"  # derived from the label item's categories (training + eval)
CONTEXT_REAL = "real"  # derived from the conversion's subject item (what serving sees)

SPLIT_TRAIN = "train"
SPLIT_VAL = "val"
SPLIT_TEST = "test"
SPLITS: Tuple[str, ...] = (SPLIT_TRAIN, SPLIT_VAL, SPLIT_TEST)

# Bounds used by validation.
MIN_EVENT_TS_SECONDS = 946_684_800  # 2000-01-01T00:00:00Z
MAX_ID = 2**62  # ids above this are treated as corrupt (hash overflow, garbage)
MAX_CATEGORIES_PER_ITEM = 32

# --------------------------------------------------------------------------------------
# Column names
# --------------------------------------------------------------------------------------
USER_ID = "user_id"
ITEM_ID = "item_id"
EVENT_TYPE = "event_type"
EVENT_TS = "event_ts"
SURFACE = "surface"
SUBJECT_ITEM_ID = "subject_item_id"
SESSION_ID = "session_id"  # the log's session key (any string), null when the log has none

CATEGORY_IDS = "category_ids"
CATEGORY_WEIGHTS = "category_weights"
ADVERTISER_ID = "advertiser_id"

AGE_BUCKET = "age_bucket"
COUNTRY = "country"
GENDER = "gender"

ROW_JSON = "row_json"
SOURCE_TABLE = "source_table"
REASON = "reason"
INGESTED_AT = "ingested_at"

# Raw tables carry one column beyond their contract columns: the original *string* values of a
# row whose values failed to parse at ingest (JSON keyed by contract column names), else null.
# Validation copies it into quarantine.row_json so that "abc" as a user id is quarantined as
# "abc", not as null. The quarantine's column name on purpose: it is the same thing.
RAW_ROW_JSON = ROW_JSON

AS_OF_TS = "as_of_ts"  # timestamp of the label conversion (history is strictly before it)
ITEM_IDS = "item_ids"  # history, oldest..newest
# EVENT_TS in sequences / user_sequences is array<long>: epoch seconds aligned with item_ids
# (the same name as the events' timestamp column: it holds those events' times).
LABEL_ITEM_ID = "label_item_id"
SPLIT = "split"

CONTEXT_CATEGORY_IDS = "context_category_ids"
CONTEXT_WEIGHTS = "context_weights"
CONTEXT_SOURCE = "context_source"

SEQUENCE_HASH = "sequence_hash"  # in user_sequences: changes iff the user's history changed
UPDATED_AT = "updated_at"

HIDDEN_STATE = "hidden_state"
MODEL_VERSION = "model_version"
STATE_TS = "state_ts"

# Writer lease of a lake (pipelines/lease.py: <lake>/_meta/lease, one row per scope).
LEASE_SCOPE = "scope"
LEASE_OWNER = "owner"
LEASE_JOB = "job"
LEASE_HOST = "host"
LEASE_NODE = "node"
LEASE_PID = "pid"
LEASE_PID_START = "pid_start"
LEASE_ACQUIRED_AT = "acquired_at"
LEASE_RENEWED_AT = "renewed_at"
LEASE_EXPIRES_AT = "expires_at"

# --------------------------------------------------------------------------------------
# Tables (Delta, one folder each under the lake root)
# --------------------------------------------------------------------------------------
T_RAW_EVENTS = "raw_events"  # as ingested / generated, before validation
T_RAW_ITEMS = "raw_items"
T_RAW_USERS = "raw_users"
T_EVENTS = "events"  # validated events
T_ITEMS = "items"  # validated items
T_USERS = "users"  # validated users
T_QUARANTINE = "quarantine"
T_SEQUENCES = "sequences"  # one row per training example (conversion)
T_CONTEXT_ROWS = "context_rows"
T_USER_SEQUENCES = "user_sequences"  # latest full history per user, for batch inference
T_USER_STATES = "user_states"

ALL_TABLES: Tuple[str, ...] = (
    T_RAW_EVENTS, T_RAW_ITEMS, T_RAW_USERS, T_EVENTS, T_ITEMS, T_USERS, T_QUARANTINE,
    T_SEQUENCES, T_CONTEXT_ROWS, T_USER_SEQUENCES, T_USER_STATES,
)

# Column lists in table order (used by schema builders, pandas baselines and readers).
RAW_EVENTS_COLUMNS: List[str] = [USER_ID, ITEM_ID, EVENT_TYPE, EVENT_TS, SURFACE, SUBJECT_ITEM_ID,
                                  SESSION_ID]
ITEMS_COLUMNS: List[str] = [ITEM_ID, CATEGORY_IDS, CATEGORY_WEIGHTS, ADVERTISER_ID]
USERS_COLUMNS: List[str] = [USER_ID, AGE_BUCKET, COUNTRY, GENDER]
QUARANTINE_COLUMNS: List[str] = [ROW_JSON, SOURCE_TABLE, REASON, INGESTED_AT]
SEQUENCES_COLUMNS: List[str] = [USER_ID, AS_OF_TS, ITEM_IDS, EVENT_TS, LABEL_ITEM_ID, SPLIT]
# context_rows: label_item_id is part of the key because (user_id, as_of_ts) alone does not
# identify an example when a user converts on two items in the same second (common in real logs,
# e.g. MovieLens batch ratings). subject_item_id is the item a REAL row was derived from (null on
# PSEUDO rows); it is last so a table written before it existed gains it by appending a column.
CONTEXT_ROWS_COLUMNS: List[str] = [
    USER_ID, AS_OF_TS, LABEL_ITEM_ID, CONTEXT_CATEGORY_IDS, CONTEXT_WEIGHTS, CONTEXT_SOURCE,
    SUBJECT_ITEM_ID,
]
USER_SEQUENCES_COLUMNS: List[str] = [USER_ID, AS_OF_TS, ITEM_IDS, EVENT_TS, SEQUENCE_HASH]
USER_STATES_COLUMNS: List[str] = [USER_ID, HIDDEN_STATE, MODEL_VERSION, STATE_TS, SEQUENCE_HASH]

# Unique row keys of the derived tables (the MERGE keys of the build job).
SEQUENCES_KEY: List[str] = [USER_ID, AS_OF_TS, LABEL_ITEM_ID]
CONTEXT_ROWS_KEY: List[str] = [*SEQUENCES_KEY, CONTEXT_SOURCE]

# Quarantine reasons (the `reason` column takes exactly these values).
R_WRONG_FIELD_COUNT = "wrong_number_of_fields"  # a CSV record with too few / too many fields
R_NULL_ID = "null_or_unparseable_id"
R_ID_OUT_OF_RANGE = "id_out_of_range"
R_UNKNOWN_EVENT_TYPE = "unknown_event_type"
R_BAD_TIMESTAMP = "null_or_unparseable_timestamp"
R_FUTURE_TIMESTAMP = "timestamp_in_future"
R_ANCIENT_TIMESTAMP = "timestamp_before_2000"
R_UNKNOWN_ITEM = "unknown_item"
R_DUPLICATE_EVENT = "duplicate_event"
R_MALFORMED_CATEGORIES = "malformed_category_arrays"
R_BAD_DEMOGRAPHICS = "bad_demographics"
R_DUPLICATE_KEY = "duplicate_key"
QUARANTINE_REASONS: Tuple[str, ...] = (
    R_WRONG_FIELD_COUNT,
    R_NULL_ID, R_ID_OUT_OF_RANGE, R_UNKNOWN_EVENT_TYPE, R_BAD_TIMESTAMP, R_FUTURE_TIMESTAMP,
    R_ANCIENT_TIMESTAMP, R_UNKNOWN_ITEM, R_DUPLICATE_EVENT, R_MALFORMED_CATEGORIES,
    R_BAD_DEMOGRAPHICS, R_DUPLICATE_KEY,
)
# Key of a raw row's JSON (raw tables' row_json) holding the source record verbatim when the
# record itself was malformed (wrong number of fields): validation quarantines such rows first.
SOURCE_RECORD = "source_record"

# --------------------------------------------------------------------------------------
# Feast names (feature_repo/ and serving/ both use these)
# --------------------------------------------------------------------------------------
FEAST_USER_ENTITY = "user"
FEAST_ITEM_ENTITY = "item"
FV_USER_SEQUENCE_STATE = "user_sequence_state"
FV_USER_PROFILE = "user_profile"
FV_ITEM_CATEGORIES = "item_categories"
FEATURE_SERVICE = "contextual_two_tower_v1"


def feature_ref(view: str, feature: str) -> str:
    """Feast's `view:feature` reference string."""
    return f"{view}:{feature}"


# --------------------------------------------------------------------------------------
# Demographic vocabularies (shared by generator, ingest, model and resolver)
# --------------------------------------------------------------------------------------
AGE_BUCKETS = 8  # 0 = unknown, 1..7 = age groups
GENDERS: Tuple[str, ...] = ("unknown", "f", "m", "x")
UNKNOWN_COUNTRY = "unknown"


# --------------------------------------------------------------------------------------
# Serving bundle (written by models/export.py, read by serving/ and jobs/batch_inference.py)
# --------------------------------------------------------------------------------------
BUNDLE_WEIGHTS = "model.safetensors"
BUNDLE_CONFIG = "config.json"
BUNDLE_ITEM_EMBEDDINGS = "item_embeddings.npy"  # (N, D) float32, row i <-> item_ids[i]
BUNDLE_ITEM_IDS = "item_ids.npy"  # (N,) int64
BUNDLE_MANIFEST = "manifest.json"
BUNDLE_CREATED_AT = "created_at"  # manifest key: when the bundle was exported (UTC, ISO 8601)
INDEX_DIR = "scann"
INDEX_MANIFEST = "index_manifest.json"
INDEX_ITEM_IDS = "item_ids.npy"  # (N,) int64 doc ids of an index folder: row i <-> item_ids[i]


# --------------------------------------------------------------------------------------
# Lake metadata: one-row (or small) Delta tables under <lake>/_meta, so they work on any lake
# URI. Not in ALL_TABLES: they describe how the data was built, they are not data.
# --------------------------------------------------------------------------------------
META_DIR = "_meta"
META_SPLIT_CUTOFFS = "split_cutoffs"  # pipelines/sequences.py
META_SUBJECT_COVERAGE = "subject_coverage"  # pipelines/subjects.py
META_BUILD_CONFIG = "build_config"  # pipelines/build_config.py: the flags of the last build
META_CATEGORY_VOCABULARY = "category_vocabulary"  # pipelines/ingest.py
META_LEASE = "lease"  # pipelines/lease.py
META_BUILD_PROGRESS = "build_progress"  # pipelines/build_progress.py: what the last build consumed
META_INFERENCE_PROGRESS = "inference_progress"  # pipelines/inference.py: what the last run consumed
META_TABLES: Tuple[str, ...] = (META_SPLIT_CUTOFFS, META_SUBJECT_COVERAGE, META_BUILD_CONFIG,
                                META_CATEGORY_VOCABULARY, META_LEASE, META_BUILD_PROGRESS,
                                META_INFERENCE_PROGRESS)

# build_config: one row, the build's configuration as JSON (keys = BuildConfig field names) so
# that a field added later needs no schema change; readable with Spark and with deltalake.
BUILD_CONFIG_JSON = "config_json"
CONTEXT_TOP_K = "context_top_k"  # key in build_config and in the bundle manifest
# build_progress: one row, JSON of the table versions the last successful build consumed/wrote.
BUILD_PROGRESS_JSON = "progress_json"

# inference_progress (pipelines/inference.py): one row, what the last batch inference consumed:
# the user_sequences version, the model_version, the user_states version it left and its users;
# with the Delta table ids, so that a table deleted and rebuilt is not taken for the same one.
SEQUENCES_VERSION = "sequences_version"
SEQUENCES_TABLE_ID = "sequences_table_id"
STATES_VERSION = "states_version"
STATES_TABLE_ID = "states_table_id"
USERS_COUNT = "n_users"


@dataclass(frozen=True)
class LakePaths:
    """Where each Delta table lives under one root (a local folder or any Hadoop URI)."""

    root: str

    def table(self, name: str) -> str:
        if name not in ALL_TABLES:
            raise ValueError(f"unknown table {name!r}; known: {', '.join(ALL_TABLES)}")
        return f"{self.root.rstrip('/')}/{name}"

    def meta(self, name: str) -> str:
        if name not in META_TABLES:
            raise ValueError(f"unknown metadata table {name!r}; known: {', '.join(META_TABLES)}")
        return f"{self.root.rstrip('/')}/{META_DIR}/{name}"


# --------------------------------------------------------------------------------------
# Context projection: what a context row (and a served subject item) holds
# --------------------------------------------------------------------------------------
# A context is an item's top-k categories in the contract order (weight desc, then category id
# asc: ties are deterministic whatever order a source listed them in), weights renormalised in
# double precision to sum to 1 and stored as float32. The build writes it (pseudo and real
# context_rows), the trainer reads it from there, and the resolver applies it to a subject item
# at request time with the k the bundle's manifest records; a different k or order at serving
# would feed the head a context shape it never saw in training.
DEFAULT_CONTEXT_TOP_K = 3


def category_order(category_ids: Sequence[int], weights: Sequence[float]) -> List[int]:
    """Positions of an item's (category, weight) pairs in the contract order."""
    if len(category_ids) != len(weights):
        raise ValueError(f"category ids and weights differ in length: {len(category_ids)} vs "
                         f"{len(weights)}")
    return sorted(range(len(category_ids)), key=lambda i: (-weights[i], category_ids[i]))


def project_context(category_ids: Optional[Sequence[int]], weights: Optional[Sequence[float]],
                    k: int) -> Tuple[List[int], List[float]]:
    """(ids, weights) -> the top-k ids in the contract order and their renormalised float32
    weights. Empty input is "no context" (two empty lists); a negative id, a non-finite or
    negative weight, or weights summing to 0 raise ValueError."""
    if k < 1:
        raise ValueError(f"context top-k must be >= 1, got {k}")
    ids = [int(c) for c in (category_ids if category_ids is not None else [])]
    w = [float(x) for x in (weights if weights is not None else [])]
    if any(c < 0 for c in ids):
        raise ValueError("category ids must be non-negative (-1 is reserved for padding)")
    if not all(math.isfinite(x) and x >= 0 for x in w):
        raise ValueError(f"category weights must be finite and >= 0, got {w[:8]}")
    top = category_order(ids, w)[:k]
    total = 0.0
    for i in top:  # in order, in double precision (what the stored rows were built with)
        total += w[i]
    if top and total <= 0:
        raise ValueError("category weights sum to 0: cannot pool a context with no confidence")
    return [ids[i] for i in top], array("f", [w[i] / total for i in top]).tolist()


# --------------------------------------------------------------------------------------
# Delta's change data feed: the table property and the feed's own columns and change types
# (Delta's names, not contract columns; read by the incremental build, batch inference and
# the Feast export)
# --------------------------------------------------------------------------------------
CDF_PROPERTY = "delta.enableChangeDataFeed"
CDF_TYPE, CDF_VERSION = "_change_type", "_commit_version"
CDF_INSERT, CDF_DELETE, CDF_PREIMAGE = "insert", "delete", "update_preimage"


# --------------------------------------------------------------------------------------
# Feast offline snapshots (pipelines/feast_ops.py writes them, feature_repo/ reads them)
# --------------------------------------------------------------------------------------
ENV_LAKE = "CTT_LAKE"  # lake root whose snapshots the Feast sources read
ENV_FEAST_DATA = "CTT_FEAST_DATA"  # folder of the Feast registry + SQLite online store
FEATURE_TS = "feature_ts"  # event timestamp added to the users/items snapshots
T_USER_PROFILE_FEATURES = "user_profile_features"
T_ITEM_CATEGORY_FEATURES = "item_category_features"
FEAST_EXPORT_DIR = "feast_export"  # under the lake root
# snapshot name -> Delta table it is exported from
FEAST_SNAPSHOT_SOURCES: Dict[str, str] = {
    T_USER_STATES: T_USER_STATES,
    T_USER_PROFILE_FEATURES: T_USERS,
    T_ITEM_CATEGORY_FEATURES: T_ITEMS,
}
# snapshot name -> its event-time column (the Feast source's timestamp_field)
FEAST_SNAPSHOT_TS: Dict[str, str] = {
    T_USER_STATES: STATE_TS,
    T_USER_PROFILE_FEATURES: FEATURE_TS,
    T_ITEM_CATEGORY_FEATURES: FEATURE_TS,
}


def as_utc(ts: datetime) -> datetime:
    """``ts`` made aware: every timestamp of the lake is UTC, so a naive one (Spark's, whose
    session zone ``get_spark`` pins to UTC; Feast's registry; an ISO string without an offset)
    gets the UTC zone instead of the machine's; an aware one is returned as it is."""
    return ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)


def feast_snapshot_path(lake_root: str, snapshot: str) -> str:
    """Path of one Parquet snapshot, ``<lake>/feast_export/<snapshot>.parquet``: a folder of
    Parquet parts (pipelines/feast_ops.py), read as one table by Feast and pyarrow."""
    if snapshot not in FEAST_SNAPSHOT_SOURCES:
        raise ValueError(f"unknown snapshot {snapshot!r}; known: "
                         f"{', '.join(FEAST_SNAPSHOT_SOURCES)}")
    return f"{str(lake_root).rstrip('/')}/{FEAST_EXPORT_DIR}/{snapshot}.parquet"


def spark_schema(table: str):  # -> pyspark.sql.types.StructType
    """The Spark schema of a Delta table of the system (imported lazily: no Spark for torch code)."""
    from pyspark.sql import types as T

    long_, int_, str_, ts = T.LongType(), T.IntegerType(), T.StringType(), T.TimestampType()
    arr_long, arr_int, arr_float = (
        T.ArrayType(T.LongType(), False), T.ArrayType(T.IntegerType(), False),
        T.ArrayType(T.FloatType(), False),
    )
    fields: Dict[str, List[Tuple[str, object, bool]]] = {
        T_RAW_EVENTS: [
            (USER_ID, long_, True), (ITEM_ID, long_, True), (EVENT_TYPE, str_, True),
            (EVENT_TS, ts, True), (SURFACE, str_, True), (SUBJECT_ITEM_ID, long_, True),
            (SESSION_ID, str_, True),
        ],
        T_RAW_ITEMS: [
            (ITEM_ID, long_, True), (CATEGORY_IDS, arr_int, True),
            (CATEGORY_WEIGHTS, arr_float, True), (ADVERTISER_ID, long_, True),
        ],
        T_RAW_USERS: [
            (USER_ID, long_, True), (AGE_BUCKET, int_, True), (COUNTRY, str_, True),
            (GENDER, str_, True),
        ],
        T_QUARANTINE: [
            (ROW_JSON, str_, False), (SOURCE_TABLE, str_, False), (REASON, str_, False),
            (INGESTED_AT, ts, False),
        ],
        T_SEQUENCES: [
            (USER_ID, long_, False), (AS_OF_TS, ts, False), (ITEM_IDS, arr_long, False),
            (EVENT_TS, arr_long, False), (LABEL_ITEM_ID, long_, False),
            (SPLIT, str_, False),
        ],
        T_CONTEXT_ROWS: [
            (USER_ID, long_, False), (AS_OF_TS, ts, False), (LABEL_ITEM_ID, long_, False),
            (CONTEXT_CATEGORY_IDS, arr_int, False), (CONTEXT_WEIGHTS, arr_float, False),
            (CONTEXT_SOURCE, str_, False), (SUBJECT_ITEM_ID, long_, True),
        ],
        T_USER_SEQUENCES: [
            (USER_ID, long_, False), (AS_OF_TS, ts, False), (ITEM_IDS, arr_long, False),
            (EVENT_TS, arr_long, False), (SEQUENCE_HASH, str_, False),
        ],
        T_USER_STATES: [
            (USER_ID, long_, False), (HIDDEN_STATE, arr_float, False),
            (MODEL_VERSION, str_, False), (STATE_TS, ts, False), (SEQUENCE_HASH, str_, False),
        ],
    }
    optional = (SUBJECT_ITEM_ID, SURFACE, SESSION_ID)
    fields[T_EVENTS] = [(n, t, n in optional) for n, t, _ in fields[T_RAW_EVENTS]]
    fields[T_ITEMS] = [(n, t, False) for n, t, _ in fields[T_RAW_ITEMS]]
    fields[T_USERS] = [(n, t, False) for n, t, _ in fields[T_RAW_USERS]]
    if table not in fields:
        raise ValueError(f"unknown table {table!r}")
    return T.StructType([T.StructField(n, t, nullable) for n, t, nullable in fields[table]])
