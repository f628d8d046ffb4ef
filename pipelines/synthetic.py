"""Seeded synthetic event log with a planted signal: long-term taste vs session intent.

The model's quality bars rely on the structure below, so it is the specification of the data.

Catalogue (``n_items``, default 10 000; ids 0..n_items-1)
    * a primary category, balanced over ``n_categories`` (default 20): at the demo size every
      primary category has n_items / n_categories = 500 items (>= 250 required);
    * 1-5 categories in all (P = .3 .3 .2 .1 .1), distinct, with confidence weights in (0, 1]
      sorted descending; the primary category's weight is the highest (0.6-1.0, others below
      0.95 x it);
    * a latent *style* in [0, n_styles) (default 5), never written to any table;
    * a Zipf-ish popularity ``(rank + 1) ** -popularity_exponent`` over a random rank
      permutation (default exponent 0.6);
    * an advertiser id in [0, n_items // 25).

Users (ids 0..n_users-1)
    * 2-3 distinct long-term interest categories (the first is the primary interest) and one
      preferred style;
    * demographics drawn from distributions keyed by the primary interest c: age bucket
      1 + (3c mod 7) with prob 0.6 else uniform 1..7 (0 = unknown with prob 0.03); country
      COUNTRIES[c mod 10] with prob 0.6 else uniform; gender "f" for even c / "m" for odd c with
      prob 0.6, the other with 0.25, "x" 0.1, "unknown" 0.05.

Sessions (1 + Poisson(sessions_mean - 1) per user, default mean 6, each in its own hour of a
``days``-long window starting at ``start``; all events of a user have distinct timestamps)
    * intent category: one of the user's interests with prob ``p_longterm`` (0.2), otherwise
      uniform over all categories -> the history alone can NOT predict the session's category;
    * the user views a *subject item* whose primary category is the intent (popularity-weighted,
      any style); every event of the session logs it as ``subject_item_id``;
    * 0..max_clicks (3) clicks on intent-category items (popularity-weighted, any style);
    * with prob ``p_convert`` (0.7) one conversion on an intent-category item whose style is the
      user's style with prob ``p_style`` (0.8, else another style), popularity-weighted within
      that (category, style) bucket. The style is what the history reveals; the category is what
      the context (subject item, or the label's own categories as pseudo-context) reveals.

Why "popularity within the context's categories" is beaten: within a category the conversion
falls in the user's style bucket (500 / 5 = 100 items at the demo size) 80 % of the time. Ranking
that bucket first (style = the majority style of the user's past conversions, category = the
context's) puts ~0.80 of the conversions in the top 100, while the category's 100 most popular
items (of 500) hold only ~0.49 of them at exponent 0.6 (ratio ~1.6). And why context is worth ~3x
over the history alone: without the category, the history's style narrows 10 000 items only to
2 000, whose 100 most popular hold ~0.26 of that style's conversions (~0.21 overall, a little more
from the long-term interests). With 10 styles the history would narrow further (~0.39 x 0.8) and
the context's advantage would shrink to ~2.5x. ``tests/pipelines/test_synthetic.py`` measures the
oracle heuristics on generated data.

Malformed rows (``malformed_frac``, default 0.5 % of events, from a separate random stream so
the clean signal does not depend on it): each picked event is turned into one of, uniformly,
an unknown event type ("bogus"), a timestamp in the future (year 2100), an unknown item id
(>= n_items + 10**9), or it is emitted twice (an exact duplicate). Validation quarantines the
first three and one copy of the duplicate. Items and users are generated clean.

Scale: the catalogue is built with numpy on the driver (100k items is a few MB); users and events
are generated inside Spark (``spark.range`` over user ids + ``mapInPandas``) with a per-user RNG
seeded by (seed, user_id), so the output does not depend on partitioning and memory is bounded by
one Arrow batch of users per task -- 1M users / 100k items / ~20M events works on a laptop.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import cached_property, partial
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import pandas as pd

from pipelines import contracts as C

COUNTRIES: Tuple[str, ...] = ("US", "GB", "DE", "FR", "BR", "IN", "JP", "MX", "CA", "AU")
SURFACES: Tuple[str, ...] = ("related_items", "search", "home_feed")
CATEGORY_COUNT_PROBS = (0.3, 0.3, 0.2, 0.1, 0.1)  # P(item has 1..5 categories)
SESSION_SLOT_SECONDS = 3600  # one session per hour slot at most
BOGUS_EVENT_TYPE = "bogus"
FUTURE_TS_SECONDS = 4_102_444_800  # 2100-01-01T00:00:00Z
UNKNOWN_ITEM_OFFSET = 10**9
MALFORMED_KINDS = ("unknown_event_type", "future_timestamp", "unknown_item", "duplicate")

_CATALOG_STREAM = (0, 0, 0)  # appended to the seed: the catalogue's RNG stream
_MALFORMED_STREAM = 1  # appended to (seed, user_id): the corruption stream


@dataclass(frozen=True)
class SyntheticConfig:
    n_users: int = 1000
    n_items: int = 10_000
    n_categories: int = 20
    n_styles: int = 5
    p_longterm: float = 0.2
    p_style: float = 0.8
    p_convert: float = 0.7
    sessions_mean: float = 6.0
    max_clicks: int = 3
    popularity_exponent: float = 0.6
    malformed_frac: float = 0.005
    seed: int = 0
    start: str = "2024-01-01"
    days: int = 180

    def __post_init__(self) -> None:
        if self.n_users < 1 or self.n_items < self.n_categories:
            raise ValueError("need n_users >= 1 and n_items >= n_categories")
        if self.n_categories < 3 or self.n_styles < 1:
            raise ValueError("need n_categories >= 3 (users have up to 3 interests), n_styles >= 1")
        for name in ("p_longterm", "p_style", "p_convert", "malformed_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability, got {getattr(self, name)}")
        if self.sessions_mean < 1:
            raise ValueError("sessions_mean must be >= 1")

    @property
    def n_advertisers(self) -> int:
        return max(1, self.n_items // 25)

    @property
    def start_seconds(self) -> int:
        start = datetime.fromisoformat(self.start)
        start = start if start.tzinfo else start.replace(tzinfo=timezone.utc)
        return int(start.timestamp())

    @property
    def n_slots(self) -> int:
        return self.days * 24 * 3600 // SESSION_SLOT_SECONDS

    def expected_events_per_user(self) -> float:
        """Mean events per user (sessions x (view + clicks + conversion)), corruption included."""
        per_session = 1.0 + self.max_clicks / 2.0 + self.p_convert
        return min(self.sessions_mean, self.n_slots) * per_session * (1 + self.malformed_frac / 4)

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)


def users_for_events(n_events: int, cfg: SyntheticConfig = SyntheticConfig()) -> int:
    """How many users give about `n_events` events with `cfg`'s session parameters."""
    return max(1, int(math.ceil(n_events / cfg.expected_events_per_user())))


