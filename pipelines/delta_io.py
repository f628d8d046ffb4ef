"""Delta write helpers shared by the data jobs: contract schemas, idempotent minimal-commit writes.

Why these exist: every job must be rerunnable. Rerunning over the same input must leave each
table's content *and* its Delta version unchanged (downstream consumers key on versions: the
model bundle records the Delta versions of its training inputs, batch inference reads the change
data feed of ``user_sequences``). So instead of ``mode("overwrite")`` the derived tables are
*synchronised*: the new content is diffed against the current snapshot and

* nothing changed -> no commit at all (an explicit no-op, reported as such);
* only new rows -> one insert-only MERGE keyed by the table's unique row key;
* otherwise -> one MERGE keyed by the same key that deletes vanished keys, updates changed rows
  and inserts new ones, so untouched rows are not reported as changed in the change data feed.

Overlapping runs: no derived-table write is a blind append (Delta never conflict-checks those:
two overlapping builds used to add the same new events twice). Every write reads the table it
changes (MERGE, or replaceWhere for quarantine), so Delta refuses the second of two conflicting
commits, and a write whose snapshot went stale is diffed again (``sync_table``). A key found
twice in a table is reported with the way to repair it (``DuplicateKeyError``). The jobs also
hold the lake's writer lease (``pipelines.lease``) so that two overlapping runs cannot each win
some of the tables.

A table written before its contract gained a nullable column gets the column appended first
(``evolve_schema``, one extra commit, once); other schema differences are a clear error that
says to rebuild the table.

Raw tables (written by the generator and by ingest) are plain overwrites/appends: they *are*
the input, there is nothing to diff them against; the ``raw`` lease keeps two writers apart.

Tables are always created with the contract schema (``ctt_contracts.spark_schema``), so NOT NULL
columns are enforced by Delta on every later write, whatever nullability Spark inferred.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, Row, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.window import Window

import ctt_contracts as C

RAW_ROW_JSON = C.RAW_ROW_JSON  # the raw tables' extra column (see contracts)
RAW_TABLES = (C.T_RAW_EVENTS, C.T_RAW_ITEMS, C.T_RAW_USERS)

# The staging column of a tagged MERGE (``merge_tagged``): what a source row does to its key.
# Never stored: the MERGE reads it and writes only the schema's columns.
MERGE_TAG = "__merge_tag"
TAG_UPSERT, TAG_DELETE = "U", "D"
_OCC = "__occurrence"  # quarantine staging: occurrence number of a repeated row


def raw_schema(table: str) -> T.StructType:
    """Contract schema of a raw table plus the nullable RAW_ROW_JSON column."""
    if table not in RAW_TABLES:
        raise ValueError(f"{table!r} is not a raw table; raw tables: {', '.join(RAW_TABLES)}")
    return C.spark_schema(table).add(T.StructField(RAW_ROW_JSON, T.StringType(), True))


@dataclass(frozen=True)
class WriteResult:
    """What one write did: the table's version afterwards and what changed."""

    table: str
    path: str
    version: int
    changed: bool
    inserted: int = 0
    deleted: int = 0
    updated: int = 0
    operation: str = "noop"  # noop | create | append | merge | overwrite | replace

    def line(self) -> str:
        return (f"{self.table:<16} v{self.version:<4} {self.operation:<9} "
                f"+{self.inserted} -{self.deleted} ~{self.updated}")


# Delta rebuilds a table's state from its log in `snapshotPartitions` tasks (default 50) after
# every commit. On a laptop with small tables those 50 tiny tasks (each generating projection
# code for the wide log schema) dominate the run time of a job that makes a few dozen commits.
# Local runs use a few partitions instead; clusters keep Delta's default. A runtime conf the
# jobs set on their own session (not pipelines.spark.session_conf), so that a session shared by
# tests keeps Delta's default unless a test asks for the jobs' setting.
LOCAL_SNAPSHOT_PARTITIONS = "2"
SNAPSHOT_PARTITIONS_CONF = "spark.databricks.delta.snapshotPartitions"


def tune_local_delta(spark: SparkSession) -> None:
    """Few log-replay partitions when running on a local master (a runtime SQL conf)."""
    if spark.sparkContext.master.startswith("local"):
        spark.conf.set(SNAPSHOT_PARTITIONS_CONF, LOCAL_SNAPSHOT_PARTITIONS)


# --------------------------------------------------------------------------------------
# Basic helpers
# --------------------------------------------------------------------------------------
def table_exists(spark: SparkSession, path: str) -> bool:
    from delta.tables import DeltaTable

    return DeltaTable.isDeltaTable(spark, path)


def table_version(spark: SparkSession, path: str) -> int:
    """Latest committed version of the Delta table at `path`.

    Read from Delta's transaction log in the driver (``DeltaLog.update``: list the log, no Spark
    job) rather than ``DeltaTable.history(1)``, which runs a job per call: a build asks for
    versions dozens of times (each write's optimistic check), and those jobs were a fixed ~0.25 s
    each, most of an incremental refresh's floor. Same file system and credentials as every read.
    """
    return int(_latest_snapshot(spark, path).version())


