"""Batch inference, driver side: the encoder's last hidden state per user -> ``user_states``.

The offline half of the hybrid user tower (seed 003): the encoder runs in Spark over
``user_sequences`` and its output is MERGEd into ``user_states`` (then snapshotted for Feast by
pipelines/feast_ops.py). This module decides which users to encode, runs the encoder through
``mapInArrow`` and writes the states with ``pipelines.delta_io.merge_tagged``; what runs in the
Spark Python workers (bundle loading, Arrow batches -> tensors -> states) is
``pipelines.inference_worker``, the only torch code of pipelines/. The command line is
``main`` at the end of this module (jobs/batch_inference.py).

Incremental: a user is (re-)encoded only if it has no state, its state's ``sequence_hash``
differs from the current history's, or its state was written by another ``model_version`` (a
new model invalidates every cached state: seed 003 "version skew"). States of users that are no
longer in ``user_sequences`` are deleted in the same MERGE (never served from a vanished
history). Nothing to do -> no Delta commit at all.

Which users are looked at follows the change feed of ``user_sequences`` (its Delta change data
feed is on, pipelines/build.py): each successful run records in ``<lake>/_meta/inference_progress``
the user_sequences version it consumed, its model_version and the user_states version it left,
after its MERGE (a crash in between leaves the old record, whose user_states version no longer
matches: the next run redoes the work, it never skips any). The next run with the same model
reads only the changes since that version: the users with a new post-image are classified
against their own states (a semi-join, not a join of all sequences with all states), users
whose last change is a delete lose their state. When user_sequences has not moved the run reads
two Delta versions and the record, and commits nothing. A full classification (every sequence
against every state, as on the first run) is done, with its reason printed on one line, when no
progress is recorded, the model changed, user_states moved since the record, either table was
deleted and created again (its Delta table id is recorded too), user_sequences was
overwritten/replaced/restored in the range, its change feed is unavailable for the range
(vacuumed, or enabled after the consumed version), with ``repair_duplicates`` or with ``full``.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Dict, Optional, Sequence, Tuple

import pyarrow as pa

import ctt_contracts as C
from ctt_contracts.flags import bundle_field, dataclass_parser, flag_field, from_args, lake_field
from ctt_contracts.process import entry_point
from models.lake_read import read_arrow
from pipelines import lease
from pipelines.inference_worker import DEFAULT_BATCH_SIZE, make_encoder

# Columns local to this module's staging (never stored: not contract names).
_REASON = "__reason"  # why a user is (re-)encoded
_STATE_HASH, _STATE_VERSION = "__state_hash", "__state_version"
REASON_NEW, REASON_CHANGED, REASON_MODEL = "new_user", "sequence_changed", "model_version_changed"
REASON_ORPHAN, REASON_SAME = "orphan_state", "up_to_date"
TO_ENCODE = (REASON_NEW, REASON_CHANGED, REASON_MODEL)
MODE_FULL, MODE_INCREMENTAL = "full", "incremental"
_DELETED = "__deleted"  # a touched user whose newest change removed its row
# user_sequences operations after which its change feed is not a diff worth following (the
# whole table rewritten, or moved to another version): the next run classifies everyone.
_REWRITE_OPERATIONS = ("RESTORE", "TRUNCATE")
_OVERWRITE_MODE = "Overwrite"
# how a change feed read says its files are gone (vacuumed): the read fails in a task
_MISSING_FILE_MARKERS = ("FILE_NOT_EXIST", "FileNotFoundException", "DELTA_CHANGE_DATA_FILE_NOT_FOUND")


# --------------------------------------------------------------------------------------
# Spark transforms (DataFrame -> DataFrame)
# --------------------------------------------------------------------------------------
def latest_sequences(user_sequences):  # DataFrame -> DataFrame
    """One row per user: the newest ``as_of_ts`` (ties broken by hash, deterministically).

    user_sequences is one row per user by contract; this makes batch inference correct even if
    an upstream rerun left an older row behind.
    """
    from pyspark.sql import functions as F
    from pyspark.sql.window import Window

    w = Window.partitionBy(C.USER_ID).orderBy(F.col(C.AS_OF_TS).desc(), F.col(C.SEQUENCE_HASH).desc())
    return (user_sequences.withColumn("__rn", F.row_number().over(w)).where(F.col("__rn") == 1)
            .select(C.USER_ID, C.ITEM_IDS, C.EVENT_TS, C.SEQUENCE_HASH))


def read_changes(spark, path: str, start: int, end: int):  # -> DataFrame
    """The change data feed of the Delta table at ``path``, versions ``start..end`` inclusive."""
    return (spark.read.format("delta").option("readChangeFeed", "true")
            .option("startingVersion", start).option("endingVersion", end).load(path))


def latest_changes(changes):  # DataFrame -> DataFrame
    """user_sequences change feed rows -> one row per touched user: its newest row image
    (``item_ids``, ``event_ts``, ``sequence_hash``) and ``__deleted`` when its newest change
    removed its row.

    Newest = highest commit version; within one commit a post-image (insert or update) wins
    over a delete (a commit that rewrites a row removes the old copy and adds the new one, it
    never adds then removes the same row), then as_of_ts and hash as in ``latest_sequences``.
    Update pre-images are the state before a change: never the current history.
    """
    from pyspark.sql import functions as F
    from pyspark.sql.window import Window

    rows = (changes.where(F.col(C.CDF_TYPE) != C.CDF_PREIMAGE)
            .withColumn(_DELETED, F.col(C.CDF_TYPE) == C.CDF_DELETE))
    w = Window.partitionBy(C.USER_ID).orderBy(F.col(C.CDF_VERSION).desc(), F.col(_DELETED).asc(),
                                              F.col(C.AS_OF_TS).desc(), F.col(C.SEQUENCE_HASH).desc())
    return (rows.withColumn("__rn", F.row_number().over(w)).where(F.col("__rn") == 1)
            .select(C.USER_ID, C.ITEM_IDS, C.EVENT_TS, C.SEQUENCE_HASH, _DELETED))


def classify_users(sequences, states, model_version: str):  # (DataFrame, DataFrame|None) -> DataFrame
    """Every user of ``sequences`` or ``states`` with a ``__reason``: new_user, sequence_changed,
    model_version_changed (to encode), orphan_state (state without a history: to delete) or
    up_to_date. One full outer join, so one pass answers every count the job prints."""
    from pyspark.sql import functions as F

    if states is None:
        return sequences.withColumn(_REASON, F.lit(REASON_NEW))
    prev = states.select(C.USER_ID, F.col(C.SEQUENCE_HASH).alias(_STATE_HASH),
                         F.col(C.MODEL_VERSION).alias(_STATE_VERSION))
    joined = sequences.join(prev, C.USER_ID, "full_outer")
    reason = (F.when(F.col(C.SEQUENCE_HASH).isNull(), F.lit(REASON_ORPHAN))
              .when(F.col(_STATE_HASH).isNull(), F.lit(REASON_NEW))
              .when(F.col(_STATE_VERSION) != F.lit(model_version), F.lit(REASON_MODEL))
              .when(F.col(_STATE_HASH) != F.col(C.SEQUENCE_HASH), F.lit(REASON_CHANGED))
              .otherwise(F.lit(REASON_SAME)))
    return joined.withColumn(_REASON, reason).select(*sequences.columns, _REASON)


def encode_states(todo, bundle_path: str, model_version: str, state_ts: datetime,
                  batch_size: int = DEFAULT_BATCH_SIZE):  # DataFrame -> DataFrame
    """Run the encoder on ``todo`` rows -> user_states rows (contract columns and types)."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    from pipelines.delta_io import ts_literal

    out_schema = T.StructType([
        T.StructField(C.USER_ID, T.LongType(), False),
        T.StructField(C.HIDDEN_STATE, T.ArrayType(T.FloatType(), False), False),
        T.StructField(C.SEQUENCE_HASH, T.StringType(), False)])
    encoded = todo.select(C.USER_ID, C.ITEM_IDS, C.EVENT_TS, C.SEQUENCE_HASH).mapInArrow(
        make_encoder(str(bundle_path), model_version, batch_size), out_schema)
    return encoded.select(C.USER_ID, C.HIDDEN_STATE, F.lit(model_version).alias(C.MODEL_VERSION),
                          ts_literal(state_ts).alias(C.STATE_TS), C.SEQUENCE_HASH)