# --------------------------------------------------------------------------------------
# Catalogue
# --------------------------------------------------------------------------------------
@dataclass
class Catalog:
    """Items plus the lookup structures the session simulator samples from.

    `order` sorts item ids by (primary, style); `cum_pop` is the cumulative popularity in that
    order; category c occupies order[cat_bounds[c]:cat_bounds[c+1]], bucket (c, s) occupies
    order[bucket_bounds[c*S+s]:bucket_bounds[c*S+s+1]].
    """

    primary: np.ndarray  # (N,) int64
    style: np.ndarray  # (N,) int64
    popularity: np.ndarray  # (N,) float64
    advertiser: np.ndarray  # (N,) int64
    category_ids: List[np.ndarray] = field(repr=False)  # N x (k,) int32, primary first
    category_weights: List[np.ndarray] = field(repr=False)  # N x (k,) float32, descending
    order: np.ndarray = field(repr=False)
    cum_pop: np.ndarray = field(repr=False)
    cat_bounds: np.ndarray = field(repr=False)
    bucket_bounds: np.ndarray = field(repr=False)

    @property
    def n_items(self) -> int:
        return int(self.primary.shape[0])

    @cached_property
    def cum_pop_list(self) -> List[float]:
        """Python list copies: scalar bisect on a list is ~10x faster than np.searchsorted."""
        return self.cum_pop.tolist()

    @cached_property
    def order_list(self) -> List[int]:
        return self.order.tolist()

    def frame(self) -> pd.DataFrame:
        """The raw_items rows as pandas (item_id, category_ids, category_weights, advertiser_id)."""
        return pd.DataFrame({
            C.ITEM_ID: np.arange(self.n_items, dtype=np.int64),
            C.CATEGORY_IDS: [a.tolist() for a in self.category_ids],
            C.CATEGORY_WEIGHTS: [a.tolist() for a in self.category_weights],
            C.ADVERTISER_ID: self.advertiser,
        })