def table_properties(spark: SparkSession, path: str) -> Dict[str, str]:
    """The table's properties (its metadata's configuration), from the same log read as
    ``table_version``: no Spark job."""
    conf = _latest_snapshot(spark, path).metadata().configuration()
    keys = conf.keys().iterator()
    out: Dict[str, str] = {}
    while keys.hasNext():
        key = keys.next()
        out[str(key)] = str(conf.apply(key))
    return out


def _latest_snapshot(spark: SparkSession, path: str):
    """Delta's snapshot of the table's latest version (a JVM object); FileNotFoundError when
    `path` holds no table."""
    jvm = spark._jvm
    none = jvm.scala.Option.empty()
    log = jvm.org.apache.spark.sql.delta.DeltaLog.forTable(spark._jsparkSession, path)
    snapshot = log.update(False, none, none)
    if int(snapshot.version()) < 0:
        raise FileNotFoundError(f"no Delta table at {path}")
    return snapshot


def read_table(spark: SparkSession, path: str, version: Optional[int] = None) -> DataFrame:
    """A Delta table pinned to `version` (latest if None) so later commits cannot shift it."""
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    return reader.load(path)


def conform(df: DataFrame, schema: T.StructType, for_merge: bool = False) -> DataFrame:
    """Select the schema's columns in order, cast to its types.

    Top-level nullability is left to Delta (it enforces the table's NOT NULL columns on write).
    ``for_merge``: array columns whose contract elements are NOT NULL also get that element type,
    because a MERGE (every derived-table write) refuses to assign array<x> with nullable elements
    to array<x not null> and no cast can do it; a null element then fails the write naming the
    column (validation never lets one through), it is never dropped. Raw tables keep such
    elements as ingested (appends are lenient), so validation can quarantine them.
    Raises a clear error for a missing column instead of letting a write fail deep inside Delta.
    An array column whose contract forbids null elements (``containsNull=False``) but whose
    expression may yield them (e.g. built with ``transform``) is checked row by row (a null
    element fails the job naming the column) and re-typed without nulls: a plain cast cannot
    narrow ``containsNull`` and MERGE refuses the wider type.
    """
    missing = [f.name for f in schema.fields if f.name not in df.columns]
    if missing:
        raise ValueError(f"DataFrame lacks columns {missing}; has {df.columns}")
    current = {f.name: f.dataType for f in df.schema.fields}
    return df.select([_conform_column(f, current[f.name], for_merge) for f in schema.fields])


def _conform_column(field: T.StructField, have: T.DataType, for_merge: bool) -> Column:
    col = F.col(field.name)
    want = field.dataType
    arrays = isinstance(want, T.ArrayType) and isinstance(have, T.ArrayType)
    if have.simpleString() != want.simpleString():  # simpleString ignores nullability
        # no cast may drop element nullability: cast to the nullable variant, then as below
        keep_nulls = for_merge and arrays and have.containsNull
        col = col.cast(T.ArrayType(want.elementType, True) if keep_nulls else want)
    if for_merge and arrays and have.containsNull and not want.containsNull:
        message = F.lit(f"{field.name}: null element in an array whose elements are NOT NULL")
        col = F.when(F.exists(col, lambda x: x.isNull()), F.raise_error(message)).otherwise(
            F.array_compact(col))
    return col.alias(field.name)


def create_table(spark: SparkSession, path: str, schema: T.StructType,
                 properties: Optional[Dict[str, str]] = None,
                 partition_by: Sequence[str] = ()) -> None:
    """Create an empty Delta table with exactly `schema` (NOT NULL enforced) if absent."""
    from delta.tables import DeltaTable

    builder = DeltaTable.createIfNotExists(spark).location(path).addColumns(schema)
    for key, value in (properties or {}).items():
        builder = builder.property(key, value)
    if partition_by:
        builder = builder.partitionedBy(*partition_by)
    builder.execute()


def ensure_properties(spark: SparkSession, path: str, properties: Dict[str, str]) -> bool:
    """Set table properties that are missing (one commit only if something was missing).

    Why: a table created before a property was required (e.g. change data feed on
    user_sequences) must get it without being recreated.
    """
    if not properties:
        return False
    current = table_properties(spark, path)
    missing = {k: v for k, v in properties.items() if current.get(k) != v}
    if not missing:
        return False
    assignments = ", ".join(f"'{k}' = '{v}'" for k, v in missing.items())
    spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ({assignments})")
    return True


def evolve_schema(spark: SparkSession, path: str, table: str, schema: T.StructType) -> bool:
    """Bring a table written by an older version of the jobs up to its contract schema.

    Why: a contract that gains a nullable column (e.g. context_rows.subject_item_id) must not
    force every existing lake to be deleted and rebuilt. When the table's columns are exactly
    the contract's leading columns (same names, order and types) and every missing column is
    nullable, the missing columns are appended in one ALTER TABLE commit and the next diff fills
    them. Anything else (a dropped, renamed, retyped or reordered column, a new NOT NULL column)
    cannot be evolved in place: a ValueError names the difference and says to rebuild. Returns
    True if a column was added.
    """
    from delta.tables import DeltaTable

    current = DeltaTable.forPath(spark, path).toDF().schema
    have = [(f.name, f.dataType.simpleString()) for f in current.fields]
    want = [(f.name, f.dataType.simpleString()) for f in schema.fields]
    missing = schema.fields[len(have):]
    if have != want[:len(have)] or any(not f.nullable for f in missing):
        raise ValueError(
            f"{table} at {path} has columns {have} but the contract is {want}: it was written by "
            f"another version of the jobs and cannot be evolved in place (only nullable columns "
            f"appended at the end can). Delete {path} and rerun build_sequences to rebuild it.")
    if not missing:
        return False
    columns = ", ".join(f"`{f.name}` {f.dataType.simpleString()}" for f in missing)
    spark.sql(f"ALTER TABLE delta.`{path}` ADD COLUMNS ({columns})")
    return True


