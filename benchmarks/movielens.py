"""MovieLens benchmark: our sequence encoder vs RecTools' SASRec on real public data.

What it does, per data set (``../shared/data/ml-100k`` and ``../shared/data/ml-1m-u2999``):

1. Import through the real-log importer (``pipelines.ingest`` on a local[2] SparkSession): every
   rating is a ``conversion`` event; demographics (age, gender) from the users file; genres as
   item categories (0/1 flag columns for 100k, ``Action|Comedy`` names for 1M). Items and users
   go through ``pipelines.validate``; events are checked for parse failures and unknown items
   (see ``check_events`` for why not ``validate_events``).
2. Split leave-one-out by time: each user's last interaction is the test target, the one
   before it the validation target, the rest is train. Timestamp ties (MovieLens has many) are
   broken by item id, and both models receive that exact order.
3. Rank the full catalog (every item with a train interaction; the same corpus for both models)
   with the user's own history excluded, and keep the top 100 per user.
4. RecTools ``SASRecModel`` (n_factors 64, 2 blocks, 1 head, softmax loss, sequence cap 200) in
   its own virtualenv (its pins conflict with ours), built here from
   ``benchmarks/requirements-rectools.txt``; see ``benchmarks/movielens_rectools.py``.
5. This project's ``ContextualTwoTower`` with ``use_context=False``: the sequence encoder alone
   and with demographics. Training examples are every prefix of each user's train sequence
   (next-item prediction at every position, SASRec-style, computed in one causal pass per
   sequence), loss = the softmax over the whole catalog (what sampled softmax becomes when every
   item is a candidate; the logQ term of such a candidate set is a constant and cancels).
6. HR@10, NDCG@10 from the two sides' top-100 lists by ONE function (``hit_ndcg_at_k``); the
   epoch count of every model is picked on validation NDCG@10, and the test figures of that
   epoch are reported.

Budget: every model gets the same CPU-seconds budget per data set (``DEFAULT_BUDGETS``), and
starts another epoch only if it is predicted to finish within it. CPU seconds (process time of
all threads) because the benchmark machine is shared; wall seconds are reported too.

Usage: python benchmarks/movielens.py [--datasets ml-100k ml-1m-u2999] [--budget-scale 1.0]
Prints ``dataset | model | HR@10 | NDCG@10 | train s`` and writes benchmarks/results/movielens.json.
Not part of the test suite (tests/benchmarks/test_movielens_protocol.py tests the protocol code).
Data: GroupLens MovieLens (Harper and Konstan, ACM TiiS 2015), read in place, never copied.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from models import features
from models.data import Catalog, build_catalog
from models.metrics import embedding_scorer, rank_with_scorer
from models.system import ContextualRetrievalSystem
from models.two_tower import ModelConfig, trim_left_padding
from pipelines import contracts as C

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_ROOT = ROOT.parent / "shared" / "data"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "movielens.json"
REQUIREMENTS = ROOT / "benchmarks" / "requirements-rectools.txt"
RECTOOLS_SCRIPT = ROOT / "benchmarks" / "movielens_rectools.py"
VENV_CACHE = Path.home() / ".cache" / "ctt"

K = 10  # HR@K, NDCG@K
TOP_N = 100  # recommendations kept per user (both sides)
SEQ_CAP = 200  # sequence cap of both models
THREADS = 2
HR, NDCG = f"hr@{K}", f"ndcg@{K}"

TS_MS = "ts_ms"  # exchange column: event time in ms, ties broken (strictly increasing per user)
POSITION = "position"  # 0-based index of the event in its user's ordered history

SASREC = "rectools_sasrec"
OURS_SEQ = "ours_sequence"
OURS_DEMO = "ours_sequence_demographics"
MODELS = (SASREC, OURS_SEQ, OURS_DEMO)

# CPU seconds per model and data set (about half that in wall seconds on 2 idle cores).
DEFAULT_BUDGETS = {"ml-100k": 240.0, "ml-1m-u2999": 900.0}


# ======================================================================================
# RecTools virtualenv
# ======================================================================================
def venv_dir(requirements: Path = REQUIREMENTS) -> Path:
    """~/.cache/ctt/rectools-venv-<hash of the requirements file>: a changed pin, a new venv."""
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()[:12]
    return VENV_CACHE / f"rectools-venv-{digest}"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def start_venv_build(venv: Path, requirements: Path = REQUIREMENTS) -> Optional[subprocess.Popen]:
    """Start `pip install` into the venv in the background (None when it is already built).

    Started first because it takes minutes on a cold cache; the data import runs meanwhile.
    A `.ready` marker is written only after a successful install, so a killed install is redone.
    """
    if (venv / ".ready").exists():
        return None
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["python3", "-m", "venv", "--clear", str(venv)], check=True)
    log = open(venv / "install.log", "w")
    return subprocess.Popen([str(venv_python(venv)), "-m", "pip", "install", "-q", "-r",
                             str(requirements)], stdout=log, stderr=subprocess.STDOUT)


def finish_venv_build(venv: Path, proc: Optional[subprocess.Popen]) -> Path:
    """Wait for the background install; raise with the log's tail if it failed."""
    if proc is not None:
        if proc.wait() != 0:
            tail = (venv / "install.log").read_text()[-3000:]
            raise RuntimeError(f"pip install into {venv} failed:\n{tail}")
        (venv / ".ready").write_text(dt.datetime.now(dt.timezone.utc).isoformat())
    return venv_python(venv)


