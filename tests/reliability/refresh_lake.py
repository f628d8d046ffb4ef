"""Helpers of the refresh and rollout tests: a raw-event lake, tiny bundles, an independent oracle.

A module with a unique name (not conftest) so both test files import it. The lake is written as
RAW tables (raw_events / raw_items / raw_users) so the refresh runs the real build job on it.
Every user's conversions have distinct timestamps, so the oracle can rebuild a history from the
raw events alone (sort by time, keep the newest ``MAX_LEN``) without trusting user_sequences.
The models are untrained (seeded init): refresh and rollout correctness is a property of the
data path, not of the weights.
"""
from __future__ import annotations

import contextlib
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
import pandas as pd
import torch

import ctt_contracts as C
from models.lake_read import read_arrow
# The same tiny model and catalogue as the batch-inference tests (tests/ is on sys.path).
from serving_offline.offline_lake import tiny_config
from serving_offline.offline_lake import tiny_catalog as catalog

CONTEXT = [(3, 0.7), (17, 0.2)]  # explicit request context used by the parity checks
K = 10


def export_bundle(root: Path, name: str, seed: int) -> Path:
    """A real bundle (safetensors + manifest); another seed gives another model_version."""
    from models.export import export_bundle as export
    from models.two_tower import ContextualTwoTower

    torch.manual_seed(seed)
    model = ContextualTwoTower(tiny_config()).eval()
    return export(model, tiny_config(), catalog(), root / name, name)


def users_frame(user_ids: Sequence[int], seed: int = 2) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = len(user_ids)
    return pd.DataFrame({C.USER_ID: np.asarray(user_ids, dtype=np.int64),
                         C.AGE_BUCKET: rng.integers(0, C.AGE_BUCKETS, n).astype(np.int32),
                         C.COUNTRY: rng.choice(["US", "FR", "BR"], n),
                         C.GENDER: rng.choice(list(C.GENDERS), n)})


def events(user_ids: Sequence[int], start: datetime, end: datetime, per_user: Tuple[int, int],
           seed: int) -> pd.DataFrame:
    """Raw events in [start, end): per user a random number of conversions (plus one view each
    time), distinct whole-second timestamps, the converted item as its own subject item."""
    rng = np.random.default_rng(seed)
    items = catalog()[C.ITEM_ID].to_numpy()
    lo, hi = int(start.timestamp()), int(end.timestamp())
    rows: List[tuple] = []
    for user in user_ids:
        n = int(rng.integers(per_user[0], per_user[1] + 1))
        ts = np.sort(rng.choice(np.arange(lo, hi, dtype=np.int64), size=n, replace=False))
        for item, t in zip(rng.choice(items, size=n), ts):
            when = datetime.fromtimestamp(int(t), tz=timezone.utc)
            rows.append((int(user), int(item), C.EVENT_CONVERSION, when, "home", int(item), None))
            rows.append((int(user), int(item), C.EVENT_VIEW, when - timedelta(seconds=30), "home",
                         None, None))
    out = pd.DataFrame(rows, columns=C.RAW_EVENTS_COLUMNS)
    return out.astype({C.SUBJECT_ITEM_ID: "Int64"})  # nullable: views have no subject item


def _py(value):
    """pandas/numpy scalars -> the python types Spark's createDataFrame accepts."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, pd.Timestamp):
        return value.to_pydatetime()
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_raw(spark, lake: str, raw_events: pd.DataFrame, users: pd.DataFrame | None = None,
              mode: str = "overwrite") -> None:
    """raw_events (+ raw_items / raw_users on the first write) through the project's writer."""
    from pipelines.delta_io import write_raw as write

    ev = spark.createDataFrame([tuple(_py(v) for v in r) for r in raw_events.itertuples(index=False)],
                               C.spark_schema(C.T_RAW_EVENTS))
    write(spark, ev, lake, C.T_RAW_EVENTS, mode=mode)
    if users is not None:
        cat = catalog()
        it = spark.createDataFrame(
            [(int(r[C.ITEM_ID]), list(map(int, r[C.CATEGORY_IDS])),
              list(map(float, r[C.CATEGORY_WEIGHTS])), int(r[C.ADVERTISER_ID]))
             for _, r in cat.iterrows()], C.spark_schema(C.T_RAW_ITEMS))
        write(spark, it, lake, C.T_RAW_ITEMS)
        us = spark.createDataFrame(
            [(int(r[C.USER_ID]), int(r[C.AGE_BUCKET]), str(r[C.COUNTRY]), str(r[C.GENDER]))
             for _, r in users.iterrows()], C.spark_schema(C.T_RAW_USERS))
        write(spark, us, lake, C.T_RAW_USERS)