# Every keyed table (written by ``sync_table`` or ``merge_tagged``) keeps deletion vectors: a MERGE
# that changes a few users' rows in every file (a day's users are spread over all of them) marks
# those rows deleted and writes only the new ones, instead of rewriting each touched file whole,
# so a daily increment writes what changed, not the table. Readers outside Spark go through
# ``models.lake_read``, which applies them. ``docs/operations.md`` says when to purge them.
KEYED_PROPERTIES = {"delta.enableDeletionVectors": "true"}

# The change data feed of raw_events gives an incremental build the rows appended since the
# version it last consumed (pipelines/build_progress.py); the other raw tables are read whole.
# That of user_sequences gives batch inference the users to re-encode, and that of user_states
# gives the Feast export the states to append (pipelines/feast_ops.py).
CDF_PROPERTIES = {C.CDF_PROPERTY: "true"}
RAW_PROPERTIES = {C.T_RAW_EVENTS: CDF_PROPERTIES}
STATES_PROPERTIES = {**KEYED_PROPERTIES, **CDF_PROPERTIES}


def write_raw(spark: SparkSession, df: DataFrame, lake: str, table: str,
              mode: str = "overwrite") -> WriteResult:
    """Write a raw table (generator / ingest output): overwrite or append, schema = raw_schema."""
    if mode not in ("overwrite", "append"):
        raise ValueError(f"mode must be 'overwrite' or 'append', got {mode!r}")
    schema = raw_schema(table)
    if RAW_ROW_JSON not in df.columns:
        df = df.withColumn(RAW_ROW_JSON, F.lit(None).cast(T.StringType()))
    path = C.LakePaths(lake).table(table)
    properties = RAW_PROPERTIES.get(table, {})
    create_table(spark, path, schema, properties)
    ensure_properties(spark, path, properties)
    conform(df, schema).write.format("delta").mode(mode).save(path)
    return WriteResult(table, path, table_version(spark, path), True, operation=mode)


# --------------------------------------------------------------------------------------
# Synchronise a derived table with its new content
# --------------------------------------------------------------------------------------
def _null_safe_match(keys: Iterable[str], left: str = "t", right: str = "s") -> str:
    """SQL condition `t.k1 <=> s.k1 AND ...` (null-safe: a null subject id is a valid key part)."""
    return " AND ".join(f"{left}.`{k}` <=> {right}.`{k}`" for k in keys)


_STATUS = "__sync_status"  # I insert, D delete, U update, S same
_IN_NEW, _IN_OLD, _DUPS = "__in_new", "__in_old", "__key_rows"


def diff_rows(new: DataFrame, old: DataFrame, key_cols: Sequence[str]) -> DataFrame:
    """Full outer join of new and old content on the key, one status per key.

    Output: key columns, new value columns, _STATUS, _DUPS (rows of this key in `new`; > 1 means
    the key is not unique). One shuffle per side; arrays are compared by value (`<=>`).

    Every old column is renamed and columns are referred to by name only, so `new` may be built
    from `old` itself (the incremental build's events: the known old rows plus the increment's),
    which a join of Dataset-qualified columns refuses as an ambiguous self-join.
    """
    value_cols = [c for c in new.columns if c not in key_cols]
    n = new.withColumn(_IN_NEW, F.lit(True)).withColumn(
        _DUPS, F.count(F.lit(1)).over(Window.partitionBy(*key_cols)))
    o = old.select(*[F.col(c).alias(_old(c)) for c in (*key_cols, *value_cols)]).withColumn(
        _IN_OLD, F.lit(True))
    cond = [F.col(k).eqNullSafe(F.col(_old(k))) for k in key_cols]
    j = n.join(o, cond, "full_outer")
    same = F.lit(True)
    for c in value_cols:
        same = same & F.col(c).eqNullSafe(F.col(_old(c)))
    status = (F.when(F.col(_IN_OLD).isNull(), F.lit("I"))
              .when(F.col(_IN_NEW).isNull(), F.lit("D"))
              .when(same, F.lit("S")).otherwise(F.lit("U")))
    keys = [F.coalesce(F.col(k), F.col(_old(k))).alias(k) for k in key_cols]
    return j.select(*keys, *value_cols, status.alias(_STATUS),
                    F.coalesce(F.col(_DUPS), F.lit(0)).alias(_DUPS))


def _old(column: str) -> str:
    """The name of an old-content column in :func:`diff_rows`' join."""
    return f"__old_{column}"


def _last_commit(spark: SparkSession, path: str) -> Tuple[int, Dict[str, str]]:
    """(version, operationMetrics) of the latest commit: one log read gives both."""
    from delta.tables import DeltaTable

    row = DeltaTable.forPath(spark, path).history(1).select("version", "operationMetrics").first()
    return int(row["version"]), dict(row["operationMetrics"] or {})