# ======================================================================================
# Import through the real-log importer (Spark)
# ======================================================================================
@dataclass(frozen=True)
class SourceFile:
    """One headerless MovieLens file: name, separator, column names (in file order)."""

    name: str
    sep: str
    columns: Tuple[str, ...]


@dataclass(frozen=True)
class MovieLensSpec:
    """Where a MovieLens variant keeps ratings, users and items, and how its genres look."""

    name: str
    ratings: SourceFile
    users: SourceFile
    items: SourceFile
    genre_flags: bool  # True: 0/1 genre columns (100k); False: one "A|B" genres column (1M)
    encoding: str = "ISO-8859-1"  # both variants are Latin-1 (titles); harmless for ASCII


def genre_names_100k(folder: Path) -> Tuple[str, ...]:
    """u.genre lists the 19 flag columns of u.item in order ("name|index" lines)."""
    lines = [ln for ln in folder.joinpath("u.genre").read_text(encoding="latin-1").splitlines() if ln]
    pairs = sorted((int(i), n) for n, i in (ln.rsplit("|", 1) for ln in lines))
    return tuple(n for _, n in pairs)


def spec_for(name: str, data_root: Path) -> MovieLensSpec:
    """The file layout of a known variant (raises for an unknown name)."""
    if name == "ml-100k":
        genres = genre_names_100k(data_root / name)
        return MovieLensSpec(
            name, SourceFile("u.data", "\t", ("user", "item", "rating", "ts")),
            SourceFile("u.user", "|", ("user", "age", "gender", "occupation", "zip")),
            SourceFile("u.item", "|", ("item", "title", "release", "video_release", "url") + genres),
            genre_flags=True)
    if name == "ml-1m-u2999":
        return MovieLensSpec(
            name, SourceFile("ratings.dat", "::", ("user", "item", "rating", "ts")),
            SourceFile("users.dat", "::", ("user", "gender", "age", "occupation", "zip")),
            SourceFile("movies.dat", "::", ("item", "title", "genres")),
            genre_flags=False)
    raise ValueError(f"unknown data set {name!r}; known: ml-100k, ml-1m-u2999")


@dataclass
class Imported:
    """A data set as pandas frames with contract column names, plus import counts."""

    events: pd.DataFrame  # USER_ID, ITEM_ID, EVENT_TS (epoch seconds)
    items: pd.DataFrame  # ITEMS_COLUMNS (validated, categories sorted)
    users: pd.DataFrame  # USERS_COLUMNS (validated)
    counts: Dict[str, int] = field(default_factory=dict)


def read_headerless(spark, path: Path, source: SourceFile, encoding: str):  # -> DataFrame
    """A headerless delimited file with every column as a string, named by ``source.columns``.

    Not ``ingest.read_source``: that reader has no encoding option and expects a header line.
    """
    df = (spark.read.option("header", "false").option("sep", source.sep)
          .option("encoding", encoding).option("inferSchema", "false").option("mode", "PERMISSIVE")
          .csv(str(path)))
    if len(df.columns) != len(source.columns):
        raise ValueError(f"{path}: {len(df.columns)} columns, expected {len(source.columns)}")
    return df.toDF(*source.columns)