# --------------------------------------------------------------------------------------
# Progress: what the last successful run consumed (<lake>/_meta/inference_progress, delta-rs)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TableAt:
    """A Delta table's version and its id (the id changes when the table is deleted and
    created again, the version numbering then restarts)."""

    version: int
    table_id: str


@dataclass(frozen=True)
class Progress:
    """The user_sequences version a run consumed, with which model, the user_states version
    it left (its MERGE's, or the one it found when it had nothing to write) and how many users
    that version holds (one state per user of user_sequences after a successful run)."""

    sequences: TableAt
    model_version: str
    states: TableAt
    users: int


def progress_path(lake: str) -> str:
    return C.LakePaths(lake).meta(C.META_INFERENCE_PROGRESS)


def _progress_schema():  # -> pyarrow.Schema
    return pa.schema([pa.field(C.SEQUENCES_VERSION, pa.int64(), False),
                      pa.field(C.SEQUENCES_TABLE_ID, pa.string(), False),
                      pa.field(C.MODEL_VERSION, pa.string(), False),
                      pa.field(C.STATES_VERSION, pa.int64(), False),
                      pa.field(C.STATES_TABLE_ID, pa.string(), False),
                      pa.field(C.USERS_COUNT, pa.int64(), False),
                      pa.field(C.UPDATED_AT, pa.timestamp("us", tz="UTC"), False)])