def _metric(metrics: Dict[str, str], *names: str) -> int:
    return sum(int(metrics.get(n, 0) or 0) for n in names)


class DuplicateKeyError(RuntimeError):
    """A derived table holds a key more than once: no run of this code writes that, so it came
    from overlapping runs of an older version or from a writer outside the pipeline."""

    def __init__(self, table: str, path: str, key_cols: Sequence[str], n_keys: int,
                 examples: List[Dict[str, object]], repair: str):
        self.table, self.path, self.key_cols, self.n_keys = table, path, list(key_cols), n_keys
        self.examples = examples
        shown = "; ".join(", ".join(f"{k}={v}" for k, v in e.items()) for e in examples)
        super().__init__(
            f"{table} ({path}): {n_keys} key(s) of ({', '.join(key_cols)}) occur more than once, "
            f"e.g. {shown}. Rows like these come from overlapping runs of an older version or "
            f"from a writer outside the pipeline; this run wrote nothing to {table}. Repair: "
            f"{repair} - it deletes every row of the duplicated keys in one commit and recomputes "
            f"them from the inputs in the same run")


class ConcurrentWriteError(RuntimeError):
    """Another writer kept changing a table while this run synchronised it."""


@dataclass(frozen=True)
class KnownRows:
    """The rows a table held within a sync's `scope` at `version`, which the caller has already
    read (the incremental build reads the touched users' clean events to validate the increment
    against them). A sync whose table is still at `version` diffs against these rather than
    scanning the table a second time (a scan whose cost grows with the lake, not the increment);
    at any other version (another writer, maintenance, or a retry after a conflict) it reads the
    table as usual.

    `added`: the rows the new content adds to `rows`, when the caller knows them: the new content
    is exactly `rows` plus `added`, and no key of `added` is repeated or among `rows` (the
    incremental build's events: validation marks every copy of an earlier or repeated event a
    duplicate_event). The sync then inserts `added` without diffing the new content against
    `rows`, a join whose cost follows the touched users' whole history rather than the day's
    events; a violated promise raises after the insert, saying how many rows were already
    present."""

    version: int
    rows: DataFrame
    added: Optional[DataFrame] = None


# Optimistic concurrency: a write whose snapshot went stale (another commit landed between the
# read and the write, or around it) is diffed again against the newest version.
SYNC_ATTEMPTS = 4
REPAIR_HINT = "rerun the job that writes it with --repair-duplicates"


def delta_conflicts() -> tuple:
    """Delta's commit-conflict exceptions (the python classes share no common base)."""
    from delta import exceptions as E

    return (E.DeltaConcurrentModificationException, E.ConcurrentWriteException,
            E.MetadataChangedException, E.ProtocolChangedException, E.ConcurrentAppendException,
            E.ConcurrentDeleteReadException, E.ConcurrentDeleteDeleteException,
            E.ConcurrentTransactionException)


class _StaleRead(Exception):
    """The table moved past the version this attempt read, before it wrote."""


def duplicate_keys(df: DataFrame, key_cols: Sequence[str]) -> DataFrame:
    """Keys of `df` that occur more than once, with their row count (null-safe: a null is a key)."""
    return df.groupBy(*key_cols).agg(F.count(F.lit(1)).alias(_DUPS)).where(F.col(_DUPS) > 1)


def delete_keys(spark: SparkSession, path: str, keys: DataFrame, key_cols: Sequence[str]) -> None:
    """Delete every row whose key is in `keys`: one MERGE (conflict-checked like every write)."""
    from delta.tables import DeltaTable

    (DeltaTable.forPath(spark, path).alias("t")
     .merge(keys.select(*key_cols).distinct().alias("s"), _null_safe_match(key_cols))
     .whenMatchedDelete().execute())


def check_duplicates(spark: SparkSession, table: str, path: str, df: DataFrame,
                     key_cols: Sequence[str], repair: bool, repair_hint: str = REPAIR_HINT,
                     fence: Optional[Callable[[], None]] = None) -> int:
    """Raise DuplicateKeyError if `df` (a snapshot of the table at `path`) repeats a key, or with
    `repair` delete every row of those keys (the caller then recomputes them). Returns the
    number of keys deleted."""
    dups = duplicate_keys(df, key_cols).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        examples = dups.orderBy(*key_cols).limit(3).collect()
        if not examples:
            return 0
        n_keys = dups.count()
        if not repair:
            raise DuplicateKeyError(table, path, key_cols, n_keys,
                                    [{**{k: r[k] for k in key_cols}, "rows": r[_DUPS]}
                                     for r in examples],
                                    repair_hint)
        if fence is not None:
            fence()
        delete_keys(spark, path, dups, key_cols)
        print(f"{table}: repaired {n_keys} duplicated key(s) of ({', '.join(key_cols)}): their "
              f"rows were deleted and are recomputed by this run", flush=True)
        return n_keys
    finally:
        dups.unpersist()


