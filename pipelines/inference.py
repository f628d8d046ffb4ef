"""Batch inference: the encoder's last hidden state per user -> the ``user_states`` Delta table.

The offline half of the hybrid user tower (seed 003): ``encode_user_state`` runs in Spark over
``user_sequences`` and its output is MERGEd into ``user_states`` (then snapshotted for Feast by
pipelines/feast_ops.py). The only module of pipelines/ that imports torch.

How the model reaches the executors: the closure given to ``mapInArrow`` carries only the
bundle PATH and the expected model_version, never the model (pickling a module into every task
would ship the weights per task and bypass the bundle's checksums). Each Python worker loads
the bundle once with ``models.export.load_bundle`` (checksums verified) into a module-level
cache keyed by (path, model_version); Spark reuses Python workers across tasks, so the load
happens once per worker, not per task or batch. The worker also checks that the bundle on disk
still has the version the driver saw, so a bundle replaced mid-run fails loudly instead of
writing states under the wrong version. The path must be readable from the executors (a local
path for local / local-cluster masters, a shared mount on a real cluster).

Incremental: a user is (re-)encoded only if it has no state, its state's ``sequence_hash``
differs from the current history's, or its state was written by another ``model_version`` (a
new model invalidates every cached state: seed 003 "version skew"). States of users that are no
longer in ``user_sequences`` are deleted in the same MERGE (never served from a vanished
history). Nothing to do -> no Delta commit at all.

Inputs are turned into tensors only by ``models.features.pad_history`` (the one place shared
with training and serving), in chunks of ``batch_size`` rows under ``torch.inference_mode`` with
one torch thread per Spark Python worker (Spark already runs one worker per core; the thread
count is set inside the mapInArrow function, never in the driver or a test process).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa

import ctt_contracts as C
from pipelines import lease

DEFAULT_BATCH_SIZE = 1024
# Columns local to this module's staging (never stored: not contract names).
_REASON = "__reason"  # why a user is (re-)encoded
_TAG = "__tag"  # MERGE staging: upsert or delete
_TAG_UPSERT, _TAG_DELETE = "U", "D"
_STATE_HASH, _STATE_VERSION = "__state_hash", "__state_version"
REASON_NEW, REASON_CHANGED, REASON_MODEL = "new_user", "sequence_changed", "model_version_changed"
REASON_ORPHAN, REASON_SAME = "orphan_state", "up_to_date"
TO_ENCODE = (REASON_NEW, REASON_CHANGED, REASON_MODEL)

# (bundle path, model_version) -> model in eval mode; one entry per Python worker process.
_MODEL_CACHE: Dict[Tuple[str, str], Any] = {}


# --------------------------------------------------------------------------------------
# Worker side: pure python/torch, testable without Spark
# --------------------------------------------------------------------------------------
def cached_model(bundle_path: str, model_version: str) -> Any:
    """The bundle's model, loaded once per process; raises if the bundle's version changed."""
    key = (bundle_path, model_version)
    model = _MODEL_CACHE.get(key)
    if model is None:
        from models.export import BundleError, load_bundle

        bundle = load_bundle(bundle_path)
        if bundle.model_version != model_version:
            raise BundleError(f"{bundle_path}: holds model_version {bundle.model_version!r} but the "
                              f"job started with {model_version!r} (bundle replaced during the run?)")
        model = bundle.model.eval()
        _MODEL_CACHE[key] = model
    return model


def encode_histories(model: Any, histories: Sequence[Tuple[np.ndarray, np.ndarray]],
                     batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """[(item_ids, event_ts)] -> states float32 (N, state_dim), ``batch_size`` rows per forward."""
    import torch

    from models.features import pad_history

    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    max_len = model.config.max_len
    out = np.empty((len(histories), model.state_dim), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(histories), batch_size):
            padded = [pad_history(i, t, max_len) for i, t in histories[start:start + batch_size]]
            items = torch.from_numpy(np.stack([p[0] for p in padded]))  # (B, L)
            ts = torch.from_numpy(np.stack([p[1] for p in padded]))  # (B, L)
            out[start:start + len(padded)] = model.encode_user_state(items, ts).numpy()  # (B, S)
    return out


def _list_rows(column: pa.Array) -> list[np.ndarray]:
    """A list<long> Arrow column -> one int64 numpy view per row (no per-element python)."""
    if column.null_count:
        raise ValueError(f"history arrays must not be null ({column.null_count} null rows)")
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    return [values[offsets[i]:offsets[i + 1]] for i in range(len(column))]


def encode_batch(batch: pa.RecordBatch, model: Any, batch_size: int) -> pa.RecordBatch:
    """One Arrow batch of user_sequences rows -> (user_id, hidden_state, sequence_hash)."""
    items = _list_rows(batch.column(C.ITEM_IDS))
    ts = _list_rows(batch.column(C.EVENT_TS))
    states = encode_histories(model, list(zip(items, ts)), batch_size)  # (N, S)
    n, dim = states.shape
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
    hidden = pa.ListArray.from_arrays(offsets, pa.array(states.reshape(-1), type=pa.float32()))
    return pa.RecordBatch.from_arrays(
        [batch.column(C.USER_ID), hidden, batch.column(C.SEQUENCE_HASH)],
        names=[C.USER_ID, C.HIDDEN_STATE, C.SEQUENCE_HASH])


def make_encoder(bundle_path: str, model_version: str, batch_size: int):
    """The mapInArrow function: captures only strings and an int (see module docstring)."""

    def encode_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import torch

        torch.set_num_threads(1)  # runs in a Spark Python worker: one worker per core already
        model = cached_model(bundle_path, model_version)
        for batch in batches:
            if batch.num_rows:
                yield encode_batch(batch, model, batch_size)

    return encode_partition


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

    def summary(self) -> str:
        what = "committed" if self.committed else "nothing to do (no commit)"
        states = "no table" if self.states_version is None else f"v{self.states_version}"
        return (f"batch inference {self.model_version}: user_sequences v{self.sequences_version}, "
                f"{self.users} users; encoded {self.encoded} (new {self.new_users}, changed "
                f"{self.changed}, model {self.model_changed}), deleted {self.deleted}; "
                f"user_states {states}: {what}")


def _merge(spark, path: str, staged) -> None:
    """One MERGE on user_id: upsert encoded states, delete orphaned ones."""
    from delta.tables import DeltaTable

    cols = list(C.USER_STATES_COLUMNS)
    values = [c for c in cols if c != C.USER_ID]
    (DeltaTable.forPath(spark, path).alias("t")
     .merge(staged.alias("s"), f"t.`{C.USER_ID}` = s.`{C.USER_ID}`")
     .whenMatchedDelete(condition=f"s.{_TAG} = '{_TAG_DELETE}'")
     .whenMatchedUpdate(condition=f"s.{_TAG} = '{_TAG_UPSERT}'", set={c: f"s.`{c}`" for c in values})
     .whenNotMatchedInsert(condition=f"s.{_TAG} = '{_TAG_UPSERT}'", values={c: f"s.`{c}`" for c in cols})
     .execute())


def repair_command(lake: str, bundle_path: str) -> str:
    return (f"python jobs/batch_inference.py --lake {lake} --bundle {bundle_path} "
            f"--repair-duplicates (the users whose states it deletes are re-encoded as new users)")


def run_batch_inference(spark, lake: str, bundle_path: str, batch_size: int = DEFAULT_BATCH_SIZE,
                        partitions: Optional[int] = None, now: Optional[datetime] = None,
                        repair_duplicates: bool = False, lease_ttl_s: Optional[float] = None,
                        ) -> InferenceResult:
    """Encode the users that need it and MERGE their states into ``user_states``.

    ``partitions`` = tasks of the encoding stage (default: the cluster's default parallelism);
    ``now`` = the ``state_ts`` of this run (one value for all rows written).

    Overlapping runs: the run holds the lake's ``batch_inference`` writer lease (another live
    run -> ``lease.LeaseHeldError`` before any work); its one write is a MERGE keyed on
    ``user_id`` (on the first run too: never a blind append), made only if ``user_states`` is
    still at the version it classified against, else ``ConcurrentWriteError`` and nothing is
    written. A user_id found twice in ``user_states`` -> ``DuplicateKeyError`` with the repair
    command; ``repair_duplicates`` deletes those users' states, which this run then re-encodes.
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
                      repair_duplicates, writer.check)