def load_progress(lake: str) -> Optional[Progress]:
    """The recorded progress; None when nothing (or not exactly one row) is recorded.

    Read with delta-rs like the lease (milliseconds, no Spark job): a run with nothing new must
    cost a version check, not a Spark read.
    """
    from deltalake import DeltaTable

    path = progress_path(lake)
    if not DeltaTable.is_deltatable(path):
        return None
    rows = read_arrow(path)[0].to_pylist()
    if len(rows) != 1:
        return None
    r = rows[0]
    return Progress(TableAt(int(r[C.SEQUENCES_VERSION]), r[C.SEQUENCES_TABLE_ID]),
                    r[C.MODEL_VERSION], TableAt(int(r[C.STATES_VERSION]), r[C.STATES_TABLE_ID]),
                    int(r[C.USERS_COUNT]))


def store_progress(lake: str, progress: Progress) -> None:
    """Replace the record (one atomic overwrite commit of a one-row table)."""
    from deltalake import write_deltalake

    row = {C.SEQUENCES_VERSION: progress.sequences.version,
           C.SEQUENCES_TABLE_ID: progress.sequences.table_id,
           C.MODEL_VERSION: progress.model_version,
           C.STATES_VERSION: progress.states.version, C.STATES_TABLE_ID: progress.states.table_id,
           C.USERS_COUNT: progress.users, C.UPDATED_AT: datetime.now(timezone.utc)}
    write_deltalake(progress_path(lake), pa.Table.from_pylist([row], schema=_progress_schema()),
                    mode="overwrite")


def table_at(spark, path: str) -> TableAt:
    """Version and id of the Delta table at ``path``: two reads of its log, no data."""
    from delta.tables import DeltaTable

    table = DeltaTable.forPath(spark, path)
    return TableAt(int(table.history(1).select("version").first()[0]),
                   table.detail().select("id").first()[0])