def check_events(events_pd: pd.DataFrame, n_unparsed: int, item_ids: np.ndarray) -> Dict[str, int]:
    """Fail on rows the importer could not parse; drop (and count) events of unknown items.

    Why not ``validate.validate_events``: it quarantines events before 2000-01-01 as
    ``timestamp_before_2000``, i.e. every MovieLens 100k rating (1997-98).
    """
    if n_unparsed:
        raise ValueError(f"{n_unparsed} rating rows failed to parse at import")
    known = np.isin(events_pd[C.ITEM_ID].to_numpy(), item_ids)
    return {"events_unknown_item": int((~known).sum())}


def import_movielens(spark, spec: MovieLensSpec, data_root: Path) -> Imported:
    """ratings/users/items files -> validated pandas frames through pipelines.ingest."""
    from pyspark.sql import functions as Fs

    from pipelines import ingest, validate
    from pipelines.delta_io import RAW_ROW_JSON

    folder = data_root / spec.name
    read = lambda src: read_headerless(spark, folder / src.name, src, spec.encoding)  # noqa: E731
    events = ingest.events_from_source(read(spec.ratings), ingest.EventMapping(
        user_col="user", item_col="item", ts_col="ts", ts_format=ingest.TS_EPOCH_SECONDS,
        event_type=C.EVENT_CONVERSION))
    if spec.genre_flags:
        item_map = ingest.ItemMapping(item_col="item", category_flag_cols=spec.items.columns[5:])
    else:
        item_map = ingest.ItemMapping(item_col="item", categories_col="genres", category_sep="|")
    raw_items, vocab = ingest.items_from_source(read(spec.items), item_map)
    raw_users = ingest.users_from_source(read(spec.users), ingest.UserMapping(
        user_col="user", age_col="age", gender_col="gender"))
    items, items_q = validate.validate_items(raw_items)
    users, users_q = validate.validate_users(raw_users)
    events = events.cache()
    unparsed = events.where(Fs.col(RAW_ROW_JSON).isNotNull() | Fs.col(C.USER_ID).isNull()
                            | Fs.col(C.ITEM_ID).isNull() | Fs.col(C.EVENT_TS).isNull()).count()
    events_pd = events.select(C.USER_ID, C.ITEM_ID, Fs.unix_seconds(C.EVENT_TS).alias(C.EVENT_TS)
                              ).toPandas()
    items_pd, users_pd = items.toPandas(), users.toPandas()
    counts = {"events": len(events_pd), "items": len(items_pd), "users": len(users_pd),
              "items_quarantined": items_q.count(), "users_quarantined": users_q.count(),
              "categories": len(vocab)}
    counts.update(check_events(events_pd, unparsed, items_pd[C.ITEM_ID].to_numpy()))
    events_pd = events_pd[np.isin(events_pd[C.ITEM_ID], items_pd[C.ITEM_ID])]
    return Imported(events_pd.astype({C.USER_ID: np.int64, C.ITEM_ID: np.int64,
                                      C.EVENT_TS: np.int64}), items_pd, users_pd, counts)


def import_all(names: Sequence[str], data_root: Path) -> Dict[str, Imported]:
    """Import every data set on one local[2] session, then stop it (frees the 2 cores' JVM)."""
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pipelines.spark import get_spark

    spark = get_spark("ctt-movielens-benchmark", master="local[2]", shuffle_partitions=4)
    try:
        return {n: import_movielens(spark, spec_for(n, data_root), data_root) for n in names}
    finally:
        spark.stop()


# ======================================================================================
# Protocol: ordering, leave-one-out split, histories, the shared metric
# ======================================================================================
def order_events(events: pd.DataFrame) -> pd.DataFrame:
    """Each user's events ordered by (time, item id), with a strictly increasing ms timestamp.

    MovieLens logs many ratings of a user in the same second; the item id breaks the tie
    deterministically and ``TS_MS`` carries that order to RecTools (which sorts by time).
    """
    df = events[[C.USER_ID, C.ITEM_ID, C.EVENT_TS]].sort_values(
        [C.USER_ID, C.EVENT_TS, C.ITEM_ID], kind="mergesort").reset_index(drop=True)
    tie = df.groupby([C.USER_ID, C.EVENT_TS]).cumcount().to_numpy()
    if (tie >= 1000).any():
        raise ValueError("more than 1000 events of one user in one second: ms tie-break overflows")
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
    users_dropped: int  # users with fewer than 3 events (no train history)

    @property
    def users(self) -> np.ndarray:
        return self.test[C.USER_ID].to_numpy()