def sync_table(spark: SparkSession, df: DataFrame, path: str, table: str,
               schema: T.StructType, key_cols: Sequence[str],
               properties: Optional[Dict[str, str]] = None,
               partition_by: Sequence[str] = (), fence: Optional[Callable[[], None]] = None,
               repair_duplicates: bool = False, repair_hint: str = REPAIR_HINT,
               scope: Optional[DataFrame] = None,
               check_table_duplicates: bool = True,
               known: Optional[KnownRows] = None) -> WriteResult:
    """Make the Delta table at `path` hold exactly the rows of `df`, with at most one commit.

    `scope` (a DataFrame of distinct values of some key columns, e.g. the user ids an
    incremental build recomputed): only the table's rows matching it are compared with `df`
    (which must hold only such rows), so rows outside it are neither read into the diff nor
    deleted, updated or rewritten, and the duplicate check covers the scope only.
    ``check_table_duplicates=False`` skips the check of the table's own keys (the new content's
    keys are still checked): for a caller that has verified that every commit since a checked
    state was one of this function's keyed MERGEs, which cannot repeat a key (the incremental
    build, ``pipelines.build_progress``). `known`: the table's rows within `scope` as the caller
    read them (:class:`KnownRows`), used while the table is still at that version.

    `key_cols` must identify a row uniquely in `df` (checked) and in the table (checked:
    DuplicateKeyError, or with `repair_duplicates` the duplicated keys are deleted and rewritten):
    a changed row is an update of its key, a key that disappeared is deleted, a new key is
    inserted, identical rows are left alone. Rows are compared column by column (arrays by value),
    so identical content is a no-op.

    Concurrency: every write is a MERGE keyed on `key_cols` (never a blind append, which Delta
    does not conflict-check), so a second writer can neither duplicate a row nor commit over a
    conflicting one. A write that meets another writer's commit (a Delta conflict, or a newer
    version than the one it diffed against) is diffed again against the newest version, so the
    table ends holding exactly `df`; after SYNC_ATTEMPTS contested attempts ConcurrentWriteError.
    `fence` is called right before each commit of rows (the lake lease's check); the ALTERs that
    bring an older table up to its contract (a missing nullable column, a missing property such as
    deletion vectors) change no row and commit without it, once per table.
    """
    df = conform(df, schema, for_merge=True)
    properties = {**KEYED_PROPERTIES, **(properties or {})}
    committed: Optional[WriteResult] = None
    last: Optional[BaseException] = None
    for _ in range(SYNC_ATTEMPTS):
        try:
            result, read_version = _sync_once(spark, df, path, table, schema, key_cols, properties,
                                              partition_by, fence, repair_duplicates, repair_hint,
                                              scope, check_table_duplicates, known)
        except (_StaleRead, *delta_conflicts()) as err:
            last = err
            continue
        if not result.changed:  # a repeat after our own commit finds nothing left to do
            return replace(committed, version=result.version) if committed else result
        committed = result
        if result.version == read_version + 1:
            return result  # nobody committed between our read and our write
        last = None  # another commit landed around ours: diff again to be sure of the content
    raise ConcurrentWriteError(
        f"{table} ({path}): another writer changed it during each of {SYNC_ATTEMPTS} attempts to "
        f"synchronise it ({type(last).__name__ if last else 'commits around ours'}); this run "
        f"stopped. Every attempt was one atomic commit or none: the table holds a complete "
        f"version, no mix. Run the job again when the other writer has finished")


def _sync_once(spark: SparkSession, df: DataFrame, path: str, table: str, schema: T.StructType,
               key_cols: Sequence[str], properties: Optional[Dict[str, str]],
               partition_by: Sequence[str], fence: Optional[Callable[[], None]],
               repair_duplicates: bool, repair_hint: str,
               scope: Optional[DataFrame] = None,
               check_table_duplicates: bool = True,
               known: Optional[KnownRows] = None) -> Tuple[WriteResult, int]:
    """One diff + at most one commit. Returns (result, version the diff was made against; 0
    for a table this attempt created, whose insert is then version 1 if nobody interfered)."""
    cols = [f.name for f in schema.fields]
    if not table_exists(spark, path):
        _check_unique(df, key_cols, table)
        if fence is not None:
            fence()
        ensure_table(spark, path, schema, properties, partition_by)
        insert_new_keys(spark, path, key_cols, df, prune=False)  # empty: no file to skip
        version, metrics = _last_commit(spark, path)
        return (WriteResult(table, path, version, True, operation="create",
                            inserted=_metric(metrics, "numTargetRowsInserted")), 0)

    evolve_schema(spark, path, table, schema)
    ensure_properties(spark, path, properties)
    version = table_version(spark, path)
    old = _scoped_rows(spark, path, version, scope, known)
    if check_table_duplicates and check_duplicates(spark, table, path, old, key_cols,
                                                   repair_duplicates, repair_hint, fence):
        raise _StaleRead()  # the repair committed: diff again against the repaired table
    if known is not None and known.version == version and known.added is not None:
        added = conform(known.added, schema, for_merge=True)
        return _insert_added(spark, path, table, key_cols, added, version, fence), version
    # Keep changed rows, and unchanged ones whose key is repeated (to fail on them below).
    changed = (diff_rows(df, old, key_cols)
               .where((F.col(_STATUS) != "S") | (F.col(_DUPS) > 1))
               .persist(StorageLevel.MEMORY_AND_DISK))
    try:
        stats = {r[_STATUS]: (int(r["n"]), int(r["dups"])) for r in
                 changed.groupBy(_STATUS).agg(F.count(F.lit(1)).alias("n"),
                                              F.max(_DUPS).alias("dups")).collect()}
        if any(d > 1 for _, d in stats.values()):
            raise ValueError(f"{table}: key {list(key_cols)} is not unique in the new content")
        if not stats:
            return WriteResult(table, path, version, False, operation="noop"), version
        n_ins, n_del, n_upd = (stats.get(s, (0, 0))[0] for s in ("I", "D", "U"))
        if fence is not None:
            fence()
        if table_version(spark, path) != version:
            raise _StaleRead()
        if n_del == 0 and n_upd == 0:
            insert_new_keys(spark, path, key_cols, changed.select(*cols))
            op = "insert"
        else:
            _merge_changes(spark, path, schema, key_cols, changed)
            op = "merge"
    finally:
        changed.unpersist()
    after = table_version(spark, path)
    return (WriteResult(table, path, after, True, inserted=n_ins, deleted=n_del, updated=n_upd,
                        operation=op), version)


