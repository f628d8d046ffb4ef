"""Batch inference, worker side: the code each Spark Python worker runs inside ``mapInArrow``.

Why a module of its own: it is what the executors import, so it imports no pyspark (only
numpy, pyarrow and the contracts at import; torch and the bundle loader when a worker first
encodes), and it can be tested, benchmarked and reasoned about without a SparkSession. The
driver (``pipelines.inference``) decides which users to encode and writes the states; this
module turns Arrow batches of ``user_sequences`` rows into states.

How the model reaches the executors: the closure given to ``mapInArrow`` (``make_encoder``)
carries only the bundle PATH, the expected model_version and the batch size, never the model
(pickling a module into every task would ship the weights per task and bypass the bundle's
checksums). Each Python worker loads the bundle once with ``models.export.load_bundle``
(checksums verified) into a module-level cache keyed by (path, model_version); Spark reuses
Python workers across tasks, so the load happens once per worker, not per task or batch. The
worker also checks that the bundle on disk still has the version the driver saw, so a bundle
replaced mid-run fails loudly instead of writing states under the wrong version.

Inputs are turned into tensors only by ``models.features.pad_history`` (the one place shared
with training and serving), in chunks of ``batch_size`` rows of alike history length
(``length_order``) under ``torch.inference_mode`` with one torch thread per Spark Python worker
(Spark already runs one worker per core; the thread count is set inside the mapInArrow
function, never in the driver or a test process).
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, Sequence, Tuple

import numpy as np
import pyarrow as pa

import ctt_contracts as C

DEFAULT_BATCH_SIZE = 1024

# (bundle path, model_version) -> model in eval mode; one entry per Python worker process.
_MODEL_CACHE: Dict[Tuple[str, str], Any] = {}


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


def length_order(histories: Sequence[Tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Row indices ordered by history length, shortest first (stable).

    Why: the encoder trims the padding columns every row of a batch shares
    (``models.two_tower.trim_left_padding``), so a batch costs its LONGEST history. Conversion
    histories are short with a long tail (mean ~8, cap 50), so batches of random users are all
    about max_len wide; batches of users with alike lengths are as wide as their own histories
    (7x the users per second on one core at 1,024 rows). The encoder is invariant to left
    padding, so the order changes the cost, not the states (float rounding aside, ~1e-6).
    """
    return np.argsort(np.fromiter((len(i) for i, _ in histories), np.int64, len(histories)),
                      kind="stable")


def encode_histories(model: Any, histories: Sequence[Tuple[np.ndarray, np.ndarray]],
                     batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """[(item_ids, event_ts)] -> states float32 (N, state_dim) in the input's order, encoded
    ``batch_size`` rows per forward in ``length_order``."""
    import torch

    from models.features import pad_history

    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    max_len = model.config.max_len
    order = length_order(histories)  # (N,)
    out = np.empty((len(histories), model.state_dim), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(histories), batch_size):
            rows = order[start:start + batch_size]  # (B,)
            padded = [pad_history(*histories[r], max_len) for r in rows]
            items = torch.from_numpy(np.stack([p[0] for p in padded]))  # (B, L)
            ts = torch.from_numpy(np.stack([p[1] for p in padded]))  # (B, L)
            out[rows] = model.encode_user_state(items, ts).numpy()  # (B, S)
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