# --------------------------------------------------------------------------------------
# Which mode a run takes (pure)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    mode: str  # MODE_FULL or MODE_INCREMENTAL
    reason: str  # one line: why this mode
    changes_from: Optional[int] = None  # incremental: first user_sequences version to read


def plan_run(progress: Optional[Progress], model_version: str, sequences: TableAt,
             states: Optional[TableAt], full: bool = False,
             repair_duplicates: bool = False) -> Plan:
    """Full classification or the change feed since the consumed version (module docstring)."""
    if full:
        return Plan(MODE_FULL, "full classification requested (--full)")
    if repair_duplicates:
        return Plan(MODE_FULL, "--repair-duplicates checks every state")
    if progress is None:
        return Plan(MODE_FULL, f"no progress recorded in {C.META_DIR}/{C.META_INFERENCE_PROGRESS}")
    if states is None:
        return Plan(MODE_FULL, f"no {C.T_USER_STATES} table")
    if progress.model_version != model_version:
        return Plan(MODE_FULL, f"model_version changed from {progress.model_version!r} to "
                               f"{model_version!r}: every user is re-encoded")
    for name, now, then in ((C.T_USER_SEQUENCES, sequences, progress.sequences),
                            (C.T_USER_STATES, states, progress.states)):
        if now.table_id != then.table_id:
            return Plan(MODE_FULL, f"{name} was created again since the recorded progress "
                                   f"(table id {then.table_id} -> {now.table_id})")
    if states.version != progress.states.version:
        return Plan(MODE_FULL, f"{C.T_USER_STATES} is at v{states.version} but the recorded "
                               f"progress left it at v{progress.states.version} (another writer, "
                               f"or a run stopped between its MERGE and recording its progress)")
    consumed = progress.sequences.version
    if sequences.version < consumed:
        return Plan(MODE_FULL, f"{C.T_USER_SEQUENCES} is at v{sequences.version}, before the "
                               f"consumed v{consumed}")
    start = consumed + 1
    if start > sequences.version:
        return Plan(MODE_INCREMENTAL, f"{C.T_USER_SEQUENCES} unchanged since v{consumed}", start)
    return Plan(MODE_INCREMENTAL, f"change feed of {C.T_USER_SEQUENCES} "
                                  f"v{start}..v{sequences.version}", start)


def rewrite_reason(commits: Sequence[Tuple[int, str, Dict[str, str]]]) -> Optional[str]:
    """(version, operation, operationParameters) of user_sequences commits -> why the change
    feed must not be followed over them (an overwrite, replace, truncate or restore), or None."""
    for version, operation, params in sorted(commits, key=lambda c: c[0]):
        overwrite = operation == "WRITE" and (params or {}).get("mode") == _OVERWRITE_MODE
        if overwrite or operation in _REWRITE_OPERATIONS or "REPLACE" in operation:
            what = "an overwrite" if overwrite else operation
            return f"{C.T_USER_SEQUENCES} v{version} is {what}: the whole table is reclassified"
    return None


def cdf_unavailable(err: BaseException) -> Optional[str]:
    """The one-line reason a change feed read failed because the feed is not there (not
    recorded for the range, log or files cleaned up), or None for any other error."""
    import re

    from pyspark.errors import AnalysisException

    text = " ".join(str(err).split())
    if not isinstance(err, AnalysisException) and not any(m in text for m in _MISSING_FILE_MARKERS):
        return None
    found = re.search(r"\[[A-Z_.]+\].*?(?:\. |$)", text)
    return (found.group(0) if found else text)[:300].rstrip(". ")