def build_catalog(cfg: SyntheticConfig) -> Catalog:
    rng = np.random.default_rng([cfg.seed, *_CATALOG_STREAM])
    n, n_cat, n_sty = cfg.n_items, cfg.n_categories, cfg.n_styles
    primary = rng.permutation(np.arange(n) % n_cat).astype(np.int64)
    style = rng.integers(0, n_sty, n).astype(np.int64)
    popularity = (rng.permutation(n) + 1.0) ** -cfg.popularity_exponent
    advertiser = rng.integers(0, cfg.n_advertisers, n).astype(np.int64)
    n_cats = rng.choice(np.arange(1, 6), size=n, p=CATEGORY_COUNT_PROBS)
    ids, weights = [], []
    for i in range(n):
        k = min(int(n_cats[i]), n_cat)
        others = rng.choice(n_cat - 1, size=k - 1, replace=False)
        others = others + (others >= primary[i])  # skip the primary category
        w0 = rng.uniform(0.6, 1.0)
        w_rest = np.sort(rng.uniform(0.05, 0.95 * w0, size=k - 1))[::-1]
        ids.append(np.concatenate([[primary[i]], others]).astype(np.int32))
        weights.append(np.concatenate([[w0], w_rest]).astype(np.float32))
    order = np.lexsort((np.arange(n), style, primary))  # by primary, then style, then id
    keys_cat = primary[order]
    keys_bucket = primary[order] * n_sty + style[order]
    cat_bounds = np.searchsorted(keys_cat, np.arange(n_cat + 1), side="left")
    bucket_bounds = np.searchsorted(keys_bucket, np.arange(n_cat * n_sty + 1), side="left")
    return Catalog(primary, style, popularity, advertiser, ids, weights, order,
                   np.cumsum(popularity[order]), cat_bounds, bucket_bounds)


def _sample_range(cat: Catalog, lo: int, hi: int, u: float) -> int:
    """Popularity-weighted item id from order[lo:hi] given a uniform u in [0, 1)."""
    cum = cat.cum_pop_list
    base = cum[lo - 1] if lo > 0 else 0.0
    target = base + u * (cum[hi - 1] - base)
    pos = bisect.bisect_right(cum, target, lo, hi)
    return cat.order_list[min(pos, hi - 1)]


def sample_in_category(cat: Catalog, category: int, u: float) -> int:
    return _sample_range(cat, int(cat.cat_bounds[category]), int(cat.cat_bounds[category + 1]), u)


def sample_in_bucket(cat: Catalog, n_styles: int, category: int, style: int, u: float) -> int:
    b = category * n_styles + style
    lo, hi = int(cat.bucket_bounds[b]), int(cat.bucket_bounds[b + 1])
    if hi <= lo:  # empty (category, style) bucket at tiny catalogue sizes: any style
        return sample_in_category(cat, category, u)
    return _sample_range(cat, lo, hi, u)


# --------------------------------------------------------------------------------------
# Users and sessions
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UserProfile:
    user_id: int
    interests: Tuple[int, ...]  # primary interest first
    style: int
    age_bucket: int
    country: str
    gender: str


def preferred_age(category: int) -> int:
    return 1 + (3 * category) % 7


def preferred_country(category: int) -> str:
    return COUNTRIES[category % len(COUNTRIES)]


def preferred_gender(category: int) -> str:
    return "f" if category % 2 == 0 else "m"