def _infer(spark, lake: str, bundle_path: str, model_version: str, batch_size: int,
           partitions: Optional[int], now: datetime, repair_duplicates: bool,
           fence: Callable[[], None]) -> InferenceResult:
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from pipelines.delta_io import (ConcurrentWriteError, check_duplicates, delta_conflicts,
                                    ensure_table, read_table, table_exists, table_version)

    paths = C.LakePaths(lake)
    seq_path, states_path = paths.table(C.T_USER_SEQUENCES), paths.table(C.T_USER_STATES)
    seq_version = table_version(spark, seq_path)
    sequences = latest_sequences(read_table(spark, seq_path, seq_version))
    has_states = table_exists(spark, states_path)
    states_version = table_version(spark, states_path) if has_states else None
    states = read_table(spark, states_path, states_version) if has_states else None
    if has_states and check_duplicates(spark, C.T_USER_STATES, states_path, states, [C.USER_ID],
                                       repair_duplicates, repair_command(lake, bundle_path), fence):
        states_version = table_version(spark, states_path)
        states = read_table(spark, states_path, states_version)

    classified = classify_users(sequences, states, model_version).persist(StorageLevel.MEMORY_AND_DISK)
    encoded = None
    try:
        counts = {r[_REASON]: int(r["n"]) for r in
                  classified.groupBy(_REASON).agg(F.count(F.lit(1)).alias("n")).collect()}
        n_todo = sum(counts.get(r, 0) for r in TO_ENCODE)
        n_del = counts.get(REASON_ORPHAN, 0)
        n_users = sum(n for r, n in counts.items() if r != REASON_ORPHAN)
        committed = False
        if n_todo or n_del:
            todo = (classified.where(F.col(_REASON).isin(*TO_ENCODE))
                    .repartition(partitions or spark.sparkContext.defaultParallelism))
            # Persist the model output: the MERGE may scan its source twice (never run the
            # encoder twice), and the count proves every row given to the encoder came back.
            encoded = encode_states(todo, bundle_path, model_version, now, batch_size).persist(
                StorageLevel.MEMORY_AND_DISK)
            if encoded.count() != n_todo:
                raise RuntimeError("the encoder returned a different number of rows than it was given")
            staged = encoded.withColumn(_TAG, F.lit(_TAG_UPSERT))
            if n_del:
                blank = [F.lit(None).cast(f.dataType).alias(f.name)
                         for f in C.spark_schema(C.T_USER_STATES).fields if f.name != C.USER_ID]
                orphans = classified.where(F.col(_REASON) == REASON_ORPHAN).select(C.USER_ID, *blank)
                staged = staged.unionByName(orphans.withColumn(_TAG, F.lit(_TAG_DELETE)))
            fence()
            if not has_states:  # first run: create, then the same keyed MERGE into the empty table
                ensure_table(spark, states_path, C.spark_schema(C.T_USER_STATES))
                states_version = 0
            now_at = table_version(spark, states_path)
            if now_at != states_version:
                raise ConcurrentWriteError(
                    f"{C.T_USER_STATES} moved from v{states_version} to v{now_at} while this run "
                    f"encoded against v{states_version} (a writer that does not hold the lake's "
                    f"lease); this run wrote nothing. Run it again")
            try:
                _merge(spark, states_path, staged)
            except delta_conflicts() as err:
                raise ConcurrentWriteError(
                    f"{C.T_USER_STATES}: another writer committed while this run's MERGE ran "
                    f"({type(err).__name__}); Delta refused this run's commit, nothing of it was "
                    f"written. Run it again") from err
            committed = True
        version = table_version(spark, states_path) if (has_states or committed) else None
    finally:
        for df in (classified, encoded):
            if df is not None:
                df.unpersist()
    return InferenceResult(model_version, seq_version, n_users, n_todo, counts.get(REASON_NEW, 0),
                           counts.get(REASON_CHANGED, 0), counts.get(REASON_MODEL, 0), n_del,
                           version, committed)