# --------------------------------------------------------------------------------------
# Driver: read, transform, MERGE
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InferenceResult:
    model_version: str
    sequences_version: int  # Delta version of user_sequences that was read
    users: int  # users in user_sequences
    encoded: int
    new_users: int
    changed: int
    model_changed: int
    deleted: int
    states_version: Optional[int]  # Delta version of user_states afterwards (None: no table)
    committed: bool  # False: nothing to do, no commit
    mode: str = MODE_FULL  # MODE_FULL or MODE_INCREMENTAL
    mode_reason: str = ""
    # incremental: first user_sequences version of the change feed read (then up to
    # sequences_version; greater than it when nothing moved and nothing was read)
    changes_from: Optional[int] = None
    states_read_version: Optional[int] = None  # user_states version classified against

    def summary(self) -> str:
        what = "committed" if self.committed else "nothing to do (no commit)"
        states = "no table" if self.states_version is None else f"v{self.states_version}"
        return (f"batch inference {self.model_version}: user_sequences v{self.sequences_version}, "
                f"{self.users} users; encoded {self.encoded} (new {self.new_users}, changed "
                f"{self.changed}, model {self.model_changed}), deleted {self.deleted}; "
                f"user_states {states}: {what}; {self.mode}: {self.mode_reason}")


def repair_command(lake: str, bundle_path: str) -> str:
    return (f"python jobs/batch_inference.py --lake {lake} --bundle {bundle_path} "
            f"--repair-duplicates (the users whose states it deletes are re-encoded as new users)")


def run_batch_inference(spark, lake: str, bundle_path: str, batch_size: int = DEFAULT_BATCH_SIZE,
                        partitions: Optional[int] = None, now: Optional[datetime] = None,
                        repair_duplicates: bool = False, lease_ttl_s: Optional[float] = None,
                        full: bool = False) -> InferenceResult:
    """Encode the users that need it and MERGE their states into ``user_states``.

    ``partitions`` = tasks of the encoding stage (default: the cluster's default parallelism);
    ``now`` = the ``state_ts`` of this run (one value for all rows written); ``full`` = classify
    every user instead of following the change feed of user_sequences (module docstring).

    Overlapping runs: the run holds the lake's ``batch_inference`` writer lease (another live
    run -> ``lease.LeaseHeldError`` before any work); its one write is a MERGE keyed on
    ``user_id`` (on the first run too: never a blind append), made only if ``user_states`` is
    still at the version it classified against, else ``ConcurrentWriteError`` and nothing is
    written. A user_id found twice in ``user_states`` (among the states a run reads) ->
    ``DuplicateKeyError`` with the repair command; ``repair_duplicates`` deletes those users'
    states, which this run then re-encodes.
    """
    from models.export import load_bundle
    from pipelines.delta_io import table_exists

    now = now or datetime.now(timezone.utc)
    bundle_path = os.path.abspath(bundle_path)  # executors may run in another working directory
    model_version = load_bundle(bundle_path).model_version  # verifies the bundle on the driver
    seq_path = C.LakePaths(lake).table(C.T_USER_SEQUENCES)
    if not table_exists(spark, seq_path):  # before the lease: a wrong path must not get one
        raise FileNotFoundError(f"no Delta table {C.T_USER_SEQUENCES} at {seq_path}; run "
                                f"jobs/build_sequences.py first")
    with lease.held(lake, lease.SCOPE_INFERENCE, "batch_inference", lease_ttl_s) as writer:
        return _infer(spark, lake, bundle_path, model_version, batch_size, partitions, now,
                      repair_duplicates, writer.check, full)


def _commits(spark, path: str, start: int, end: int) -> list:
    """(version, operation, operationParameters) of the commits ``start..end`` (log only).

    The newest commits are read, more of them while a build (another lease scope) keeps
    committing to user_sequences past ``end``."""
    from delta.tables import DeltaTable

    table, limit = DeltaTable.forPath(spark, path), end - start + 1
    while True:
        rows = table.history(limit).select("version", "operation", "operationParameters").collect()
        if len(rows) < limit or min(int(r["version"]) for r in rows) <= start:
            break
        limit *= 2
    return [(int(r["version"]), r["operation"], dict(r["operationParameters"] or {}))
            for r in rows if start <= int(r["version"]) <= end]


