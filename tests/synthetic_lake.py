"""A small pandas-only lake with the planted structure of the synthetic data, for model tests
and the training benchmark.

Why it exists beside pipelines/synthetic.py: model tests must run without Spark (the trainer
reads Delta with ``deltalake``), so they build tiny Delta tables directly with
``deltalake.write_deltalake``. The planted signal is the one the pipelines' generator plants:

- every item has a primary category (plus 0-2 weaker ones) and a style;
- every user has a style and a few long-term interest categories;
- each conversion session has an intent category: one of the user's interests with probability
  ``p_interest`` (0.2), else a random category;
- the converted item (the label) is in the intent category, usually in the user's style;
- the session's subject item (the REAL context) is another item of the intent category.

So the history reveals the style and (weakly) the interests, the context reveals the intent
category, and only a model using both ranks the label high. The output tables follow
ctt_contracts exactly (sequences, context_rows with pseudo + real rows, items, users).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import numpy as np
import pandas as pd
import pyarrow as pa
from deltalake import write_deltalake

import ctt_contracts as C

SEQUENCE_CAP = 100
_START_TS = 1_700_000_000  # 2023-11-14, epoch seconds


@dataclass(frozen=True)
class FixtureSpec:
    n_users: int = 300
    n_items: int = 200
    n_categories: int = 10
    n_styles: int = 4
    p_interest: float = 0.2
    p_style: float = 0.8
    popularity_exponent: float = 0.8
    sessions_mean: float = 6.0  # sessions per user: 1 + Poisson(sessions_mean - 1)
    p_convert: float = 0.7  # a session converts with this probability
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    context_top_k: int = C.DEFAULT_CONTEXT_TOP_K
    seed: int = 0


_COUNTRIES = ("US", "GB", "DE", "FR", "BR", "IN", "JP", "MX", "CA", "AU")


def _items(spec: FixtureSpec, rng: np.random.Generator) -> pd.DataFrame:
    n, n_cat = spec.n_items, spec.n_categories
    primary = rng.permutation(np.arange(n) % n_cat)  # balanced primary categories
    cats, weights = [], []
    for p in primary:
        others = rng.choice(np.setdiff1d(np.arange(n_cat), [p]), size=rng.integers(0, 3), replace=False)
        w0 = rng.uniform(0.6, 1.0)
        w = np.concatenate([[w0], np.sort(rng.uniform(0.05, 0.95 * w0, len(others)))[::-1]])
        cats.append(np.concatenate([[p], others]).astype(np.int32).tolist())
        weights.append(w.astype(np.float32).tolist())
    return pd.DataFrame({
        C.ITEM_ID: np.arange(n, dtype=np.int64) * 7 + 1000,  # sparse, non-contiguous ids
        C.CATEGORY_IDS: cats, C.CATEGORY_WEIGHTS: weights,
        C.ADVERTISER_ID: rng.integers(0, 50, n).astype(np.int64),
        "_primary": primary, "_style": rng.integers(0, spec.n_styles, n),
        "_pop": (rng.permutation(n) + 1.0) ** -spec.popularity_exponent,
    })


def _users(spec: FixtureSpec, rng: np.random.Generator) -> pd.DataFrame:
    """Users with 2-3 interests (first = primary) and a style; demographics lean on the primary
    interest (as in the pipelines' generator) so they carry a little signal."""
    n = spec.n_users
    interests = [rng.choice(spec.n_categories, int(rng.integers(2, 4)), replace=False) for _ in range(n)]
    first = np.array([i[0] for i in interests])
    lean = rng.random((n, 3)) < 0.6
    return pd.DataFrame({
        C.USER_ID: np.arange(n, dtype=np.int64) + 1,
        C.AGE_BUCKET: np.where(lean[:, 0], 1 + (3 * first) % 7, rng.integers(1, 8, n)).astype(np.int32),
        C.COUNTRY: np.where(lean[:, 1], np.array(_COUNTRIES)[first % len(_COUNTRIES)],
                            rng.choice(_COUNTRIES, n)),
        C.GENDER: np.where(lean[:, 2], np.where(first % 2 == 0, "f", "m"), rng.choice(list(C.GENDERS), n)),
        "_style": rng.integers(0, spec.n_styles, n), "_interests": interests,
    })


def _sampler(pop: np.ndarray, members: np.ndarray):
    """Popularity-weighted draw from ``members`` given a uniform number."""
    cum = np.cumsum(pop[members])
    return lambda u: members[min(int(np.searchsorted(cum, u * cum[-1], side="right")), len(members) - 1)]


def _conversions(spec: FixtureSpec, items: pd.DataFrame, users: pd.DataFrame,
                 rng: np.random.Generator) -> pd.DataFrame:
    """One row per conversion: user, label item, time, subject item (the REAL context)."""
    primary, style, pop = items["_primary"].to_numpy(), items["_style"].to_numpy(), items["_pop"].to_numpy()
    in_cat = {c: _sampler(pop, np.flatnonzero(primary == c)) for c in range(spec.n_categories)}
    in_bucket = {}
    for c in range(spec.n_categories):
        for s in range(spec.n_styles):
            members = np.flatnonzero((primary == c) & (style == s))
            in_bucket[c, s] = _sampler(pop, members) if len(members) else in_cat[c]
    rows = []
    for user_id, user_style, interests in zip(users[C.USER_ID], users["_style"], users["_interests"]):
        t = _START_TS + int(rng.integers(0, 30 * 86400))
        n_conversions = rng.binomial(1 + rng.poisson(spec.sessions_mean - 1), spec.p_convert)
        for _ in range(int(n_conversions)):
            t += int(rng.exponential(20 * 86400)) + 60
            u = rng.random(4)
            intent = rng.choice(interests) if u[0] < spec.p_interest else int(rng.integers(spec.n_categories))
            item_style = user_style if u[1] < spec.p_style else int(rng.integers(spec.n_styles))
            rows.append((user_id, in_bucket[intent, item_style](u[2]), t, in_cat[intent](u[3])))
    conv = pd.DataFrame(rows, columns=[C.USER_ID, "_row", "_ts", "_subject_row"])
    conv[C.ITEM_ID] = items[C.ITEM_ID].to_numpy()[conv["_row"]]
    conv[C.SUBJECT_ITEM_ID] = items[C.ITEM_ID].to_numpy()[conv["_subject_row"]]
    return conv.sort_values([C.USER_ID, "_ts"], kind="stable").reset_index(drop=True)


def _top_k(items: pd.DataFrame, item_ids: np.ndarray, k: int) -> tuple[list, list]:
    """The context of each item as the build writes it (``ctt_contracts.project_context``)."""
    lookup = items.set_index(C.ITEM_ID)
    projected = [C.project_context(lookup.at[i, C.CATEGORY_IDS], lookup.at[i, C.CATEGORY_WEIGHTS], k)
                 for i in item_ids]
    return [p[0] for p in projected], [p[1] for p in projected]


def build_tables(spec: FixtureSpec) -> Dict[str, pd.DataFrame]:
    """The four tables the trainer reads (plus the hidden planted variables in '_' columns)."""
    rng = np.random.default_rng(spec.seed)
    items, users = _items(spec, rng), _users(spec, rng)
    conv = _conversions(spec, items, users, rng)
    seq_rows = []
    for user_id, group in conv.groupby(C.USER_ID, sort=False):
        ids, ts, subj = group[C.ITEM_ID].to_numpy(), group["_ts"].to_numpy(), group[C.SUBJECT_ITEM_ID].to_numpy()
        for k in range(1, len(ids)):
            seq_rows.append((user_id, ts[k], ids[max(0, k - SEQUENCE_CAP):k].tolist(),
                             ts[max(0, k - SEQUENCE_CAP):k].tolist(), ids[k], subj[k]))
    seqs = pd.DataFrame(seq_rows, columns=[C.USER_ID, "_ts", C.ITEM_IDS, C.EVENT_TS,
                                           C.LABEL_ITEM_ID, "_subject"])
    t_val, t_test = np.quantile(seqs["_ts"], [1 - spec.val_fraction - spec.test_fraction,
                                              1 - spec.test_fraction])
    seqs[C.SPLIT] = np.where(seqs["_ts"] >= t_test, C.SPLIT_TEST,
                             np.where(seqs["_ts"] >= t_val, C.SPLIT_VAL, C.SPLIT_TRAIN))
    seqs[C.AS_OF_TS] = pd.to_datetime(seqs["_ts"], unit="s", utc=True)
    ctx = []
    for source, id_col in ((C.CONTEXT_PSEUDO, C.LABEL_ITEM_ID), (C.CONTEXT_REAL, "_subject")):
        cats, weights = _top_k(items, seqs[id_col].to_numpy(), spec.context_top_k)
        subject = seqs["_subject"] if source == C.CONTEXT_REAL else None  # pseudo rows: null
        ctx.append(pd.DataFrame({C.USER_ID: seqs[C.USER_ID], C.AS_OF_TS: seqs[C.AS_OF_TS],
                                 C.LABEL_ITEM_ID: seqs[C.LABEL_ITEM_ID],
                                 C.CONTEXT_CATEGORY_IDS: cats, C.CONTEXT_WEIGHTS: weights,
                                 C.CONTEXT_SOURCE: source,
                                 C.SUBJECT_ITEM_ID: pd.array(subject if subject is not None
                                                             else [None] * len(seqs), dtype="Int64")}))
    return {C.T_ITEMS: items, C.T_USERS: users, C.T_SEQUENCES: seqs,
            C.T_CONTEXT_ROWS: pd.concat(ctx, ignore_index=True)}


_ARROW = {
    C.T_ITEMS: pa.schema([(C.ITEM_ID, pa.int64()), (C.CATEGORY_IDS, pa.list_(pa.int32())),
                          (C.CATEGORY_WEIGHTS, pa.list_(pa.float32())), (C.ADVERTISER_ID, pa.int64())]),
    C.T_USERS: pa.schema([(C.USER_ID, pa.int64()), (C.AGE_BUCKET, pa.int32()),
                          (C.COUNTRY, pa.string()), (C.GENDER, pa.string())]),
    C.T_SEQUENCES: pa.schema([(C.USER_ID, pa.int64()), (C.AS_OF_TS, pa.timestamp("us", tz="UTC")),
                              (C.ITEM_IDS, pa.list_(pa.int64())), (C.EVENT_TS, pa.list_(pa.int64())),
                              (C.LABEL_ITEM_ID, pa.int64()), (C.SPLIT, pa.string())]),
    C.T_CONTEXT_ROWS: pa.schema([(C.USER_ID, pa.int64()), (C.AS_OF_TS, pa.timestamp("us", tz="UTC")),
                                 (C.LABEL_ITEM_ID, pa.int64()),
                                 (C.CONTEXT_CATEGORY_IDS, pa.list_(pa.int32())),
                                 (C.CONTEXT_WEIGHTS, pa.list_(pa.float32())),
                                 (C.CONTEXT_SOURCE, pa.string()), (C.SUBJECT_ITEM_ID, pa.int64())]),
}


def write_lake(root: Path | str, spec: FixtureSpec = FixtureSpec()) -> Dict[str, pd.DataFrame]:
    """Write the four tables as Delta under ``root`` (overwrite), and the build configuration
    the build would store (its context top-k), and return the frames."""
    tables = build_tables(spec)
    paths = C.LakePaths(str(root))
    for name, schema in _ARROW.items():
        frame = tables[name][schema.names]
        write_deltalake(paths.table(name), pa.Table.from_pandas(frame, schema=schema, preserve_index=False),
                        mode="overwrite")
    config = {"max_len": SEQUENCE_CAP, "context_top_k": spec.context_top_k}
    write_deltalake(paths.meta(C.META_BUILD_CONFIG),
                    pa.table({C.BUILD_CONFIG_JSON: [json.dumps(config, sort_keys=True)],
                              C.UPDATED_AT: pa.array([pd.Timestamp.now(tz="UTC")],
                                                     pa.timestamp("us", tz="UTC"))}),
                    mode="overwrite")
    return tables
