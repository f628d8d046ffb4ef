"""LightningDataModule over the Delta training snapshot (read with ``deltalake``, no Spark).

Why in memory: the demo data (~100k examples x 50 ids) is a few tens of MB as int64 tensors.
Pre-tensorising once in ``setup()`` and slicing whole batches by index (no per-example
``__getitem__`` + collate, no worker processes) keeps the data path far below the model's cost
on 2 CPU cores.

Distributed (DDP): every rank reads the whole snapshot (so catalog and item frequencies, hence
the logQ correction, are the same everywhere) and iterates only its own shard of the rows, see
``ShardedBatches``. The training order is a pure function of (seed, epoch), so a run resumed
from a checkpoint sees the same batches as an uninterrupted one without saving sampler state.

Tables read: sequences, context_rows, items, users. Every split carries the PSEUDO context (the
label item's top categories, produced by pipelines/context.py; never recomputed here, so the
trainer cannot drift from the pipeline) and, where the conversion has a subject item, the REAL
context with the subject's id and catalog row. The training split needs them too: the
subject-item baselines (models/baselines.py) learn their co-occurrence counts from it, and a
model may learn from real context. The Delta version of every table read is recorded in
``input_versions`` (logged to MLflow and written into the bundle manifest), and the context
top-k the rows were projected with in ``context_top_k`` (also written into the manifest, so the
resolver projects a subject item the same way).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from models import features
from models.lake_read import open_table, read_arrow, snapshot_arrow
import ctt_contracts as C

log = logging.getLogger(__name__)

INPUT_TABLES = (C.T_SEQUENCES, C.T_CONTEXT_ROWS, C.T_ITEMS, C.T_USERS)

# Batch keys that are not table columns (model inputs only; the others reuse contracts names).
LABEL_ROW = "label_row"  # (B,) int64 row of the label item in the catalog tensors
REAL_CONTEXT_IDS = "real_context_category_ids"  # (B, Cx) int64, -1 pad (all -1 without subject)
REAL_CONTEXT_WEIGHTS = "real_context_weights"  # (B, Cx) float32, 0 pad
HAS_REAL_CONTEXT = "has_real_context"  # (B,) bool: the conversion has a subject item
SUBJECT_ITEM_ID = C.SUBJECT_ITEM_ID  # (B,) int64 raw subject item id, NO_SUBJECT without one
SUBJECT_ROW = "subject_row"  # (B,) int64 catalog row of the subject item, NO_SUBJECT without one
NO_SUBJECT = -1
EXCLUDE_ROWS = "exclude_rows"  # (B, H) catalog rows to drop from the ranking (the user's history), -1 pad


@dataclass
class Catalog:
    """All items as model inputs; row i of every tensor is item ``item_ids[i]``."""

    item_ids: torch.Tensor  # (N,) int64 raw ids, sorted
    cat_ids: torch.Tensor  # (N, Ci) int64, -1 pad
    cat_weights: torch.Tensor  # (N, Ci) float32, renormalised

    def __len__(self) -> int:
        return int(self.item_ids.shape[0])

    def find_rows(self, item_ids: np.ndarray) -> np.ndarray:
        """Raw item ids (any shape) -> catalog rows (same shape); -1 for padding (negative ids)
        and for ids not in the catalog, never the row of a neighbouring id."""
        ids = self.item_ids.numpy()
        item_ids = np.asarray(item_ids)
        pos = np.minimum(np.searchsorted(ids, item_ids), len(ids) - 1)
        return np.where((item_ids >= 0) & (ids[pos] == item_ids), pos, -1)

    def rows_of(self, item_ids: np.ndarray) -> np.ndarray:
        """Raw item ids -> catalog rows; raises on ids missing from the catalog."""
        rows = self.find_rows(item_ids)
        missing = rows < 0
        if missing.any():
            sample = np.unique(np.asarray(item_ids)[missing])[:5].tolist()
            raise ValueError(f"{int(missing.sum())} label items are not in the items table, e.g. {sample}")
        return rows


def read_delta(lake_root: str, table: str) -> tuple[pd.DataFrame, int]:
    """One Delta table as pandas plus the version read (for lineage).

    Integer columns holding nulls (context_rows.subject_item_id) come back as Python ints and
    None, not float64 with NaN: ids above 2**53 would not survive a float.
    """
    rows, version = read_arrow(C.LakePaths(lake_root).table(table))
    return rows.to_pandas(integer_object_nulls=True), version


def lake_context_top_k(lake_root: str, context_rows: pd.DataFrame) -> int:
    """The k the lake's context rows were projected with: the one its build stored
    (``<lake>/_meta/build_config``). A lake built before the configuration was stored was built
    with the fixed default, unless its rows are longer (then at least their length)."""
    from deltalake.exceptions import TableNotFoundError

    try:
        table = open_table(C.LakePaths(lake_root).meta(C.META_BUILD_CONFIG))
    except TableNotFoundError:
        lengths = context_rows[C.CONTEXT_CATEGORY_IDS].map(len)
        longest = int(lengths.max()) if len(lengths) else 0
        log.warning("the lake stores no build config; context_top_k taken as %d",
                    max(longest, C.DEFAULT_CONTEXT_TOP_K))
        return max(longest, C.DEFAULT_CONTEXT_TOP_K)
    rows = snapshot_arrow(table, [C.BUILD_CONFIG_JSON]).column(0).to_pylist()
    if len(rows) != 1:
        raise ValueError(f"{C.META_BUILD_CONFIG} of {lake_root} has {len(rows)} rows, expected 1")
    return int(json.loads(rows[0]).get(C.CONTEXT_TOP_K, C.DEFAULT_CONTEXT_TOP_K))


def build_catalog(items: pd.DataFrame, max_item_categories: int) -> Catalog:
    """items table -> Catalog (sorted by item_id; duplicate ids are an error, not a silent pick)."""
    if items[C.ITEM_ID].duplicated().any():
        raise ValueError("items table has duplicate item_id rows")
    if items.empty:
        raise ValueError("items table is empty")
    items = items.sort_values(C.ITEM_ID)
    padded = [features.pad_context(c, w, max_item_categories)
              for c, w in zip(items[C.CATEGORY_IDS], items[C.CATEGORY_WEIGHTS])]
    return Catalog(item_ids=torch.as_tensor(items[C.ITEM_ID].to_numpy(np.int64)),
                   cat_ids=torch.as_tensor(np.stack([p[0] for p in padded])),
                   cat_weights=torch.as_tensor(np.stack([p[1] for p in padded])))


def check_context_rows(context_rows: pd.DataFrame) -> None:
    """Refuse a context_rows table that lacks a contract column, with what to do about it.

    A lake built before ``subject_item_id`` existed lacks that column; rerunning
    build_sequences adds it in place (pipelines.delta_io.evolve_schema), so the message says so
    instead of failing later on a missing key.
    """
    missing = [c for c in C.CONTEXT_ROWS_COLUMNS if c not in context_rows.columns]
    if missing:
        raise ValueError(f"context_rows lacks columns {missing}: the lake was built by an older "
                         f"version of the jobs; rerun build_sequences on it (it adds them)")


def _context_for(sequences: pd.DataFrame, context_rows: pd.DataFrame, source: str,
                 required: bool) -> pd.DataFrame:
    """Context columns of ``source`` aligned to ``sequences`` rows (NaN where absent).

    Joined on ``ctt_contracts.SEQUENCES_KEY``: (user_id, as_of_ts) alone is ambiguous when a user
    converts on two items in the same second.
    """
    key = C.SEQUENCES_KEY
    rows = context_rows.loc[context_rows[C.CONTEXT_SOURCE] == source,
                            key + [C.CONTEXT_CATEGORY_IDS, C.CONTEXT_WEIGHTS, C.SUBJECT_ITEM_ID]]
    if rows.duplicated(key).any():
        raise ValueError(f"context_rows has duplicate {tuple(key)} keys for source {source!r}")
    merged = sequences[key].merge(rows, on=key, how="left", validate="many_to_one")
    if required:
        missing = merged[C.CONTEXT_CATEGORY_IDS].isna()
        if missing.any():
            raise ValueError(f"{int(missing.sum())} sequences rows have no {source!r} context row; "
                             "the pipelines must write one for every example")
    return merged


def subject_ids(real: pd.DataFrame) -> np.ndarray:
    """(B,) int64 subject item ids of the real context rows aligned to the examples, NO_SUBJECT
    where an example has none; a real row without a subject id is a broken table, not a gap."""
    has_row = real[C.CONTEXT_CATEGORY_IDS].notna().to_numpy()
    missing = real[C.SUBJECT_ITEM_ID].isna().to_numpy()
    broken = has_row & missing
    if broken.any():
        raise ValueError(f"{int(broken.sum())} real context rows have no {C.SUBJECT_ITEM_ID}; "
                         "rebuild context_rows with build_sequences")
    ids = real[C.SUBJECT_ITEM_ID].to_numpy(object)  # exact Python ints (see read_delta)
    return np.array([int(v) if has and not gap else NO_SUBJECT
                     for v, has, gap in zip(ids, has_row, missing)], dtype=np.int64)


def _pad_contexts(ctx: pd.DataFrame, max_ctx: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(ctx), max_ctx), features.PAD_CATEGORY, dtype=np.int64)
    w = np.zeros((len(ctx), max_ctx), dtype=np.float32)
    for i, (c, cw) in enumerate(zip(ctx[C.CONTEXT_CATEGORY_IDS], ctx[C.CONTEXT_WEIGHTS])):
        if isinstance(c, (list, np.ndarray)):
            ids[i], w[i] = features.pad_context(c, cw, max_ctx)
    return ids, w


def demographics_by_user(sequences: pd.DataFrame, users: pd.DataFrame,
                         country_buckets: int) -> np.ndarray:
    """(B, 3) int64 age/country/gender indices; users absent from the users table are unknown (0)."""
    if users[C.USER_ID].duplicated().any():
        raise ValueError("users table has duplicate user_id rows")
    encoded = {int(u): features.encode_demographics(a, c, g, country_buckets)
               for u, a, c, g in zip(users[C.USER_ID], users[C.AGE_BUCKET], users[C.COUNTRY],
                                     users[C.GENDER])}
    unknown = (0, 0, 0)
    out = np.array([encoded.get(int(u), unknown) for u in sequences[C.USER_ID]], dtype=np.int64)
    n_missing = int(sum(int(u) not in encoded for u in sequences[C.USER_ID].unique()))
    if n_missing:
        log.warning("%d users have no users-table row; their demographics are 'unknown'", n_missing)
    return out.reshape(-1, 3)


def build_examples(sequences: pd.DataFrame, context_rows: pd.DataFrame, users: pd.DataFrame,
                   catalog: Catalog, max_len: int, max_ctx: int,
                   country_buckets: int) -> Dict[str, torch.Tensor]:
    """sequences rows of one split -> dict of tensors, one row per example.

    Keys: ITEM_IDS (B, L), EVENT_TS (B, L), CONTEXT_CATEGORY_IDS/WEIGHTS (B, Cx) pseudo
    context, AGE_BUCKET/COUNTRY/GENDER (B,), LABEL_ITEM_ID (B,), LABEL_ROW (B,), USER_ID (B,),
    the real context REAL_CONTEXT_IDS/WEIGHTS (B, Cx) (all padding without a subject item),
    HAS_REAL_CONTEXT (B,) bool, SUBJECT_ITEM_ID (B,) raw ids and SUBJECT_ROW (B,) catalog rows
    (NO_SUBJECT = -1 without a subject item; SUBJECT_ROW is also -1 for a subject missing from
    the catalog).
    """
    sequences = sequences.reset_index(drop=True)
    n = len(sequences)
    hist = np.full((n, max_len), features.PAD_ITEM, dtype=np.int64)
    ts = np.zeros((n, max_len), dtype=np.int64)
    for i, (items, times) in enumerate(zip(sequences[C.ITEM_IDS], sequences[C.EVENT_TS])):
        hist[i], ts[i] = features.pad_history(items, times, max_len)
    pseudo_ids, pseudo_w = _pad_contexts(_context_for(sequences, context_rows, C.CONTEXT_PSEUDO, True),
                                         max_ctx)
    demo = demographics_by_user(sequences, users, country_buckets)
    labels = sequences[C.LABEL_ITEM_ID].to_numpy(np.int64)
    out = {
        C.USER_ID: torch.as_tensor(sequences[C.USER_ID].to_numpy(np.int64)),
        C.ITEM_IDS: torch.as_tensor(hist), C.EVENT_TS: torch.as_tensor(ts),
        C.CONTEXT_CATEGORY_IDS: torch.as_tensor(pseudo_ids),
        C.CONTEXT_WEIGHTS: torch.as_tensor(pseudo_w),
        C.AGE_BUCKET: torch.as_tensor(demo[:, 0]), C.COUNTRY: torch.as_tensor(demo[:, 1]),
        C.GENDER: torch.as_tensor(demo[:, 2]),
        C.LABEL_ITEM_ID: torch.as_tensor(labels),
        LABEL_ROW: torch.as_tensor(catalog.rows_of(labels) if n else np.zeros(0, np.int64)),
    }
    real = _context_for(sequences, context_rows, C.CONTEXT_REAL, False)
    real_ids, real_w = _pad_contexts(real, max_ctx)
    subjects = subject_ids(real)
    out[REAL_CONTEXT_IDS] = torch.as_tensor(real_ids)
    out[REAL_CONTEXT_WEIGHTS] = torch.as_tensor(real_w)
    out[HAS_REAL_CONTEXT] = torch.as_tensor(real[C.CONTEXT_CATEGORY_IDS].notna().to_numpy(bool))
    out[SUBJECT_ITEM_ID] = torch.as_tensor(subjects)
    out[SUBJECT_ROW] = torch.as_tensor(catalog.find_rows(subjects).astype(np.int64))
    return out


def take(tensors: Dict[str, torch.Tensor], idx) -> Dict[str, torch.Tensor]:
    """Row subset of every tensor of an example dict."""
    return {k: v[idx] for k, v in tensors.items()}


class _IndexedTensors(Dataset):
    """Indexed by a LIST of rows (from a BatchSampler): returns a whole batch by fancy indexing."""

    def __init__(self, tensors: Dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.n = int(next(iter(tensors.values())).shape[0])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, rows: List[int]) -> Dict[str, torch.Tensor]:
        return take(self.tensors, torch.as_tensor(rows))


class ShardedBatches(DistributedSampler):
    """Whole batches of row indices for one of ``world_size`` processes.

    Training (``shuffle``): the rows are permuted with a generator seeded by ``seed + epoch``
    (the same permutation on every rank, independent of the global RNG), cut to a multiple of
    ``world_size`` and dealt round-robin, so the shards are disjoint, equally long and every rank
    runs the same number of steps (DDP needs that). Evaluation (no shuffle): rank r takes rows
    r, r + world_size, ... with no padding, so no example is counted twice; the metrics sum
    their states across ranks.

    Why a ``DistributedSampler`` subclass: Lightning replaces the sampler of a dataloader that is
    not one with its own per-row ``DistributedSampler`` under DDP, which would break the
    whole-batch indexing; being one, it is left alone and gets ``set_epoch`` every epoch.

    ``lengths`` (n_rows,) and ``length_buckets`` k > 0 (training only): the epoch's rows (the
    same rows as without) are cut into runs of k batches, each run sorted by length, and the
    batches are then shuffled (``length_bucketed``). Why: the encoder runs over the batch's
    longest history (``trim_left_padding``) with attention quadratic in it; with random batches
    of long-tailed histories almost every batch holds one at the cap (MovieLens-1M: mean 105 of
    200), so about half of the encoder's work is padding.
    """

    def __init__(self, n_rows: int, batch_size: int, shuffle: bool, drop_last: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, lengths: Optional[torch.Tensor] = None,
                 length_buckets: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if length_buckets < 0:
            raise ValueError(f"length_buckets must be >= 0, got {length_buckets}")
        if length_buckets and (lengths is None or len(lengths) != n_rows):
            raise ValueError("length_buckets needs the length of every row")
        super().__init__(range(n_rows), num_replicas=world_size, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=drop_last)
        self.n_rows, self.batch_size = n_rows, batch_size
        self.lengths, self.length_buckets = lengths, length_buckets

    def shard(self, g: Optional[torch.Generator] = None) -> torch.Tensor:
        """(n_shard,) int64 row indices of this rank for the current epoch, in iteration order;
        ``g``: the epoch's generator (``epoch_generator``), to draw more from it afterwards."""
        world, rank = self.num_replicas, self.rank
        if not self.shuffle:
            return torch.arange(rank, self.n_rows, world)
        g = g if g is not None else self.epoch_generator()
        order = torch.randperm(self.n_rows, generator=g)  # (n_rows,)
        return order[: self.n_rows - self.n_rows % world][rank::world]

    def epoch_generator(self) -> torch.Generator:
        """The generator of this epoch's shuffles: seeded by seed + epoch, the same on every rank."""
        return torch.Generator().manual_seed(self.seed + self.epoch)

    def __iter__(self) -> Iterator[List[int]]:  # type: ignore[override]
        g = self.epoch_generator()
        rows = self.shard(g)[: len(self) * self.batch_size]  # (n,) without a dropped short batch
        if self.shuffle and self.length_buckets:
            batches = length_bucketed(rows, self.lengths, self.batch_size, self.length_buckets, g)
        else:
            batches = list(rows.split(self.batch_size))
        for batch in batches:
            yield batch.tolist()

    def __len__(self) -> int:
        n = len(self.shard()) if not self.shuffle else self.n_rows // self.num_replicas
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def length_bucketed(rows: torch.Tensor, lengths: torch.Tensor, batch_size: int, k: int,
                    generator: torch.Generator) -> List[torch.Tensor]:
    """rows (n,) in random order, lengths (n_rows,) -> batches of rows in random order, as many
    as ``batch_size`` would give: each run of ``k * batch_size`` consecutive rows is sorted by
    length and cut into batches of about equal total length (``equal_length_cuts``), so a batch
    of short histories holds more rows than one of long histories.

    Why equal total length and not equal rows: the loss is a mean over a batch's positions, so
    with equal rows a position of a short-history batch would weigh many times more than one of
    a long-history batch. On MovieLens-1M that shifted the objective towards light users and
    cost about a fifth of the validation NDCG@10 (0.152 against 0.187 with random batches, one
    run each); equal-length batches keep every position's weight
    about the same, as random batches do."""
    batches: List[torch.Tensor] = []
    for run in rows.split(k * batch_size):
        ordered = run[torch.argsort(lengths[run], stable=True)]  # (r,)
        n_batches = -(-len(run) // batch_size)
        batches.extend(ordered.tensor_split(equal_length_cuts(lengths[ordered], n_batches)))
    order = torch.randperm(len(batches), generator=generator)
    return [batches[i] for i in order.tolist()]


def equal_length_cuts(lengths: torch.Tensor, n_batches: int) -> List[int]:
    """lengths (r,) of consecutive rows -> ``n_batches - 1`` cut indices giving non-empty batches
    whose summed lengths (each at least 1) are as equal as the rows allow."""
    if not 1 <= n_batches <= len(lengths):
        raise ValueError(f"cannot cut {len(lengths)} rows into {n_batches} non-empty batches")
    cum = lengths.clamp(min=1).cumsum(0).double()  # (r,)
    targets = cum[-1] * torch.arange(1, n_batches, dtype=torch.float64) / n_batches  # (n_batches - 1,)
    cuts = (torch.searchsorted(cum, targets) + 1).tolist()  # a cut after the row reaching the target
    for j in range(len(cuts)):  # non-empty: strictly increasing, room left for the later batches
        low = cuts[j - 1] + 1 if j else 1
        cuts[j] = min(max(cuts[j], low), len(lengths) - (n_batches - 1 - j))
    return cuts


def batch_loader(tensors: Dict[str, torch.Tensor], batch_size: int, shuffle: bool,
                 drop_last: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 length_buckets: int = 0) -> DataLoader:
    """DataLoader yielding dicts of (batch_size, ...) tensors of this rank's shard, no workers,
    no per-row collate; ``length_buckets`` > 0 batches training rows of similar history length
    (see ``ShardedBatches``)."""
    ds = _IndexedTensors(tensors)
    lengths = features.history_lengths(tensors[C.ITEM_IDS]) if length_buckets else None
    sampler = ShardedBatches(len(ds), batch_size, shuffle, drop_last, seed, rank, world_size,
                             lengths, length_buckets)
    # Its own generator: every iter() draws a worker base seed, which would otherwise advance the
    # global RNG at points that differ between a fresh and a resumed run (Lightning creates the
    # first epoch's iterator before on_train_epoch_start), shifting dropout and negatives.
    return DataLoader(ds, sampler=sampler, batch_size=None, generator=torch.Generator().manual_seed(seed))


def process_seed() -> int:
    """The run's seed as ``seed_everything`` publishes it (``PL_GLOBAL_SEED``, the value Lightning's
    own DistributedSampler uses), 0 if unset."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def train_batch_size(n_rows: int, batch_size: int, world_size: int = 1) -> int:
    """The training batch for ``n_rows`` examples dealt to ``world_size`` processes: the
    configured one, or one batch of the whole shard when the shard is smaller.

    Why: training batches of a full size only (the last short one is dropped, so in-batch
    negatives always see a whole batch) would leave a training split smaller than one batch
    -- a small real log, e.g. a few hundred conversions -- with no step at all, and the trainer
    would export its untrained initial weights. Refused when a process would get no row."""
    shard = n_rows // world_size
    if shard < 1:
        raise ValueError(f"{n_rows} training examples cannot be shared by {world_size} processes")
    if shard < batch_size:
        log.warning("the training split has %d examples per process, fewer than batch_size %d: "
                    "training on batches of %d", shard, batch_size, shard)
    return min(batch_size, shard)


class SplitLoaders:
    """What a data module built of example tensors per split hands Lightning and the training
    system: the train / val loaders and the training item frequencies.

    Mixed into a ``LightningDataModule`` that holds ``splits`` (split -> tensors), ``item_counts``
    and the hparams ``batch_size``, ``eval_batch_size``, ``shuffle_seed`` and ``length_buckets``
    (0 = random training batches; k > 0 = batches of similar history length, see
    ``ShardedBatches``). Training batches
    are shuffled, seeded by ``shuffle_seed`` (None = the run's seed, see :func:`process_seed`)
    with the epoch; under DDP each rank iterates its own shard. ``drop_last_train``: drop the
    last short training batch (in-batch negatives would see a smaller batch).
    """

    drop_last_train = True

    def item_frequencies(self) -> torch.Tensor:
        """(N,) label frequency of each catalog item in the TRAIN split, add-one smoothed so an
        item never seen as a label still has a finite logQ."""
        if self.item_counts is None:
            raise RuntimeError("call setup() first")
        counts = self.item_counts + 1.0
        return (counts / counts.sum()).float()

    def _loader(self, split: str, batch_size: int, train: bool) -> DataLoader:
        seed = self.hparams.shuffle_seed if self.hparams.shuffle_seed is not None else process_seed()
        trainer = self.trainer  # (rank, world_size) of this process; (0, 1) outside a trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if train and self.drop_last_train:
            batch_size = train_batch_size(len(self.splits[split][LABEL_ROW]), batch_size, world)
        return batch_loader(self.splits[split], batch_size, shuffle=train,
                            drop_last=train and self.drop_last_train, seed=seed, rank=rank,
                            world_size=world, length_buckets=self.hparams.length_buckets if train else 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(C.SPLIT_TRAIN, self.hparams.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(C.SPLIT_VAL, self.hparams.eval_batch_size, train=False)


class ContextualSequenceDataModule(SplitLoaders, pl.LightningDataModule):
    """Train/val/test example tensors, the catalog and the training item frequencies.

    ``shuffle_seed`` seeds the training order (with the epoch; None = the run's seed, see
    :func:`process_seed`); under DDP each rank iterates its own shard (``ShardedBatches``) and
    ``batch_size`` is per process, so the global batch is ``batch_size x world_size``.
    """

    def __init__(self, lake_root: str, batch_size: int = 512, eval_batch_size: int = 2048,
                 max_len: int = 50, max_ctx: int = 5, max_item_categories: int = 8,
                 country_buckets: int = 64, max_val_examples: Optional[int] = 20000,
                 subsample_seed: int = 0, shuffle_seed: Optional[int] = None,
                 length_buckets: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lake_root = lake_root
        self.input_versions: Dict[str, int] = {}
        self.catalog: Optional[Catalog] = None
        self.splits: Dict[str, Dict[str, torch.Tensor]] = {}
        self.item_counts: Optional[torch.Tensor] = None
        self.items_frame: Optional[pd.DataFrame] = None  # the items table, for the bundle export
        self.context_top_k: int = C.DEFAULT_CONTEXT_TOP_K  # set by setup() from the lake

    def setup(self, stage: Optional[str] = None) -> None:
        if self.catalog is not None:  # fit then test in one process: read the snapshot once
            return
        hp = self.hparams
        frames = {}
        for table in INPUT_TABLES:
            frames[table], self.input_versions[table] = read_delta(self.lake_root, table)
        self.items_frame = frames[C.T_ITEMS]
        self.catalog = build_catalog(self.items_frame, hp.max_item_categories)
        seqs = frames[C.T_SEQUENCES]
        unknown_split = ~seqs[C.SPLIT].isin(C.SPLITS)
        if unknown_split.any():
            raise ValueError(f"{int(unknown_split.sum())} sequences rows have a split outside {C.SPLITS}")
        check_context_rows(frames[C.T_CONTEXT_ROWS])
        self.context_top_k = lake_context_top_k(self.lake_root, frames[C.T_CONTEXT_ROWS])
        for split in C.SPLITS:
            rows = seqs[seqs[C.SPLIT] == split]
            if split == C.SPLIT_VAL and hp.max_val_examples and len(rows) > hp.max_val_examples:
                rows = rows.sample(n=hp.max_val_examples, random_state=hp.subsample_seed)
            self.splits[split] = build_examples(
                rows, frames[C.T_CONTEXT_ROWS], frames[C.T_USERS], self.catalog, hp.max_len,
                hp.max_ctx, hp.country_buckets)
        if len(self.splits[C.SPLIT_TRAIN][LABEL_ROW]) == 0:
            raise ValueError("the sequences table has no train examples")
        self.item_counts = torch.bincount(self.splits[C.SPLIT_TRAIN][LABEL_ROW],
                                          minlength=len(self.catalog)).to(torch.float64)
        log.info("read %s; examples: %s", self.input_versions,
                 {s: len(t[LABEL_ROW]) for s, t in self.splits.items()})

    def test_dataloader(self) -> DataLoader:
        return self._loader(C.SPLIT_TEST, self.hparams.eval_batch_size, train=False)
