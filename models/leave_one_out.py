"""Leave-one-out by time (the MovieLens protocol): the split, a LightningDataModule over it, the
shared HR/NDCG of ranked lists, and ``fit_and_test`` which trains ContextualRetrievalSystem on it
with a Trainer configured from YAML (``configs/movielens.yaml``).

Protocol:
- each user's events are ordered by (time, item id): MovieLens logs many ratings of one user in
  the same second, the item id breaks those ties deterministically, and ``TS_MS`` (epoch ms plus
  the tie index) carries that exact order to a library that sorts by time (RecTools);
- last event = test target, second-to-last = validation target, the rest = train; users with
  fewer than ``min_events`` events are dropped (and counted);
- the ranked corpus is every item with a train interaction (the catalog); a target outside it
  cannot be ranked and counts as a miss;
- each user's own history (train for validation, train + validation item for test) is excluded
  from the ranking (a rated movie is not rated again).

Why a DataModule of its own rather than the lake's ``sequences`` table: the product's pipelines
split by global time and validate events (``validate_events`` quarantines every event before
2000, i.e. all of MovieLens 100k), while this protocol is per user. The data still enters through
the product's importer: ``benchmarks/movielens.py`` imports the files with ``pipelines.ingest``,
validates items and users with ``pipelines.validate``, and hands the frames over as Parquet
(contract column names), which this module reads.

Batches have the keys of ``models.data.build_examples`` (so ContextualRetrievalSystem trains and
validates on them unchanged), with empty context (the log has none) and, for validation and
test, ``EXCLUDE_ROWS`` (the history to drop from the ranking) and ``LABEL_ROW`` -1 for a target
outside the catalog. Training rows: one per user, history = the train events before the newest
one (the newest ``max_len``), label = the newest train event; ``objective: all_positions`` turns
every position of that row into an example.

Usage (what the benchmark runs; the data paths come from the importer)::

    python -m models.leave_one_out --config configs/movielens.yaml \\
        --data.events_path events.parquet --data.items_path items.parquet \\
        --data.users_path users.parquet
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning import Callback
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from models import allocator, features
from models.cli import LINKED_DATA_FIELDS
from models.data import (EXCLUDE_ROWS, HAS_REAL_CONTEXT, LABEL_ROW, REAL_CONTEXT_IDS, REAL_CONTEXT_WEIGHTS,
                         Catalog, SplitLoaders, build_catalog, demographics_by_user, take)
from models.metrics import metric_key
from models.system import NO_CONTEXT_PREFIX, ContextualRetrievalSystem, next_item_targets
import ctt_contracts as C
from ctt_contracts.process import entry_point

log = logging.getLogger(__name__)

TS_MS = "ts_ms"  # event time in ms with ties broken: strictly increasing within a user
POSITION = "position"  # 0-based index of the event in its user's ordered history
K = 10  # HR@K, NDCG@K
TOP_N = 100  # items kept per ranked list
HR, NDCG = f"hr@{K}", f"ndcg@{K}"
# What early stopping and the checkpoint watch: NDCG@10 of the no-context user embedding (the
# one top_item_lists ranks with), history excluded.
MONITOR = metric_key(f"{NO_CONTEXT_PREFIX}ndcg@{K}")
MAX_TIES_PER_SECOND = 1000  # the ms tie-break holds up to this many events of a user in one second


# ======================================================================================
# The split
# ======================================================================================
def order_events(events: pd.DataFrame) -> pd.DataFrame:
    """USER_ID, ITEM_ID, EVENT_TS (epoch s) -> the same rows ordered by (user, time, item id),
    with ``TS_MS`` (strictly increasing per user) and ``POSITION`` added."""
    missing = [c for c in (C.USER_ID, C.ITEM_ID, C.EVENT_TS) if c not in events.columns]
    if missing:
        raise ValueError(f"events lack columns {missing}")
    nulls = events[[C.USER_ID, C.ITEM_ID, C.EVENT_TS]].isna().any(axis=1)
    if nulls.any():
        raise ValueError(f"{int(nulls.sum())} events have a null user, item or time")
    df = events[[C.USER_ID, C.ITEM_ID, C.EVENT_TS]].astype(np.int64).sort_values(
        [C.USER_ID, C.EVENT_TS, C.ITEM_ID], kind="mergesort").reset_index(drop=True)
    tie = df.groupby([C.USER_ID, C.EVENT_TS]).cumcount().to_numpy()
    if (tie >= MAX_TIES_PER_SECOND).any():
        raise ValueError(f"more than {MAX_TIES_PER_SECOND} events of one user in one second: "
                         "the ms tie-break would overflow into the next second")
    df[TS_MS] = df[C.EVENT_TS].to_numpy(np.int64) * 1000 + tie
    df[POSITION] = df.groupby(C.USER_ID).cumcount()
    return df


@dataclass
class Split:
    """Leave-one-out by time. ``val``/``test`` have one row per user, in the same user order."""

    train: pd.DataFrame  # all but each user's last two events (ordered)
    val: pd.DataFrame  # each user's second-to-last event
    test: pd.DataFrame  # each user's last event
    catalog: np.ndarray  # sorted item ids with a train interaction: the ranked corpus
    users_dropped: int  # users with fewer than min_events events

    @property
    def users(self) -> np.ndarray:
        return self.test[C.USER_ID].to_numpy()


def leave_one_out(events: pd.DataFrame, min_events: int = 3) -> Split:
    """Split events: last -> test, second-to-last -> validation, the rest -> train."""
    if min_events < 3:
        raise ValueError("min_events must be >= 3 (a train, a validation and a test event), "
                         f"got {min_events}")
    df = order_events(events)
    n = df.groupby(C.USER_ID)[C.ITEM_ID].transform("size")
    keep = n >= min_events
    dropped = int(df.loc[~keep, C.USER_ID].nunique())
    df, n = df[keep], n[keep]
    if df.empty:
        raise ValueError(f"no user has {min_events} or more events")
    from_end = n - 1 - df[POSITION]
    train = df[from_end >= 2].reset_index(drop=True)
    val = df[from_end == 1].sort_values(C.USER_ID).reset_index(drop=True)
    test = df[from_end == 0].sort_values(C.USER_ID).reset_index(drop=True)
    return Split(train, val, test, np.sort(train[C.ITEM_ID].unique()), dropped)


def split_fingerprint(split: Split) -> str:
    """sha256 of the split's (user, item, ts_ms) rows, train then validation then test: two
    processes that built the split independently compare this to prove they hold the same one."""
    digest = hashlib.sha256()
    for part in (split.train, split.val, split.test):
        digest.update(np.ascontiguousarray(part[[C.USER_ID, C.ITEM_ID, TS_MS]].to_numpy(np.int64)).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def history_frame(split: Split, phase: str) -> pd.DataFrame:
    """The events a user's ranking may use: train for validation, train + validation item for
    test; restricted to catalog items (RecTools drops items it never trained on the same way)."""
    if phase == C.SPLIT_VAL:
        hist = split.train
    elif phase == C.SPLIT_TEST:
        hist = pd.concat([split.train, split.val])
    else:
        raise ValueError(f"phase must be {C.SPLIT_VAL!r} or {C.SPLIT_TEST!r}, got {phase!r}")
    hist = hist[np.isin(hist[C.ITEM_ID], split.catalog)]
    return hist.sort_values([C.USER_ID, TS_MS], kind="mergesort").reset_index(drop=True)


def targets(split: Split, phase: str) -> np.ndarray:
    """(U,) target item of every user of ``split.users`` for the phase."""
    if phase not in (C.SPLIT_VAL, C.SPLIT_TEST):
        raise ValueError(f"phase must be {C.SPLIT_VAL!r} or {C.SPLIT_TEST!r}, got {phase!r}")
    return (split.val if phase == C.SPLIT_VAL else split.test)[C.ITEM_ID].to_numpy()


def grouped(frame: pd.DataFrame, users: np.ndarray, column: str) -> List[np.ndarray]:
    """``frame[column]`` per user in the order of ``users`` (frame sorted by user; an empty array
    for a user without rows)."""
    values = frame[column].to_numpy()
    ids = frame[C.USER_ID].to_numpy()
    starts = np.searchsorted(ids, users, side="left")
    stops = np.searchsorted(ids, users, side="right")
    return [values[a:b] for a, b in zip(starts, stops)]


# ======================================================================================
# The metric of ranked lists (one function for every library's lists)
# ======================================================================================
def hit_ndcg_at_k(top_lists: Sequence[Sequence[int]], target_items: Sequence[int],
                  k: int = K) -> Dict[str, float]:
    """HR@k and NDCG@k of ranked item lists with one relevant item per user.

    HR@k = share of users whose target is in their top k; NDCG@k = mean of 1 / log2(rank + 2)
    over users whose target is at 0-based rank < k (ideal DCG = 1). A user with an empty list
    (a model could not rank for them) counts as a miss. Keys are ``hr@{k}`` and ``ndcg@{k}``.
    """
    if len(top_lists) != len(target_items):
        raise ValueError(f"{len(top_lists)} lists but {len(target_items)} targets")
    if not len(target_items):
        raise ValueError("no users to evaluate")
    hits, gains = 0, 0.0
    for top, target in zip(top_lists, target_items):
        head = list(top[:k])
        if target in head:
            hits += 1
            gains += 1.0 / math.log2(head.index(target) + 2)
    n = len(target_items)
    return {f"hr@{k}": hits / n, f"ndcg@{k}": gains / n}


def history_violations(top_lists: Sequence[Sequence[int]], histories: Sequence[np.ndarray]) -> int:
    """How many recommended items are in the user's own history (0 under this protocol)."""
    return sum(len(set(top) & set(np.asarray(h).tolist())) for top, h in zip(top_lists, histories))