def _touched_users(spark, seq_path: str, plan: Plan, seq_version: int):
    """(persisted latest_changes of the plan's range, None) or (None, why the feed is not there)."""
    from py4j.protocol import Py4JJavaError
    from pyspark import StorageLevel
    from pyspark.errors import AnalysisException

    touched = None
    try:
        touched = latest_changes(read_changes(spark, seq_path, plan.changes_from, seq_version)
                                 ).persist(StorageLevel.MEMORY_AND_DISK)
        touched.count()  # reads the feed now: a vacuumed file fails here, not in the MERGE
        return touched, None
    except (AnalysisException, Py4JJavaError) as err:
        why = cdf_unavailable(err)
        if why is None:
            raise
        if touched is not None:
            touched.unpersist()
        return None, (f"change feed of {C.T_USER_SEQUENCES} v{plan.changes_from}..v{seq_version} "
                      f"unavailable: {why}")


def _choose_plan(spark, seq_path: str, plan: Plan, seq_version: int):
    """(plan, persisted touched users or None): an incremental plan stays one only if its
    range holds no rewrite of user_sequences and its change feed can be read."""
    if plan.mode != MODE_INCREMENTAL:
        return plan, None
    rewritten = rewrite_reason(_commits(spark, seq_path, plan.changes_from, seq_version))
    if rewritten is not None:
        return Plan(MODE_FULL, rewritten), None
    touched, unavailable = _touched_users(spark, seq_path, plan, seq_version)
    if unavailable is not None:
        return Plan(MODE_FULL, unavailable), None
    return plan, touched


def _touched_states(spark, states_path: str, states_version: int, touched):  # -> DataFrame
    """The states of the touched users only (a broadcast semi-join), with only the columns
    classify_users reads; persisted so the duplicate check and the classification scan
    user_states once."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from pipelines.delta_io import read_table

    return (read_table(spark, states_path, states_version)
            .select(C.USER_ID, C.SEQUENCE_HASH, C.MODEL_VERSION)
            .join(F.broadcast(touched.select(C.USER_ID)), C.USER_ID, "left_semi")
            .persist(StorageLevel.MEMORY_AND_DISK))


def _stage(spark, classified, n_todo: int, n_del: int, bundle_path: str, model_version: str,
           now: datetime, batch_size: int, partitions: Optional[int], cached: list):
    """The MERGE source: encoded states tagged upsert, orphaned users tagged delete."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from pipelines.delta_io import MERGE_TAG, TAG_DELETE, TAG_UPSERT

    todo = (classified.where(F.col(_REASON).isin(*TO_ENCODE))
            .repartition(partitions or spark.sparkContext.defaultParallelism))
    # Persist the model output: the MERGE may scan its source twice (never run the encoder
    # twice), and the count proves every row given to the encoder came back.
    encoded = encode_states(todo, bundle_path, model_version, now, batch_size).persist(
        StorageLevel.MEMORY_AND_DISK)
    cached.append(encoded)
    if encoded.count() != n_todo:
        raise RuntimeError("the encoder returned a different number of rows than it was given")
    staged = encoded.withColumn(MERGE_TAG, F.lit(TAG_UPSERT))
    if n_del:
        blank = [F.lit(None).cast(f.dataType).alias(f.name)
                 for f in C.spark_schema(C.T_USER_STATES).fields if f.name != C.USER_ID]
        orphans = classified.where(F.col(_REASON) == REASON_ORPHAN).select(C.USER_ID, *blank)
        staged = staged.unionByName(orphans.withColumn(MERGE_TAG, F.lit(TAG_DELETE)))
    return staged