def _insert_added(spark: SparkSession, path: str, table: str, key_cols: Sequence[str],
                  added: DataFrame, version: int,
                  fence: Optional[Callable[[], None]]) -> WriteResult:
    """The sync of a known change (:class:`KnownRows` ``added``): its rows inserted by one
    keyed insert-only MERGE, or nothing for none. Their keys are checked unique among
    themselves; that none is already in the table is the caller's promise, checked by the
    MERGE's own count of inserted rows (a key present is not inserted again)."""
    added = added.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        n = added.count()
        if n == 0:
            return WriteResult(table, path, version, False, operation="noop")
        _check_unique(added, key_cols, table)
        if fence is not None:
            fence()
        if table_version(spark, path) != version:
            raise _StaleRead()
        insert_new_keys(spark, path, key_cols, added)
    finally:
        added.unpersist()
    after, metrics = _last_commit(spark, path)
    inserted = _metric(metrics, "numTargetRowsInserted")
    if after == version + 1 and inserted != n:
        raise ValueError(f"{table} ({path}): {n - inserted} of the {n} rows the caller gave as "
                         f"new were already in the table at version {version}; the other "
                         f"{inserted} were inserted (v{after}). The caller's KnownRows.added is "
                         f"wrong: build the new content without it to diff it instead")
    return WriteResult(table, path, after, True, inserted=inserted, operation="insert")


def _scoped_rows(spark: SparkSession, path: str, version: int, scope: Optional[DataFrame],
                 known: Optional[KnownRows]) -> DataFrame:
    """The table's rows at `version` within `scope` (all rows without one): `known`'s when it
    was read at that version, else read."""
    if known is not None and known.version == version:
        return known.rows
    old = read_table(spark, path, version)
    return old if scope is None else old.join(scope, scope.columns, "left_semi")


def ensure_table(spark: SparkSession, path: str, schema: T.StructType,
                 properties: Optional[Dict[str, str]] = None, partition_by: Sequence[str] = ()) -> None:
    """create_table, where losing a creation race to a concurrent creator is not an error."""
    try:
        create_table(spark, path, schema, properties, partition_by)
    except delta_conflicts():
        if not table_exists(spark, path):
            raise


def insert_new_keys(spark: SparkSession, path: str, key_cols: Sequence[str],
                    rows: DataFrame, prune: bool = True) -> None:
    """Insert-only MERGE keyed on `key_cols`: a key the table already has is not inserted again.
    ``prune``: add the rows' key ranges (:func:`key_ranges`, one aggregation over `rows`); off
    for a table just created, which has no file to skip, where `rows` may be a whole build's
    output that the aggregation would compute once more.

    Why not ``mode("append")``: an append is a blind write that Delta never conflict-checks, so two
    runs that both computed the same new rows would both add them (the duplicated events and
    examples of overlapping builds). The MERGE reads the table, so a concurrent writer's commit
    is a conflict, and a replay after one finds the keys present.
    """
    from delta.tables import DeltaTable

    condition = F.expr(_null_safe_match(key_cols))
    for bound in key_ranges(rows, key_cols) if prune else ():
        condition = condition & bound
    (DeltaTable.forPath(spark, path).alias("t")
     .merge(rows.alias("s"), condition)
     .whenNotMatchedInsertAll().execute())


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_RANGE_TYPES = (T.NumericType, T.StringType, T.DateType, T.TimestampType, T.TimestampNTZType)