def _draw_profile(cfg: SyntheticConfig, rng: np.random.Generator, user_id: int) -> UserProfile:
    n_int = int(rng.integers(2, 4))
    interests = tuple(int(c) for c in rng.choice(cfg.n_categories, size=n_int, replace=False))
    style = int(rng.integers(cfg.n_styles))
    c = interests[0]
    u = rng.random(4)
    age = preferred_age(c) if u[0] < 0.6 else int(rng.integers(1, 8))
    age = 0 if u[1] < 0.03 else age
    country = preferred_country(c) if u[2] < 0.6 else COUNTRIES[int(rng.integers(len(COUNTRIES)))]
    pref = preferred_gender(c)
    other = "m" if pref == "f" else "f"
    gender = pref if u[3] < 0.6 else other if u[3] < 0.85 else "x" if u[3] < 0.95 else "unknown"
    return UserProfile(user_id, interests, style, age, country, gender)


def user_rng(cfg: SyntheticConfig, user_id: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, int(user_id)])


def user_profile(cfg: SyntheticConfig, user_id: int) -> UserProfile:
    return _draw_profile(cfg, user_rng(cfg, user_id), user_id)


@dataclass
class _EventBuffer:
    user: List[int] = field(default_factory=list)
    item: List[int] = field(default_factory=list)
    etype: List[str] = field(default_factory=list)
    ts: List[int] = field(default_factory=list)  # epoch seconds
    surface: List[str] = field(default_factory=list)
    subject: List[int] = field(default_factory=list)

    def add(self, user: int, item: int, etype: str, ts: int, surface: str, subject: int) -> None:
        self.user.append(user)
        self.item.append(item)
        self.etype.append(etype)
        self.ts.append(ts)
        self.surface.append(surface)
        self.subject.append(subject)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({
            C.USER_ID: np.asarray(self.user, dtype=np.int64),
            C.ITEM_ID: np.asarray(self.item, dtype=np.int64),
            C.EVENT_TYPE: pd.Series(self.etype, dtype=object),
            C.EVENT_TS: pd.to_datetime(np.asarray(self.ts, dtype=np.int64), unit="s", utc=True),
            C.SURFACE: pd.Series(self.surface, dtype=object),
            C.SUBJECT_ITEM_ID: np.asarray(self.subject, dtype=np.int64),
        })


def simulate_sessions(cfg: SyntheticConfig, cat: Catalog, user_id: int,
                      out: _EventBuffer) -> UserProfile:
    """Append one user's clean events to `out` (time-ordered) and return the user's profile."""
    rng = user_rng(cfg, user_id)
    prof = _draw_profile(cfg, rng, user_id)
    n_sessions = min(1 + int(rng.poisson(cfg.sessions_mean - 1.0)), cfg.n_slots)
    slots = np.sort(rng.choice(cfg.n_slots, size=n_sessions, replace=False)).tolist()
    start = cfg.start_seconds
    for slot in slots:
        u = rng.random(8)
        if u[0] < cfg.p_longterm:
            intent = prof.interests[int(rng.integers(len(prof.interests)))]
        else:
            intent = int(rng.integers(cfg.n_categories))
        surface = SURFACES[int(u[1] * len(SURFACES))]
        t = start + slot * SESSION_SLOT_SECONDS + int(rng.integers(0, 1800))
        subject = sample_in_category(cat, intent, u[2])
        out.add(user_id, subject, C.EVENT_VIEW, t, surface, subject)
        for _ in range(int(rng.integers(0, cfg.max_clicks + 1))):
            t += int(rng.integers(10, 120))
            out.add(user_id, sample_in_category(cat, intent, rng.random()), C.EVENT_CLICK, t,
                    surface, subject)
        if u[3] < cfg.p_convert:
            if u[4] < cfg.p_style or cfg.n_styles == 1:
                style = prof.style
            else:  # another style, uniformly
                style = (prof.style + 1 + int(u[5] * (cfg.n_styles - 1))) % cfg.n_styles
            t += int(rng.integers(30, 300))
            out.add(user_id, sample_in_bucket(cat, cfg.n_styles, intent, style, u[6]),
                    C.EVENT_CONVERSION, t, surface, subject)
    return prof