# --------------------------------------------------------------------------------------
# Job entry point (jobs/batch_inference.py)
# --------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="batch_inference",
        description="Encode user histories with the bundle's encoder and MERGE them into "
                    "user_states (incremental), then refresh the Feast snapshots.")
    p.add_argument("--lake", required=True, help="lake root (local folder or Hadoop URI)")
    p.add_argument("--bundle", required=True, help="exported model bundle folder (models.export)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="rows per forward pass")
    p.add_argument("--partitions", type=int, default=None,
                   help="tasks of the encoding stage (default: Spark's default parallelism)")
    p.add_argument("--master", default=None, help="Spark master (default: spark-submit's or local[*])")
    p.add_argument("--no-feast-export", action="store_true",
                   help="skip refreshing the Parquet snapshots Feast materializes from")
    p.add_argument("--repair-duplicates", action="store_true",
                   help="if user_states holds a user twice (left by overlapping runs of an older "
                        "version), delete that user's states and re-encode it in this run "
                        "(default: stop with an error naming the users)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    from pipelines.delta_io import tune_local_delta
    from pipelines.spark import get_spark

    args = parse_args(argv)
    spark = get_spark("ctt-batch-inference", master=args.master)
    tune_local_delta(spark)
    try:
        result = run_batch_inference(spark, args.lake, args.bundle, args.batch_size, args.partitions,
                                     repair_duplicates=args.repair_duplicates)
    except RuntimeError as err:
        lease.exit_on_refusal("batch_inference", err)
        raise
    finally:
        spark.stop()  # a clean stop: local-cluster otherwise relaunches executors while exiting
    print(result.summary(), flush=True)
    if not args.no_feast_export:
        from pipelines.feast_ops import export_feature_tables

        for line in export_feature_tables(args.lake):
            print(line.line(), flush=True)