def key_ranges(rows: DataFrame, key_cols: Sequence[str], target: str = "t") -> List[Column]:
    """``target.k BETWEEN min(k) AND max(k)`` over ``rows``, for each key column of an ordered
    type that is never null in ``rows``: conditions a keyed MERGE can add without changing what
    matches (a target row equal to a source row on every key lies in the source's ranges).

    Why: Delta prunes the files whose column statistics fall outside such target-only
    conditions. The events a day adds are newer than every file already in ``events``, so the
    insert of a day's events reads the day's files instead of the whole table (on a 1M-user lake
    the insert-only MERGE of 17k new events took 16.5 s, 2.9 s on a 100k-user one;
    benchmarks/refresh.py). A column with a null in ``rows`` gets no range: a null key matches
    a null key (``<=>``), which no BETWEEN admits. One aggregation over ``rows``. Timestamps
    travel as epoch microseconds and come back as aware UTC datetimes: pyspark hands a collected
    TimestampType value over as a naive local time, which is ambiguous in a DST fall-back hour.
    """
    types = {f.name: f.dataType for f in rows.schema.fields}
    ordered = [k for k in key_cols if isinstance(types[k], _RANGE_TYPES)]
    if not ordered:
        return []

    def exact(agg: Column, k: str) -> Column:
        return F.unix_micros(agg) if isinstance(types[k], T.TimestampType) else agg

    stats = rows.agg(*[a for k in ordered for a in (
        exact(F.min(k), k).alias(f"lo_{k}"), exact(F.max(k), k).alias(f"hi_{k}"),
        F.count(F.when(F.col(k).isNull(), 1)).alias(f"nulls_{k}"))]).first()

    def value(k: str, side: str) -> object:
        v = stats[f"{side}_{k}"]
        return _EPOCH + timedelta(microseconds=v) if isinstance(types[k], T.TimestampType) else v

    return [F.col(f"{target}.`{k}`").between(F.lit(value(k, "lo")), F.lit(value(k, "hi")))
            for k in ordered if stats[f"nulls_{k}"] == 0 and stats[f"lo_{k}"] is not None]


def _check_unique(df: DataFrame, key_cols: Sequence[str], table: str) -> None:
    dup = df.groupBy(*key_cols).count().where(F.col("count") > 1).limit(1).collect()
    if dup:
        raise ValueError(f"{table}: key {list(key_cols)} is not unique, e.g. {dup[0].asDict()}")


def _merge_changes(spark: SparkSession, path: str, schema: T.StructType,
                   key_cols: Sequence[str], changed: DataFrame) -> None:
    """The diff's changed keys as one tagged MERGE: vanished keys deleted, the others upserted."""
    cols = [f.name for f in schema.fields]
    staged = changed.withColumn(MERGE_TAG, F.when(F.col(_STATUS) == "D", F.lit(TAG_DELETE))
                                .otherwise(F.lit(TAG_UPSERT))).select(*cols, MERGE_TAG)
    merge_tagged(spark, path, schema, key_cols, staged)


def merge_tagged(spark: SparkSession, path: str, schema: T.StructType, key_cols: Sequence[str],
                 staged: DataFrame) -> None:
    """One MERGE keyed on `key_cols` (null-safe) from `staged`: the schema's columns plus
    ``MERGE_TAG``. A row tagged ``TAG_UPSERT`` updates its key's row or inserts it; a row tagged
    ``TAG_DELETE`` deletes its key's row (its other columns are not read).

    Why one function: every keyed write that removes rows as well as adding them (a table
    synchronised with new content, the states batch inference re-encodes or orphans) is this
    one commit, so deletes and upserts land atomically together and Delta conflict-checks the
    whole write. The caller owns the concurrency policy (``sync_table`` diffs again on a
    conflict; batch inference refuses to write over a moved table). `staged` must hold each key
    at most once (Delta refuses a MERGE in which two source rows match one target row).
    """
    from delta.tables import DeltaTable

    cols = [f.name for f in schema.fields]
    value_cols = [c for c in cols if c not in key_cols]
    upsert, delete = (f"s.{MERGE_TAG} = '{tag}'" for tag in (TAG_UPSERT, TAG_DELETE))
    target = DeltaTable.forPath(spark, path).alias("t")
    merge = target.merge(staged.alias("s"), _null_safe_match(key_cols))
    merge = merge.whenMatchedDelete(condition=delete)
    if value_cols:
        merge = merge.whenMatchedUpdate(condition=upsert, set={c: f"s.`{c}`" for c in value_cols})
    merge = merge.whenNotMatchedInsert(condition=upsert, values={c: f"s.`{c}`" for c in cols})
    merge.execute()


# --------------------------------------------------------------------------------------
# Quarantine: a multiset per source table, replaced only when it changed
# --------------------------------------------------------------------------------------
QUARANTINE_PARTITION = (C.SOURCE_TABLE,)


def sync_quarantine(spark: SparkSession, rows: DataFrame, lake: str,
                    source_tables: Sequence[str], now: datetime,
                    fence: Optional[Callable[[], None]] = None) -> WriteResult:
    """Make quarantine's partitions of `source_tables` hold exactly `rows`.

    `rows` has (row_json, source_table, reason), all with source_table in `source_tables`.
    Why a multiset replace and not a MERGE: two identical bad input rows are two quarantine rows
    (the counts must reconcile with the input), so rows have no unique key. Each validation run
    sees the whole raw tables, so the partitions of its sources are a pure function of the input:
    rows already quarantined keep their original `ingested_at` (matched by (source, reason,
    row_json, occurrence number)), new ones get `now`, and if the multiset is unchanged nothing is
    written. One diff, at most one commit, for all sources together.

    Concurrency as in ``sync_table``: the replaceWhere overwrite reads the partitions it replaces
    (Delta conflict-checks it), a stale snapshot is diffed again, ``fence`` runs before the commit.
    """
    if not source_tables:
        raise ValueError("source_tables is empty")
    committed: Optional[WriteResult] = None
    last: Optional[BaseException] = None
    for _ in range(SYNC_ATTEMPTS):
        try:
            result, read_version = _sync_quarantine_once(spark, rows, lake, source_tables, now, fence)
        except (_StaleRead, *delta_conflicts()) as err:
            last = err
            continue
        if not result.changed:
            return replace(committed, version=result.version) if committed else result
        committed = result
        if result.version == read_version + 1:
            return result
        last = None
    raise ConcurrentWriteError(
        f"{C.T_QUARANTINE}: another writer changed it during each of {SYNC_ATTEMPTS} attempts "
        f"({type(last).__name__ if last else 'commits around ours'}); this run stopped. Run the "
        f"job again when the other writer has finished")