def _commit(spark, states_path: str, staged, has_states: bool, states_version: Optional[int],
            fence: Callable[[], None]) -> None:
    """The run's write: the keyed MERGE, only if user_states is still where it was read (on a
    table from a release before deletion vectors or its change data feed, preceded once by the
    ALTER enabling them)."""
    from pipelines.delta_io import (STATES_PROPERTIES, ConcurrentWriteError, delta_conflicts,
                                    ensure_properties, ensure_table, merge_tagged, table_version)

    fence()
    if not has_states:  # first run: create, then the same keyed MERGE into the empty table
        ensure_table(spark, states_path, C.spark_schema(C.T_USER_STATES), STATES_PROPERTIES)
        states_version = 0
    now_at = table_version(spark, states_path)
    if now_at != states_version:
        raise ConcurrentWriteError(
            f"{C.T_USER_STATES} moved from v{states_version} to v{now_at} while this run "
            f"encoded against v{states_version} (a writer that does not hold the lake's "
            f"lease); this run wrote nothing. Run it again")
    ensure_properties(spark, states_path, STATES_PROPERTIES)  # a table from an older release
    try:
        merge_tagged(spark, states_path, C.spark_schema(C.T_USER_STATES), [C.USER_ID], staged)
    except delta_conflicts() as err:
        raise ConcurrentWriteError(
            f"{C.T_USER_STATES}: another writer committed while this run's MERGE ran "
            f"({type(err).__name__}); Delta refused this run's commit, nothing of it was "
            f"written. Run it again") from err


def _infer(spark, lake: str, bundle_path: str, model_version: str, batch_size: int,
           partitions: Optional[int], now: datetime, repair_duplicates: bool,
           fence: Callable[[], None], full: bool = False) -> InferenceResult:
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from pipelines.delta_io import check_duplicates, read_table, table_exists, table_version

    paths = C.LakePaths(lake)
    seq_path, states_path = paths.table(C.T_USER_SEQUENCES), paths.table(C.T_USER_STATES)
    seq_at = table_at(spark, seq_path)
    seq_version = seq_at.version
    has_states = table_exists(spark, states_path)
    states_at = table_at(spark, states_path) if has_states else None
    states_version = None if states_at is None else states_at.version
    progress = load_progress(lake)
    plan = plan_run(progress, model_version, seq_at, states_at, full, repair_duplicates)
    if plan.mode == MODE_INCREMENTAL and plan.changes_from > seq_version:
        print(f"batch inference: {plan.mode} ({plan.reason}): nothing to read", flush=True)
        return InferenceResult(model_version, seq_version, progress.users, 0, 0, 0, 0, 0,
                               states_version, False, plan.mode, plan.reason, plan.changes_from,
                               states_version)
    plan, touched = _choose_plan(spark, seq_path, plan, seq_version)
    print(f"batch inference: {plan.mode} ({plan.reason})", flush=True)
    repair_hint = repair_command(lake, bundle_path)
    cached = [] if touched is None else [touched]
    try:
        if touched is None:  # full: every sequence against every state
            sequences = latest_sequences(read_table(spark, seq_path, seq_version))
            states = read_table(spark, states_path, states_version) if has_states else None
            if has_states and check_duplicates(spark, C.T_USER_STATES, states_path, states,
                                               [C.USER_ID], repair_duplicates, repair_hint, fence):
                states_version = table_version(spark, states_path)
                states = read_table(spark, states_path, states_version)
        else:  # incremental: the touched users against their own states only
            sequences = touched.where(~F.col(_DELETED)).select(C.USER_ID, C.ITEM_IDS, C.EVENT_TS,
                                                               C.SEQUENCE_HASH)
            states = _touched_states(spark, states_path, states_version, touched)
            cached.append(states)
            check_duplicates(spark, C.T_USER_STATES, states_path, states, [C.USER_ID], False,
                             repair_hint, fence)
        classified = classify_users(sequences, states, model_version).persist(
            StorageLevel.MEMORY_AND_DISK)
        cached.append(classified)
        counts = {r[_REASON]: int(r["n"]) for r in
                  classified.groupBy(_REASON).agg(F.count(F.lit(1)).alias("n")).collect()}
        n_todo = sum(counts.get(r, 0) for r in TO_ENCODE)
        n_del = counts.get(REASON_ORPHAN, 0)
        if touched is None:
            n_users = sum(n for r, n in counts.items() if r != REASON_ORPHAN)
        else:  # the recorded count, plus the users that got a state, minus the deleted ones
            n_users = progress.users + counts.get(REASON_NEW, 0) - n_del
        committed = bool(n_todo or n_del)
        if committed:
            staged = _stage(spark, classified, n_todo, n_del, bundle_path, model_version, now,
                            batch_size, partitions, cached)
            _commit(spark, states_path, staged, has_states, states_version, fence)
        after = table_at(spark, states_path) if (has_states or committed) else None
    finally:
        for df in cached:
            df.unpersist()
    version = None if after is None else after.version
    if after is not None:  # recorded only after the MERGE committed (or had nothing to do)
        done = Progress(seq_at, model_version, after, n_users)
        if done != progress:
            fence()
            store_progress(lake, done)
    return InferenceResult(model_version, seq_version, n_users, n_todo, counts.get(REASON_NEW, 0),
                           counts.get(REASON_CHANGED, 0), counts.get(REASON_MODEL, 0), n_del,
                           version, committed, plan.mode, plan.reason, plan.changes_from,
                           states_version)