def corrupt(cfg: SyntheticConfig, user_id: int, out: _EventBuffer, start: int) -> None:
    """Turn ~malformed_frac of one user's events (out[start:]) into malformed rows, in place.

    Uses its own random stream, so the clean events do not depend on `malformed_frac`.
    """
    n = len(out.user) - start
    if cfg.malformed_frac <= 0 or n == 0:
        return
    rng = np.random.default_rng([cfg.seed, int(user_id), _MALFORMED_STREAM])
    picked = np.flatnonzero(rng.random(n) < cfg.malformed_frac) + start
    kinds = rng.integers(0, len(MALFORMED_KINDS), picked.size)
    for idx, kind in zip(picked.tolist(), kinds.tolist()):
        if kind == 0:
            out.etype[idx] = BOGUS_EVENT_TYPE
        elif kind == 1:
            out.ts[idx] = FUTURE_TS_SECONDS + int(rng.integers(0, 10**7))
        elif kind == 2:
            out.item[idx] = cfg.n_items + UNKNOWN_ITEM_OFFSET + int(rng.integers(0, 10**6))
        else:
            out.add(out.user[idx], out.item[idx], out.etype[idx], out.ts[idx], out.surface[idx],
                    out.subject[idx])


def _users_frame(profiles: List[UserProfile]) -> pd.DataFrame:
    return pd.DataFrame({
        C.USER_ID: np.asarray([p.user_id for p in profiles], dtype=np.int64),
        C.AGE_BUCKET: np.asarray([p.age_bucket for p in profiles], dtype=np.int32),
        C.COUNTRY: pd.Series([p.country for p in profiles], dtype=object),
        C.GENDER: pd.Series([p.gender for p in profiles], dtype=object),
    })


def simulate_users(cfg: SyntheticConfig, cat: Catalog,
                   user_ids: np.ndarray) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """(users, raw events incl. malformed rows) for `user_ids` as pandas -- pure, no Spark."""
    profiles, buf = [], _EventBuffer()
    for uid in np.asarray(user_ids, dtype=np.int64).tolist():
        start = len(buf.user)
        profiles.append(simulate_sessions(cfg, cat, uid, buf))
        corrupt(cfg, uid, buf, start)
    return _users_frame(profiles), buf.frame()


def profiles_frame(cfg: SyntheticConfig, user_ids: np.ndarray) -> pd.DataFrame:
    """Ground truth the tables do not show (interests, style), for tests and analyses."""
    rows = [user_profile(cfg, int(u)) for u in user_ids]
    return pd.DataFrame({
        C.USER_ID: [p.user_id for p in rows],
        "interests": [list(p.interests) for p in rows],
        "style": [p.style for p in rows],
        C.AGE_BUCKET: [p.age_bucket for p in rows],
        C.COUNTRY: [p.country for p in rows],
        C.GENDER: [p.gender for p in rows],
    })


# --------------------------------------------------------------------------------------
# Spark
# --------------------------------------------------------------------------------------
def _events_batches(cfg: SyntheticConfig, cat: Catalog,
                    batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    for batch in batches:
        _, events = simulate_users(cfg, cat, batch["id"].to_numpy())
        yield events


def _users_batches(cfg: SyntheticConfig, batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    for batch in batches:
        yield _users_frame([user_profile(cfg, int(u)) for u in batch["id"].to_numpy()])


@dataclass
class SyntheticTables:
    events: "DataFrame"  # noqa: F821 (pyspark DataFrame)
    items: "DataFrame"  # noqa: F821
    users: "DataFrame"  # noqa: F821
    catalog: Catalog


def default_partitions(n_users: int) -> int:
    """~20k users (~400k events) per task keeps each task's memory small."""
    return max(2, int(math.ceil(n_users / 20_000)))


def generate(spark, cfg: SyntheticConfig, partitions: Optional[int] = None) -> SyntheticTables:
    """The three raw tables as Spark DataFrames (lazy: users/events are produced by the tasks)."""
    cat = build_catalog(cfg)
    items_schema = C.spark_schema(C.T_RAW_ITEMS)
    items = spark.createDataFrame(cat.frame(), schema=items_schema)
    ids = spark.range(0, cfg.n_users, numPartitions=partitions or default_partitions(cfg.n_users))
    users = ids.mapInPandas(partial(_users_batches, cfg), schema=C.spark_schema(C.T_RAW_USERS))
    events = ids.mapInPandas(partial(_events_batches, cfg, cat),
                             schema=C.spark_schema(C.T_RAW_EVENTS))
    return SyntheticTables(events, items, users, cat)