def history(raw_events: pd.DataFrame, user: int) -> Tuple[np.ndarray, np.ndarray]:
    """The user's conversions from the raw log, oldest..newest (item_ids, epoch seconds)."""
    conv = raw_events[(raw_events[C.USER_ID] == user)
                      & (raw_events[C.EVENT_TYPE] == C.EVENT_CONVERSION)]
    conv = conv.sort_values(C.EVENT_TS)
    ts = np.array([int(t.timestamp()) for t in conv[C.EVENT_TS]], dtype=np.int64)
    return conv[C.ITEM_ID].to_numpy(dtype=np.int64), ts


def oracle(bundle_dir: Path, hist: Tuple[np.ndarray, np.ndarray], user_row: pd.Series,
           k: int = K) -> Tuple[np.ndarray, List[int]]:
    """The FULL model forward (encoder + context layer + head, no cached state) on the history,
    then the exact top-k over the bundle's item embeddings: (query (D,), item ids best first)."""
    from models import features
    from models.export import load_bundle

    bundle = load_bundle(bundle_dir)
    model, cfg = bundle.model.eval(), bundle.config
    items, ts = features.pad_history(hist[0], hist[1], cfg.max_len)  # (L,), (L,)
    ctx_ids, ctx_w = features.pad_context([c for c, _ in CONTEXT], [w for _, w in CONTEXT],
                                          cfg.max_ctx)  # (C,), (C,)
    age, country, gender = features.encode_demographics(
        int(user_row[C.AGE_BUCKET]), str(user_row[C.COUNTRY]), str(user_row[C.GENDER]),
        cfg.country_buckets)
    with torch.no_grad():
        q = model(torch.from_numpy(items)[None], torch.from_numpy(ts)[None],
                  torch.from_numpy(ctx_ids)[None], torch.from_numpy(ctx_w)[None],
                  torch.tensor([age]), torch.tensor([country]), torch.tensor([gender]))[0].numpy()
    scores = np.asarray(bundle.item_embeddings, dtype=np.float32) @ q  # (N,)
    top = np.argsort(-scores, kind="stable")[:k]
    return q, [int(bundle.item_ids[i]) for i in top]


def online_states(store, user_ids: Sequence[int]) -> Dict[int, Tuple[np.ndarray, str, float]]:
    """user -> (hidden_state, model_version, event timestamp epoch s) read back from the store."""
    refs = [C.feature_ref(C.FV_USER_SEQUENCE_STATE, C.HIDDEN_STATE),
            C.feature_ref(C.FV_USER_SEQUENCE_STATE, C.MODEL_VERSION)]
    got = store.get_online_features(refs, [{C.USER_ID: int(u)} for u in user_ids]).to_dict(
        include_event_timestamps=True)
    ts_key = f"{C.HIDDEN_STATE}__ts"
    return {int(u): (np.asarray(s, np.float32), v, float(t))
            for u, s, v, t in zip(got[C.USER_ID], got[C.HIDDEN_STATE], got[C.MODEL_VERSION],
                                  got[ts_key]) if s is not None}


def delta_states(lake: str) -> pd.DataFrame:
    return read_arrow(C.LakePaths(lake).table(C.T_USER_STATES))[0].to_pandas().set_index(C.USER_ID)


@contextlib.contextmanager
def local_delta(spark) -> Iterator[None]:
    """The jobs' local Delta setting (few snapshot partitions) on the shared test session while a
    scenario runs, restored afterwards (other tests may rely on Delta's default)."""
    from pipelines.delta_io import SNAPSHOT_PARTITIONS_CONF, tune_local_delta

    before = spark.conf.get(SNAPSHOT_PARTITIONS_CONF, None)
    tune_local_delta(spark)
    try:
        yield
    finally:
        if before is None:
            spark.conf.unset(SNAPSHOT_PARTITIONS_CONF)
        else:
            spark.conf.set(SNAPSHOT_PARTITIONS_CONF, before)