# --------------------------------------------------------------------------------------
# Job entry point (jobs/batch_inference.py)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncodingConfig:
    """The encoding stage's two knobs: the same for the batch inference job and for the
    refresh that runs it."""

    batch_size: int = flag_field("rows per forward pass of the encoder", DEFAULT_BATCH_SIZE)
    partitions: Optional[int] = flag_field(
        "tasks of the encoding stage; default: Spark's default parallelism", None)


@dataclass(frozen=True)
class BatchInferenceConfig:
    """What ``batch_inference`` encodes and how it classifies users (its encoding knobs:
    ``EncodingConfig``; its Spark master: ``pipelines.cli.SparkJob``)."""

    lake: str = lake_field()
    bundle: str = bundle_field()
    no_feast_export: bool = flag_field("skip refreshing the Parquet snapshots Feast materializes from", False)
    full: bool = flag_field(
        "classify every user of user_sequences against every state instead of following "
        "user_sequences' change feed since the last run", False)
    repair_duplicates: bool = flag_field(
        "if user_states holds a user twice (left by overlapping runs of an older version), "
        "delete that user's states and re-encode it in this run (default: stop with an error "
        "naming the users)", False)


def inference_parser() -> argparse.ArgumentParser:
    from pipelines.cli import SparkJob

    return dataclass_parser(
        "batch_inference", "Encode user histories with the bundle's encoder and MERGE them into "
        "user_states (incremental), then refresh the Feast snapshots.",
        (BatchInferenceConfig, ("lake", "bundle")), EncodingConfig, (SparkJob, ("master",)),
        BatchInferenceConfig)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return inference_parser().parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    from pipelines.cli import job_session

    args = parse_args(argv)
    cfg, encoding = from_args(BatchInferenceConfig, args), from_args(EncodingConfig, args)
    spark = job_session(args, "ctt-batch-inference")
    try:
        result = run_batch_inference(spark, cfg.lake, cfg.bundle, encoding.batch_size,
                                     encoding.partitions, repair_duplicates=cfg.repair_duplicates,
                                     full=cfg.full)
    except RuntimeError as err:
        lease.exit_on_refusal("batch_inference", err)
        raise
    finally:
        spark.stop()  # a clean stop: local-cluster otherwise relaunches executors while exiting
    print(result.summary(), flush=True)
    if not cfg.no_feast_export:
        from pipelines.feast_ops import export_feature_tables

        for line in export_feature_tables(cfg.lake):
            print(line.line(), flush=True)


# Command-line entry point: the process ends with the exit code main chose (ctt_contracts.process).
cli = entry_point(main)