def leave_one_out(events: pd.DataFrame, min_events: int = 3) -> Split:
    """Split ordered events: last -> test, second-to-last -> validation, the rest -> train."""
    df = order_events(events)
    n = df.groupby(C.USER_ID)[C.ITEM_ID].transform("size")
    keep = n >= min_events
    dropped = int(df.loc[~keep, C.USER_ID].nunique())
    df, n = df[keep], n[keep]
    from_end = n - 1 - df[POSITION]
    train = df[from_end >= 2].reset_index(drop=True)
    val = df[from_end == 1].sort_values(C.USER_ID).reset_index(drop=True)
    test = df[from_end == 0].sort_values(C.USER_ID).reset_index(drop=True)
    return Split(train, val, test, np.sort(train[C.ITEM_ID].unique()), dropped)


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


def targets(split: Split, phase: str) -> pd.DataFrame:
    return split.val if phase == C.SPLIT_VAL else split.test


def grouped(frame: pd.DataFrame, users: np.ndarray, column: str) -> List[np.ndarray]:
    """``frame[column]`` per user in the order of ``users`` (frame sorted by user; empty array
    for a user without rows)."""
    values = frame[column].to_numpy()
    ids = frame[C.USER_ID].to_numpy()
    starts = np.searchsorted(ids, users, side="left")
    stops = np.searchsorted(ids, users, side="right")
    return [values[a:b] for a, b in zip(starts, stops)]


def hit_ndcg_at_k(top_lists: Sequence[Sequence[int]], target_items: Sequence[int],
                  k: int = K) -> Dict[str, float]:
    """THE metric of the benchmark, applied to both models' ranked lists.

    One relevant item per user: HR@k = share of users whose target is in their top k; NDCG@k =
    mean of 1/log2(rank + 2) over users whose target is at 0-based rank < k (ideal DCG = 1).
    A user with an empty list (a model could not rank for them) counts as a miss.
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
    return {HR: hits / n, NDCG: gains / n}


def history_violations(top_lists: Sequence[Sequence[int]], histories: Sequence[np.ndarray]) -> int:
    """How many recommended items are in the user's own history (must be 0 on both sides)."""
    return sum(len(set(top) & set(h.tolist())) for top, h in zip(top_lists, histories))


def write_exchange(split: Split, workdir: Path) -> None:
    """train.csv and test_history.csv for the RecTools side (ordered, ms ties broken)."""
    cols = [C.USER_ID, C.ITEM_ID, TS_MS]
    split.train[cols].to_csv(workdir / "train.csv", index=False)
    pd.concat([split.train, split.val])[cols].sort_values([C.USER_ID, TS_MS]).to_csv(
        workdir / "test_history.csv", index=False)


# ======================================================================================
# Our model
# ======================================================================================
@dataclass(frozen=True)
class OurRecipe:
    """Training recipe of our model on MovieLens (architecture in ModelConfig)."""

    use_demographics: bool = False
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 1
    dropout: float = 0.2
    lr: float = 2e-3
    weight_decay: float = 0.0
    temperature: float = 0.05
    learn_temperature: bool = True
    n_negatives: int = 0  # 0 = every catalog item is a candidate (exact softmax)
    batch_size: int = 128
    max_epochs: int = 500
    item_buckets: int = 16384

    def model_config(self) -> ModelConfig:
        return ModelConfig(dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
                           max_len=SEQ_CAP, dropout=self.dropout, item_buckets=self.item_buckets,
                           use_context=False, use_demographics=self.use_demographics)


@dataclass
class Batchable:
    """Per-user tensors in the order of ``Split.users``."""

    items: torch.Tensor  # (U, L) left-padded item ids (PAD_ITEM)
    ts: torch.Tensor  # (U, L) epoch seconds, 0 on padding
    demo: torch.Tensor  # (U, 3) age / country / gender indices