def _sync_quarantine_once(spark: SparkSession, rows: DataFrame, lake: str,
                          source_tables: Sequence[str], now: datetime,
                          fence: Optional[Callable[[], None]]) -> Tuple[WriteResult, int]:
    """One diff + at most one commit of quarantine (see sync_quarantine)."""
    path = C.LakePaths(lake).table(C.T_QUARANTINE)
    schema = C.spark_schema(C.T_QUARANTINE)
    ensure_table(spark, path, schema, None, QUARANTINE_PARTITION)
    version = table_version(spark, path)
    existing = (read_table(spark, path, version)
                .where(F.col(C.SOURCE_TABLE).isin(*source_tables))
                .select(C.ROW_JSON, C.SOURCE_TABLE, C.REASON, C.INGESTED_AT))
    group = [C.SOURCE_TABLE, C.REASON, C.ROW_JSON]
    keys = [*group, _OCC]
    new = (rows.select(C.ROW_JSON, C.SOURCE_TABLE, C.REASON)
           .withColumn(_OCC, F.row_number().over(Window.partitionBy(*group).orderBy(C.ROW_JSON))))
    old = existing.withColumn(
        _OCC, F.row_number().over(Window.partitionBy(*group).orderBy(C.INGESTED_AT)))
    joined = (new.withColumn(_IN_NEW, F.lit(True)).join(old, keys, "full_outer")
              .persist(StorageLevel.MEMORY_AND_DISK))
    try:
        counts = joined.agg(
            F.count(F.when(F.col(C.INGESTED_AT).isNull(), 1)).alias("new_only"),
            F.count(F.when(F.col(_IN_NEW).isNull(), 1)).alias("old_only"),
            F.count(F.when(~F.col(C.SOURCE_TABLE).isin(*source_tables), 1)).alias("foreign"),
        ).first()
        if counts["foreign"]:
            raise ValueError(f"quarantine rows from sources outside {list(source_tables)}")
        n_new_only, n_old_only = int(counts["new_only"]), int(counts["old_only"])
        if n_new_only == 0 and n_old_only == 0:
            return WriteResult(C.T_QUARANTINE, path, version, False, operation="noop"), version
        final = joined.where(F.col(_IN_NEW)).select(
            C.ROW_JSON, C.SOURCE_TABLE, C.REASON,
            F.coalesce(F.col(C.INGESTED_AT), ts_literal(now)).alias(C.INGESTED_AT))
        sources = ", ".join(f"'{t}'" for t in source_tables)
        if fence is not None:
            fence()
        if table_version(spark, path) != version:
            raise _StaleRead()
        (conform(final, schema).write.format("delta").mode("overwrite")
         .option("replaceWhere", f"{C.SOURCE_TABLE} IN ({sources})").save(path))
    finally:
        joined.unpersist()
    return (WriteResult(C.T_QUARANTINE, path, table_version(spark, path), True,
                        inserted=n_new_only, deleted=n_old_only, operation="replace"), version)


def _epoch_micros(ts: datetime) -> int:
    """Epoch microseconds of an aware datetime (naive ones are ambiguous: refuse them)."""
    if ts.tzinfo is None:
        raise ValueError(f"timestamp {ts!r} must be timezone-aware (e.g. datetime.now(timezone.utc))")
    return int(round(ts.timestamp() * 1_000_000))


def ts_literal(ts: datetime) -> Column:
    """A Spark timestamp literal for an aware datetime, independent of the session time zone."""
    return F.timestamp_micros(F.lit(_epoch_micros(ts)))


# --------------------------------------------------------------------------------------
# One-row records under <lake>/_meta (build configuration, build progress, coverage, cutoffs)
# --------------------------------------------------------------------------------------
def load_record(spark: SparkSession, path: str) -> Optional[Row]:
    """The row of the one-row Delta table at `path`; None when there is no table (a lake written
    before the record existed) or no row."""
    if not table_exists(spark, path):
        return None
    return read_table(spark, path).first()


def store_json_record(spark: SparkSession, path: str, column: str, text: str,
                      now: datetime) -> None:
    """Replace the one-row table at `path` by (`column` = text, updated_at = now): one
    overwrite commit, so a reader sees the old record or the new one, never none."""
    schema = T.StructType([T.StructField(column, T.StringType(), False),
                           T.StructField(C.UPDATED_AT, T.TimestampType(), False)])
    df = spark.createDataFrame([(text, now)], schema)
    (df.coalesce(1).write.format("delta").mode("overwrite").option("overwriteSchema", "true")
     .save(path))


def print_results(results: List[WriteResult]) -> None:
    print("table            version   op        +ins -del ~upd")
    for r in results:
        print(r.line())