# ======================================================================================
# Tensors
# ======================================================================================
def catalog_for(split: Split, items: Optional[pd.DataFrame], max_item_categories: int) -> Catalog:
    """Catalog of ``split.catalog``: categories from ``items`` (the items table), or none when
    no items table is given. An item with a train event but no items row is an error."""
    if items is None:
        items = pd.DataFrame({C.ITEM_ID: split.catalog, C.CATEGORY_IDS: [[]] * len(split.catalog),
                              C.CATEGORY_WEIGHTS: [[]] * len(split.catalog)})
    items = items[np.isin(items[C.ITEM_ID], split.catalog)]
    catalog = build_catalog(items, max_item_categories)
    if len(catalog) != len(split.catalog):
        missing = np.setdiff1d(split.catalog, catalog.item_ids.numpy())[:5].tolist()
        raise ValueError(f"{len(split.catalog) - len(catalog)} items with train events have no "
                         f"items row, e.g. {missing}")
    return catalog


def _padded(items: List[np.ndarray], ts: List[np.ndarray], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-user arrays -> (U, max_len) left-padded items and times (newest last)."""
    padded = [features.pad_history(i, t, max_len) for i, t in zip(items, ts)]
    if not padded:
        return (torch.full((0, max_len), features.PAD_ITEM, dtype=torch.long),
                torch.zeros((0, max_len), dtype=torch.long))
    return (torch.as_tensor(np.stack([p[0] for p in padded])),
            torch.as_tensor(np.stack([p[1] for p in padded])))


def _example_tensors(users: np.ndarray, hist: List[np.ndarray], hist_ts: List[np.ndarray],
                     labels: np.ndarray, catalog: Catalog, users_frame: Optional[pd.DataFrame],
                     max_len: int, max_ctx: int, country_buckets: int) -> Dict[str, torch.Tensor]:
    """The keys of ``models.data.build_examples`` for rows of (user, history, label), with an
    empty context (all padding) and LABEL_ROW -1 for a label outside the catalog."""
    n = len(users)
    items, ts = _padded(hist, hist_ts, max_len)
    frame = pd.DataFrame({C.USER_ID: users})
    if users_frame is None:
        demo = np.zeros((n, 3), dtype=np.int64)
    else:
        demo = demographics_by_user(frame, users_frame, country_buckets)
    no_ctx = torch.full((n, max_ctx), features.PAD_CATEGORY, dtype=torch.long)
    labels = np.asarray(labels, dtype=np.int64)
    return {
        C.USER_ID: torch.as_tensor(np.asarray(users, dtype=np.int64)),
        C.ITEM_IDS: items, C.EVENT_TS: ts,
        C.CONTEXT_CATEGORY_IDS: no_ctx, C.CONTEXT_WEIGHTS: torch.zeros((n, max_ctx)),
        C.AGE_BUCKET: torch.as_tensor(demo[:, 0]), C.COUNTRY: torch.as_tensor(demo[:, 1]),
        C.GENDER: torch.as_tensor(demo[:, 2]),
        C.LABEL_ITEM_ID: torch.as_tensor(labels),
        LABEL_ROW: torch.as_tensor(catalog.find_rows(labels)),
    }


def train_tensors(split: Split, catalog: Catalog, users_frame: Optional[pd.DataFrame], max_len: int,
                  max_ctx: int, country_buckets: int) -> Dict[str, torch.Tensor]:
    """One row per user: history = train events before the newest (newest ``max_len`` kept),
    label = the newest train event."""
    users = split.users
    items = grouped(split.train, users, C.ITEM_ID)
    ts = grouped(split.train, users, C.EVENT_TS)
    if any(len(i) == 0 for i in items):
        raise ValueError("a user of the split has no train event")
    out = _example_tensors(users, [i[:-1] for i in items], [t[:-1] for t in ts],
                           np.array([i[-1] for i in items], dtype=np.int64), catalog, users_frame,
                           max_len, max_ctx, country_buckets)
    if (out[LABEL_ROW] < 0).any():
        raise ValueError("a train label is outside the catalog (the catalog is the train items)")
    return out


def exclusion_rows(catalog: Catalog, histories: List[np.ndarray]) -> torch.Tensor:
    """(U, H) catalog rows of each user's whole history, -1 padded (H = the longest history);
    items outside the catalog have no row and cannot be ranked anyway."""
    width = max([1] + [len(h) for h in histories])
    out = np.full((len(histories), width), -1, dtype=np.int64)
    for u, h in enumerate(histories):
        out[u, : len(h)] = catalog.find_rows(np.asarray(h, dtype=np.int64))
    return torch.as_tensor(out)


def phase_tensors(split: Split, phase: str, catalog: Catalog, users_frame: Optional[pd.DataFrame],
                  max_len: int, max_ctx: int, country_buckets: int) -> Dict[str, torch.Tensor]:
    """One row per user: history = ``history_frame`` of the phase, label = the phase's target;
    adds EXCLUDE_ROWS (that whole history) and the no-real-context keys validation reads."""
    frame = history_frame(split, phase)
    users = split.users
    hist = grouped(frame, users, C.ITEM_ID)
    out = _example_tensors(users, hist, grouped(frame, users, C.EVENT_TS), targets(split, phase),
                           catalog, users_frame, max_len, max_ctx, country_buckets)
    out[EXCLUDE_ROWS] = exclusion_rows(catalog, hist)
    out[REAL_CONTEXT_IDS] = out[C.CONTEXT_CATEGORY_IDS].clone()
    out[REAL_CONTEXT_WEIGHTS] = out[C.CONTEXT_WEIGHTS].clone()
    out[HAS_REAL_CONTEXT] = torch.zeros(len(users), dtype=torch.bool)
    return out


def target_counts(train: Dict[str, torch.Tensor], catalog: Catalog) -> torch.Tensor:
    """(N,) how often each catalog item is a training target of the all-positions objective:
    every history event but a row's first, plus the label (logQ frequencies and the id gate)."""
    rows = torch.as_tensor(catalog.find_rows(train[C.ITEM_IDS].numpy()))  # (U, L), -1 pad
    target = next_item_targets(rows, train[LABEL_ROW])  # (U, L)
    return torch.bincount(target[target >= 0], minlength=len(catalog)).to(torch.float64)


# ======================================================================================
# The DataModule
# ======================================================================================
def read_events(path: str) -> pd.DataFrame:
    """Parquet events with USER_ID, ITEM_ID and EVENT_TS (epoch seconds or a timestamp)."""
    events = pd.read_parquet(path)
    if C.EVENT_TS in events.columns and pd.api.types.is_datetime64_any_dtype(events[C.EVENT_TS]):
        ts = events[C.EVENT_TS]
        ts = ts.dt.tz_convert("UTC") if ts.dt.tz is not None else ts.dt.tz_localize("UTC")
        events = events.assign(**{C.EVENT_TS: (ts - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)})
    return events


class LeaveOneOutDataModule(SplitLoaders, pl.LightningDataModule):
    """Train / validation / test tensors of a leave-one-out split, its catalog and the training
    target frequencies; the interface ContextualRetrievalSystem reads from a data module.

    ``events_path``: Parquet with USER_ID, ITEM_ID, EVENT_TS (epoch s); ``items_path``: the items
    table as Parquet (categories; None = ids only); ``users_path``: the users table as Parquet
    (demographics; None = all unknown).
    """

    def __init__(self, events_path: str, items_path: Optional[str] = None,
                 users_path: Optional[str] = None, batch_size: int = 128, eval_batch_size: int = 1024,
                 max_len: int = 200, max_ctx: int = 5, max_item_categories: int = 8,
                 country_buckets: int = 64, min_events: int = 3,
                 shuffle_seed: Optional[int] = None, length_buckets: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.split: Optional[Split] = None
        self.catalog: Optional[Catalog] = None
        self.splits: Dict[str, Dict[str, torch.Tensor]] = {}
        self.item_counts: Optional[torch.Tensor] = None
        self.items_frame: Optional[pd.DataFrame] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.catalog is not None:
            return
        hp = self.hparams
        self.items_frame = pd.read_parquet(hp.items_path) if hp.items_path else None
        users = pd.read_parquet(hp.users_path) if hp.users_path else None
        self.split = leave_one_out(read_events(hp.events_path), hp.min_events)
        self.catalog = catalog_for(self.split, self.items_frame, hp.max_item_categories)
        dims = (hp.max_len, hp.max_ctx, hp.country_buckets)
        self.splits = {C.SPLIT_TRAIN: train_tensors(self.split, self.catalog, users, *dims),
                       C.SPLIT_VAL: phase_tensors(self.split, C.SPLIT_VAL, self.catalog, users, *dims),
                       C.SPLIT_TEST: phase_tensors(self.split, C.SPLIT_TEST, self.catalog, users, *dims)}
        self.item_counts = target_counts(self.splits[C.SPLIT_TRAIN], self.catalog)
        log.info("leave-one-out: %d users (%d dropped), %d train events, catalog %d",
                 len(self.split.users), self.split.users_dropped, len(self.split.train), len(self.catalog))

    # No in-batch negatives depend on the batch size here, so the last short batch is kept.
    drop_last_train = False


# ======================================================================================
# Ranked lists through the served path
# ======================================================================================
def top_rows(scores: torch.Tensor, exclude: torch.Tensor, k: int) -> List[List[int]]:
    """scores (B, N), exclude (B, H) rows to drop (-1 pad) -> the top-k rows of each query,
    best first, never an excluded row (a list is shorter when fewer rows remain)."""
    n = scores.shape[1]
    cols = torch.where(exclude >= 0, exclude, torch.full_like(exclude, n))  # (B, H); n = a spare column
    drop = torch.zeros(scores.shape[0], n + 1, dtype=torch.bool).scatter_(1, cols, True)[:, :n]  # (B, N)
    values, rows = scores.masked_fill(drop, -math.inf).topk(min(k, n), dim=1)  # (B, k)
    return [r[v > -math.inf].tolist() for v, r in zip(values, rows)]


@torch.no_grad()
def top_item_lists(system: ContextualRetrievalSystem, tensors: Dict[str, torch.Tensor],
                   k: int = TOP_N, chunk: int = 1024) -> List[List[int]]:
    """Top-k item ids per row, ranked over the whole catalog with the row's EXCLUDE_ROWS
    dropped, from the served path: encode_user_state -> query_from_state with no context."""
    was_training = system.training
    system.eval()
    item_emb = system.catalog_embeddings()  # (N, D)
    ids = system.catalog.item_ids
    out: List[List[int]] = []
    n = tensors[LABEL_ROW].shape[0]
    for start in range(0, n, chunk):
        batch = take(tensors, slice(start, start + chunk))
        user = system.user_embeddings(batch, "none", item_emb=item_emb)  # (b, D)
        out.extend(ids[r].tolist() for r in top_rows(user @ item_emb.T, batch[EXCLUDE_ROWS], k))
    system.train(was_training)
    return out


def evaluate_lists(dm: LeaveOneOutDataModule, phase: str, lists: List[List[int]]) -> Dict[str, Any]:
    """HR/NDCG of ``lists`` against the phase's targets and the history violations (must be 0)."""
    hist = grouped(history_frame(dm.split, phase), dm.split.users, C.ITEM_ID)
    return {**hit_ndcg_at_k(lists, targets(dm.split, phase)),
            "history_violations": history_violations(lists, hist)}


# ======================================================================================
# Training from the YAML config
# ======================================================================================
class EpochClock(Callback):
    """Wall and CPU seconds from the first training step to the end of every epoch (its
    validation included) and the monitored validation metric, so the time to the best epoch can
    be read afterwards. CPU = this process's time over all threads."""

    def __init__(self, monitor: str = MONITOR) -> None:
        self.monitor = monitor
        self.curve: List[Dict[str, float]] = []
        self._wall0 = self._cpu0 = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._wall0, self._cpu0 = time.perf_counter(), time.process_time()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning runs the epoch's validation before this hook.
        metrics = trainer.callback_metrics
        value = metrics.get(self.monitor)
        loss = metrics.get("train/loss_epoch")
        self.curve.append({"epoch": trainer.current_epoch + 1,
                           "val_" + NDCG: float(value) if value is not None else math.nan,
                           "train_loss": float(loss) if loss is not None else math.nan,
                           "wall_s": time.perf_counter() - self._wall0,
                           "cpu_s": time.process_time() - self._cpu0})


class LeaveOneOutCLI(LightningCLI):
    """ContextualRetrievalSystem + LeaveOneOutDataModule + Trainer from YAML, the data's sizes
    linked to the model config as ``ctt-train`` links them (``LINKED_DATA_FIELDS``)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in LINKED_DATA_FIELDS:
            parser.link_arguments(f"model.model_config.{name}", f"data.{name}")


def build(args: Sequence[str], callbacks: Sequence[Callback] = ()) -> LeaveOneOutCLI:
    """The system, data module and trainer of ``args`` (``--config`` files + overrides),
    ``callbacks`` added to the configured ones; nothing is run."""
    with warnings.catch_warnings():
        # Called from scripts with arguments of their own: LightningCLI warns that sys.argv is
        # set as well, but with ``args`` given it reads ``args`` only.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return LeaveOneOutCLI(ContextualRetrievalSystem, LeaveOneOutDataModule, args=list(args),
                              run=False, save_config_callback=None,
                              trainer_defaults={"callbacks": list(callbacks)})


def best_checkpoint(trainer: pl.Trainer) -> Optional[str]:
    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.best_model_path:
            return cb.best_model_path
    return None


def fit_and_test(args: Sequence[str], top_n: int = TOP_N) -> Dict[str, Any]:
    """Fit from the config (early stopping on ``MONITOR``), load the best epoch's weights, rank
    validation and test through the served path and score them with ``hit_ndcg_at_k``.

    Checkpoints go to a temporary folder unless ``--trainer.default_root_dir`` is given. Returns
    test and validation figures, the best epoch, epochs run, wall / CPU seconds to the best epoch
    and in total, and the per-epoch curve.
    """
    clock = EpochClock(MONITOR)
    with tempfile.TemporaryDirectory(prefix="ctt-loo-") as tmp:
        root = [] if any(a.startswith("--trainer.default_root_dir") for a in args) else \
            ["--trainer.default_root_dir", tmp]
        cli = build([*args, *root], callbacks=[clock])
        system, dm, trainer = cli.model, cli.datamodule, cli.trainer
        trainer.fit(system, datamodule=dm)
        best = best_checkpoint(trainer)
        if best is None:
            raise RuntimeError(f"no best checkpoint: the config needs a ModelCheckpoint on {MONITOR}")
        ckpt = torch.load(best, map_location="cpu", weights_only=True)
        system.load_state_dict(ckpt["state_dict"])
    best_epoch = int(ckpt["epoch"]) + 1
    at_best = clock.curve[best_epoch - 1]
    val = evaluate_lists(dm, C.SPLIT_VAL, top_item_lists(system, dm.splits[C.SPLIT_VAL], top_n))
    test = evaluate_lists(dm, C.SPLIT_TEST, top_item_lists(system, dm.splits[C.SPLIT_TEST], top_n))
    return {
        HR: test[HR], NDCG: test[NDCG], "history_violations": test["history_violations"],
        "val": {HR: val[HR], NDCG: val[NDCG]},
        "val_monitored_at_best": at_best["val_" + NDCG],
        "best_epoch": best_epoch, "epochs_run": len(clock.curve),
        "stopped_early": len(clock.curve) < trainer.max_epochs,
        "wall_to_best_s": at_best["wall_s"], "cpu_to_best_s": at_best["cpu_s"],
        "train_wall_s": clock.curve[-1]["wall_s"], "train_cpu_s": clock.curve[-1]["cpu_s"],
        "split": {"users": len(dm.split.users), "users_dropped": dm.split.users_dropped,
                  "train_events": len(dm.split.train), "catalog": len(dm.catalog),
                  "fingerprint": split_fingerprint(dm.split)},
        "hparams": {k: v for k, v in dict(system.hparams).items()},
        "curve": clock.curve,
    }


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = fit_and_test(list(argv) if argv is not None else sys.argv[1:])
    print(json.dumps({k: v for k, v in result.items() if k not in ("curve", "hparams")}, indent=2))
    return result


def process_main() -> Dict[str, Any]:
    """``main`` as a process of its own: first re-executed with the allocator settings the
    full-catalog softmax needs (``models.allocator``)."""
    allocator.reexec_with_tunables()
    return main()


# Command-line entry point: the process ends with the exit code main chose (ctt_contracts.process).
cli = entry_point(process_main)


if __name__ == "__main__":
    cli()