def pad_per_user(items: List[np.ndarray], ts: List[np.ndarray], length: int
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Lists of per-user arrays -> (U, length) left-padded tensors (newest last)."""
    padded = [features.pad_history(i, t, length) for i, t in zip(items, ts)]
    return (torch.as_tensor(np.stack([p[0] for p in padded])),
            torch.as_tensor(np.stack([p[1] for p in padded])))


def demographics(users_frame: pd.DataFrame, users: np.ndarray, country_buckets: int) -> torch.Tensor:
    """(U, 3) demographic indices via the ONE feature encoder; a user without a row = unknown."""
    enc = {int(u): features.encode_demographics(a, c, g, country_buckets)
           for u, a, c, g in zip(users_frame[C.USER_ID], users_frame[C.AGE_BUCKET],
                                 users_frame[C.COUNTRY], users_frame[C.GENDER])}
    return torch.as_tensor(np.array([enc.get(int(u), (0, 0, 0)) for u in users], dtype=np.int64))


def user_tensors(split: Split, frame: pd.DataFrame, users_frame: pd.DataFrame, length: int,
                 country_buckets: int) -> Batchable:
    users = split.users
    items, ts = pad_per_user(grouped(frame, users, C.ITEM_ID), grouped(frame, users, C.EVENT_TS),
                             length)
    return Batchable(items, ts, demographics(users_frame, users, country_buckets))


def catalog_rows(catalog: Catalog, items: torch.Tensor) -> torch.Tensor:
    """Item ids (any shape, PAD_ITEM allowed) -> catalog rows (-1 where padding)."""
    flat = items.reshape(-1).numpy()
    rows = np.full(flat.shape, -1, dtype=np.int64)
    real = flat != features.PAD_ITEM
    rows[real] = catalog.rows_of(flat[real])
    return torch.as_tensor(rows).reshape(items.shape)


def encoder_states(system: ContextualRetrievalSystem, items: torch.Tensor,
                   ts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hidden state at EVERY position (the last one is ``encode_user_state``): items/ts (B, L)
    -> hidden (B, L, D), valid (B, L). Position t sees events <= t only (causal encoder)."""
    model = system.model
    valid = items != features.PAD_ITEM  # (B, L)
    tokens = model.item_emb(items)  # (B, L, D)
    gaps = features.time_gap_buckets(ts, valid, model.config.n_time_buckets)  # (B, L)
    return model.encoder(tokens, gaps, valid), valid  # (B, L, D), (B, L)


def demo_inputs(system: ContextualRetrievalSystem, demo: torch.Tensor
                ) -> Tuple[Optional[torch.Tensor], ...]:
    if not system.config.use_demographics:
        return None, None, None
    return demo[:, 0], demo[:, 1], demo[:, 2]


def all_positions_loss(system: ContextualRetrievalSystem, recipe: OurRecipe, items: torch.Tensor,
                       ts: torch.Tensor, rows: torch.Tensor, demo: torch.Tensor) -> torch.Tensor:
    """Next-item softmax at every position of a batch of train sequences.

    items/ts/rows (B, L+1): the newest L+1 train events per user (rows = catalog rows, -1 pad),
    demo (B, 3). Input = events 0..L-1, target = events 1..L: each position is one prefix
    example (its history = the events up to it). Candidates: the whole catalog, or the positive
    plus ``n_negatives`` uniform items shared by the batch (uniform proposal: its logQ term is
    the same for every negative and cancels; accidental hits are masked).
    """
    inp, inp_ts = trim_left_padding(items[:, :-1], ts[:, :-1])  # (B, L')
    target = rows[:, 1:][:, -inp.shape[1]:]  # (B, L')
    hidden, valid = encoder_states(system, inp, inp_ts)  # (B, L', D), (B, L')
    where = valid.nonzero(as_tuple=True)  # P positions
    age, country, gender = demo_inputs(system, demo)
    pick = (lambda t: None if t is None else t[where[0]])  # noqa: E731
    user = system.model.query_from_state(hidden[where], None, None, pick(age), pick(country),
                                         pick(gender))  # (P, D)
    pos_rows = target[where]  # (P,)
    item_emb = system.catalog_embeddings()  # (N, D): the item tower once per step
    temperature = system.temperature
    if recipe.n_negatives <= 0:
        return F.cross_entropy(user @ item_emb.T / temperature, pos_rows)  # logits (P, N)
    neg_rows = torch.randint(0, len(system.catalog), (recipe.n_negatives,))  # (U,)
    pos_logit = (user * item_emb[pos_rows]).sum(-1, keepdim=True) / temperature  # (P, 1)
    neg_logit = (user @ item_emb[neg_rows].T / temperature).masked_fill(
        neg_rows.unsqueeze(0) == pos_rows.unsqueeze(1), -math.inf)  # (P, U)
    logits = torch.cat([pos_logit, neg_logit], dim=1)  # (P, 1 + U)
    return F.cross_entropy(logits, torch.zeros(len(pos_rows), dtype=torch.long))


@torch.no_grad()
def our_top_lists(system: ContextualRetrievalSystem, hist: Batchable, exclude: torch.Tensor,
                  target_items: np.ndarray, chunk: int = 512) -> List[List[int]]:
    """Top-N item ids per user from the served path (encode_user_state -> query_from_state),
    ranked over the catalog by ``models.metrics.rank_with_scorer`` with the history excluded.

    exclude (U, H) catalog rows of each user's whole history (-1 pad). A target outside the
    catalog cannot be ranked; rank_with_scorer still needs a column, so such a user gets a
    catalog row outside their history as a stand-in (only the top lists are used here).
    """
    system.eval()
    catalog = system.catalog
    users = []
    for start in range(0, hist.items.shape[0], chunk):
        sl = slice(start, start + chunk)
        state = system.model.encode_user_state(hist.items[sl], hist.ts[sl])  # (b, D)
        age, country, gender = demo_inputs(system, hist.demo[sl])
        users.append(system.model.query_from_state(state, None, None, age, country, gender))
    user_emb = torch.cat(users)  # (U, D)
    item_emb = system.catalog_embeddings()  # (N, D)
    target_idx = stand_in_targets(catalog, target_items, exclude)
    _, top = rank_with_scorer(embedding_scorer(user_emb, item_emb), target_idx, len(catalog),
                              exclude=exclude, top_k=TOP_N)
    system.train()
    return catalog.item_ids[top].tolist()


def stand_in_targets(catalog: Catalog, target_items: np.ndarray, exclude: torch.Tensor) -> torch.Tensor:
    """Catalog row of each target; for a target outside the catalog, the first row not in the
    user's history (so the exclusion of rank_with_scorer, which never drops the target, holds)."""
    ids = catalog.item_ids.numpy()
    pos = np.minimum(np.searchsorted(ids, target_items), len(ids) - 1)
    rows = pos.copy()
    for u in np.nonzero(ids[pos] != target_items)[0]:
        taken = set(exclude[u].tolist())
        rows[u] = next(r for r in range(len(ids)) if r not in taken)
    return torch.as_tensor(rows, dtype=torch.long)


def exclusion_rows(catalog: Catalog, histories: List[np.ndarray]) -> torch.Tensor:
    """(U, H) catalog rows of each user's whole history, -1 padded (H = longest history)."""
    width = max(1, max(len(h) for h in histories))
    out = np.full((len(histories), width), -1, dtype=np.int64)
    for u, h in enumerate(histories):
        if len(h):
            out[u, : len(h)] = catalog.rows_of(h)
    return torch.as_tensor(out)


@dataclass
class Phase:
    """Everything needed to rank one phase (validation or test) for every user."""

    hist: Batchable
    exclude: torch.Tensor
    target_items: np.ndarray
    histories: List[np.ndarray]


def make_phase(split: Split, phase: str, catalog: Catalog, users_frame: pd.DataFrame,
               country_buckets: int) -> Phase:
    frame = history_frame(split, phase)
    histories = grouped(frame, split.users, C.ITEM_ID)
    return Phase(user_tensors(split, frame, users_frame, SEQ_CAP, country_buckets),
                 exclusion_rows(catalog, histories),
                 targets(split, phase)[C.ITEM_ID].to_numpy(), histories)


def train_ours(split: Split, imported: Imported, recipe: OurRecipe, cpu_budget: float,
               seed: int) -> Dict[str, object]:
    """Train with every prefix as an example; pick the epoch on validation NDCG@10; test it."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    config = recipe.model_config()
    items_frame = imported.items[np.isin(imported.items[C.ITEM_ID], split.catalog)]
    catalog = build_catalog(items_frame, config.max_item_categories)
    if len(catalog) != len(split.catalog):
        raise ValueError(f"{len(split.catalog) - len(catalog)} catalog items lack an items row")
    train = user_tensors(split, split.train, imported.users, SEQ_CAP + 1, config.country_buckets)
    train_rows = catalog_rows(catalog, train.items)  # (U, L+1)
    counts = torch.bincount(train_rows[train_rows >= 0], minlength=len(catalog)).double() + 1.0
    system = ContextualRetrievalSystem(config, lr=recipe.lr, weight_decay=recipe.weight_decay,
                                       temperature=recipe.temperature,
                                       learn_temperature=recipe.learn_temperature,
                                       logq_correction=False, history_drop_prob=0.0)
    system.attach_data(catalog, (counts / counts.sum()).float())
    optimizer = system.configure_optimizers()
    val = make_phase(split, C.SPLIT_VAL, catalog, imported.users, config.country_buckets)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    epoch_cpu: List[float] = []
    curve: List[Dict[str, float]] = []
    best: Tuple[float, int, Optional[dict]] = (-1.0, 0, None)
    system.train()
    for epoch in range(1, recipe.max_epochs + 1):
        for idx in torch.randperm(len(split.users)).split(recipe.batch_size):
            loss = all_positions_loss(system, recipe, train.items[idx], train.ts[idx],
                                      train_rows[idx], train.demo[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scores = hit_ndcg_at_k(our_top_lists(system, val.hist, val.exclude, val.target_items),
                               val.target_items)
        epoch_cpu.append(time.process_time() - cpu0)
        curve.append({"epoch": epoch, "val_" + NDCG: scores[NDCG], "val_" + HR: scores[HR],
                      "loss": float(loss), "cpu_s": epoch_cpu[-1],
                      "wall_s": time.perf_counter() - wall0})
        if scores[NDCG] > best[0]:
            best = (scores[NDCG], epoch, copy.deepcopy(system.state_dict()))
        last = epoch_cpu[-1] - (epoch_cpu[-2] if len(epoch_cpu) > 1 else 0.0)
        if epoch_cpu[-1] + last > cpu_budget:
            break
    train_wall, train_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    system.load_state_dict(best[2])
    test = make_phase(split, C.SPLIT_TEST, catalog, imported.users, config.country_buckets)
    test_lists = our_top_lists(system, test.hist, test.exclude, test.target_items)
    val_lists = our_top_lists(system, val.hist, val.exclude, val.target_items)
    return {
        **hit_ndcg_at_k(test_lists, test.target_items),
        "val": hit_ndcg_at_k(val_lists, val.target_items),
        "train_wall_s": train_wall, "train_cpu_s": train_cpu, "epochs_run": len(curve),
        "best_epoch": best[1], "history_violations": history_violations(test_lists, test.histories),
        "recipe": asdict(recipe), "curve": curve,
    }


# ======================================================================================
# RecTools SASRec (separate process)
# ======================================================================================
SASREC_PARAMS = {"n_factors": 64, "n_blocks": 2, "n_heads": 1, "loss": "softmax",
                 "session_max_len": SEQ_CAP}


def run_sasrec(split: Split, python: Path, cpu_budget: float, seed: int,
               candidates: int = 3, max_epochs: int = 500) -> Dict[str, object]:
    """Exchange files -> movielens_rectools.py in the RecTools venv -> rankings -> our metric."""
    users = [int(u) for u in split.users]
    with tempfile.TemporaryDirectory(prefix="ctt-movielens-") as tmp:
        workdir = Path(tmp)
        write_exchange(split, workdir)
        request = {"val_users": users, "test_users": users, "cpu_budget_seconds": cpu_budget,
                   "max_epochs": max_epochs, "candidates": candidates, "k": TOP_N, "seed": seed,
                   "threads": THREADS, "model": SASREC_PARAMS}
        (workdir / "request.json").write_text(json.dumps(request))
        wall0 = time.perf_counter()
        proc = subprocess.run([str(python), str(RECTOOLS_SCRIPT), "--workdir", str(workdir)],
                              capture_output=True, text=True)
        process_wall = time.perf_counter() - wall0
        if proc.returncode != 0:
            raise RuntimeError(f"RecTools side failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        result = json.loads((workdir / "result.json").read_text())
    val_targets = split.val[C.ITEM_ID].to_numpy()
    test_targets = split.test[C.ITEM_ID].to_numpy()
    scored = [(hit_ndcg_at_k(s["val"], val_targets), s) for s in result["snapshots"]]
    best_val, best = max(scored, key=lambda vs: (vs[0][NDCG], vs[0][HR], -vs[1]["epoch"]))
    test_hist = grouped(history_frame(split, C.SPLIT_TEST), split.users, C.ITEM_ID)
    epoch = best["epoch"]
    return {
        **hit_ndcg_at_k(best["test"], test_targets),
        "val": best_val,
        "train_wall_s": result["epoch_end_wall_seconds"][-1],
        "train_cpu_s": result["epoch_end_cpu_seconds"][-1],
        "epochs_run": len(result["val_loss"]), "best_epoch": epoch,
        "history_violations": history_violations(best["test"], test_hist),
        "ranked_epochs": {s["epoch"]: v for v, s in scored},
        "rectools_val_loss": result["val_loss"], "process_wall_s": process_wall,
        "params": SASREC_PARAMS, "versions": {"rectools": result["rectools"],
                                              "torch": result["torch"]},
    }


# ======================================================================================
# Report
# ======================================================================================
def machine_info() -> Dict[str, object]:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu_count": os.cpu_count(), "ram_gib": round(ram, 1), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": THREADS}


def ratios(figures: Dict[str, Dict[str, object]]) -> Dict[str, Dict[str, float]]:
    """Each model's HR/NDCG over the baseline's (RecTools SASRec)."""
    base = figures.get(SASREC)
    if base is None:
        return {}
    return {m: {k: (f[k] / base[k] if base[k] else math.inf) for k in (HR, NDCG)}
            for m, f in figures.items() if m != SASREC}


def bar_met(figures: Dict[str, Dict[str, object]]) -> Optional[bool]:
    """Our sequence encoder beats SASRec on both HR@10 and NDCG@10 (None if either is missing)."""
    if SASREC not in figures or OURS_SEQ not in figures:
        return None
    return all(figures[OURS_SEQ][k] > figures[SASREC][k] for k in (HR, NDCG))


def table(results: Dict[str, Dict[str, object]]) -> str:
    lines = [f"{'dataset':<13} | {'model':<28} | {'HR@10':>7} | {'NDCG@10':>7} | {'train s':>8} | "
             f"{'cpu s':>7} | epochs (best)"]
    for name, res in results.items():
        for model, f in res["models"].items():
            lines.append(f"{name:<13} | {model:<28} | {f[HR]:>7.4f} | {f[NDCG]:>7.4f} | "
                         f"{f['train_wall_s']:>8.1f} | {f['train_cpu_s']:>7.1f} | "
                         f"{f['epochs_run']} ({f['best_epoch']})")
    return "\n".join(lines)


def split_info(split: Split) -> Dict[str, int]:
    return {"users": len(split.users), "users_dropped": split.users_dropped,
            "train_events": len(split.train), "catalog": len(split.catalog),
            "val_targets_outside_catalog": int((~np.isin(split.val[C.ITEM_ID], split.catalog)).sum()),
            "test_targets_outside_catalog": int((~np.isin(split.test[C.ITEM_ID], split.catalog)).sum())}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DEFAULT_BUDGETS))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="multiply every model's CPU-seconds budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    started, load_before = time.perf_counter(), os.getloadavg()
    venv = venv_dir()
    venv_proc = start_venv_build(venv) if SASREC in args.models else None
    imported = import_all(args.datasets, args.data_root)
    import_s = time.perf_counter() - started
    python = finish_venv_build(venv, venv_proc) if SASREC in args.models else None
    results: Dict[str, Dict[str, object]] = {}
    for name in args.datasets:
        split = leave_one_out(imported[name].events)
        budget = DEFAULT_BUDGETS.get(name, max(DEFAULT_BUDGETS.values())) * args.budget_scale
        figures: Dict[str, Dict[str, object]] = {}
        for model in args.models:
            if model == SASREC:
                figures[model] = run_sasrec(split, python, budget, args.seed)
            else:
                recipe = OurRecipe(use_demographics=model == OURS_DEMO)
                figures[model] = train_ours(split, imported[name], recipe, budget, args.seed)
            print(f"{name} {model}: {HR} {figures[model][HR]:.4f} {NDCG} {figures[model][NDCG]:.4f}",
                  flush=True)
        results[name] = {"import": imported[name].counts, "split": split_info(split),
                         "cpu_budget_s_per_model": budget, "models": figures,
                         "ratios_vs_baseline": ratios(figures), "bar_met": bar_met(figures)}
    report = {
        "benchmark": "movielens", "date": dt.datetime.now(dt.timezone.utc).isoformat(),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(), "load": {"before": load_before, "after": os.getloadavg()},
        "note": "the machine was shared while this ran: wall seconds include other processes' "
                "load (see 'load'); budgets are CPU seconds of the training process",
        "protocol": {"split": "leave-one-out by time (ties by item id): last = test, "
                              "second-to-last = validation", "ranking": "full catalog (items "
                     "with a train interaction), user's history excluded", "k": K, "top_n": TOP_N,
                     "epoch_selection": "best validation NDCG@10", "sequence_cap": SEQ_CAP},
        "baseline": SASREC, "bar": f"{OURS_SEQ} beats {SASREC} on HR@10 and NDCG@10 on every data set",
        "bar_met": all(r["bar_met"] for r in results.values()) if results else None,
        "import_s": import_s, "total_wall_s": time.perf_counter() - started, "datasets": results,
    }
    print(table(results))
    print(f"bar met: {report['bar_met']}; total {report['total_wall_s']:.0f} s; "
          f"load {report['load']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
