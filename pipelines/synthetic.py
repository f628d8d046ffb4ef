"""Seeded synthetic event logs: a REALISTIC world (default) and the PLANTED world (preset).

Two presets, chosen by ``SyntheticConfig.preset`` (``jobs/generate_data.py --preset``); every knob
of the chosen preset can be overridden, a knob of the other preset is refused.

Preset "realistic" (the default): a log that looks like a real shop's
=====================================================================

Thousands of small leaf categories in a 3-level taxonomy, a catalogue that churns, users with one
or two conversions, mostly views, and a subject item that shares the converted item's leaf
category only half of the time. Each default below comes with the statistic it is set from;
"REES46" is ``../shared/data/rees46-2019oct-head`` (17 434 events of 2019-10-01 00:00-02:50 UTC,
conversions = carts + purchases, one per distinct (user, time, item): 378). The same statistics
are measured side by side on the REES46 head and on a generated world by
``benchmarks/calibrate_synthetic.py`` (``make bench-calibration``), whose ``bars`` say whether the
world is where this docstring says it is; "realised" figures are from that run (100 000 users).

Catalogue (``n_items`` 45 000, ids 0..n_items-1)
    * leaf categories: ``n_categories`` defaults to n_items / 15 (3 000). REES46: 6 493 items in
      434 leaf category ids, 15.0 per leaf.
    * leaf sizes: 1 + Multinomial(n_items - n_categories, log-normal weights with
      ``category_size_sigma`` 1.55): median 5, p90 33, max ~500, 17 % single-item leaves.
      REES46: median 5, p90 32.7, max 467, 20 % single-item (items per category id among the items
      the log shows; the log of issue 13 had median 3, p90 27).
    * taxonomy: ``leaves_per_parent`` 8 leaves per parent, ``parents_per_top`` 4 parents per top
      level; ``category_ids`` = [leaf, n_categories + parent, n_categories + n_parents + top] with
      weights (1, 0.5, 0.25), so a context or a baseline can back off from a leaf to its parent.
      REES46: 434 leaf ids under 56 second-level and 13 top-level category codes (~8 and ~4).
      0 removes a level (``leaves_per_parent`` 0: one category per item, as REES46 imports).
    * popularity ``(rank + 1) ** -popularity_exponent`` over a random rank permutation, exponent
      0.9: the log-log slope of item view counts over ranks 1-1000, in a time slice with as many
      views as REES46, is -0.64 on REES46 and -0.66 here (a leaf with few items on sale spreads
      its traffic over them, so the slope is flatter than the exponent).
    * churn: an item is launched at a uniform time in [start - lifetime, end) and is on sale for
      ``item_lifetime_days`` (30) from then; each leaf's first item is launched before the window
      opens, and a leaf none of whose items is that young keeps selling its newest one. Set from
      the share of test-split conversions whose item was never converted in training (the
      build's split: train < the 0.8 quantile of conversion times <= val < 0.9 <= test): REES46
      0.53 (38 test and 302 training conversions), the log of issue 13 0.95; realised 0.81
      (0.87 at 20 000 users). Without churn the share falls with the world's size (a static
      45 000-item catalogue gives ~0.1 at 100 000 users); with it, most test items are new at
      any size, which is what makes representing items by their categories matter.
    * a latent style per item (``n_styles`` 5), never written; an advertiser id.

Users (every user converts at least once; REES46 shows 5.4 % of its users converting within
3 hours; browse-only users would add only views, which no pipeline learns from)
    * 2-3 distinct interest leaves drawn by leaf traffic (the first is the primary interest), a
      style, and demographics drawn as in the planted world, keyed by the primary interest's
      top-level category.
    * conversions per user: 1 + Geometric, P(one more) = ``p_repeat`` 0.35: one conversion 0.65,
      one or two 0.88, mean 1.54. REES46 (converting users): 0.67, 0.86, 1.56.
    * long-term interests: a conversion's leaf is one of the user's interests with probability
      ``p_longterm`` 0.24, else drawn by leaf traffic. Measured as a chance-corrected return to
      one's categories, kappa: per user with >= 40 conversions, S = the 3 categories whose share
      in the first half exceeds the global share most; kappa = (share of the second half in S -
      global share of S) / (1 - global share of S), averaged over users. MovieLens 1M (users
      1-2999, 2 332 with >= 40 ratings, a movie's first listed genre as its category): 0.19
      (0.14 with its rarest genre); the same estimator on this world's leaves with long
      histories (``p_repeat`` 0.98) gives 0.20 at 0.24 (a half-history's top 3 misses some
      interest mass). REES46's repeat buyers cannot set it: of 21 later conversions of another
      item, 16 are in the same session (69 % in an earlier conversion's leaf: baskets, which this
      world does not make -- one conversion per session) and 5 in a later one (3 in the leaf).
      Realised: a later conversion falls in an earlier conversion's leaf 3.3 % of the time,
      ~6x what leaf traffic alone gives.

Sessions (each in its own hour slot of the ``days``-long window; all events of a user have
distinct timestamps; what is on sale is taken at the session's start)
    * one converting session per conversion. Its leaf: an interest w.p. ``p_longterm``, else by
      traffic; the converted item: popularity-weighted among the leaf's items on sale, of the
      user's style w.p. ``p_style`` 0.5 (not calibrated: no real log here shows a taste within
      a category). Its subject -- the item being viewed when converting, logged as the
      conversion's ``subject_item_id`` -- is:
        - the converted item itself w.p. ``p_subject_is_label`` 0.2. REES46's shop logs a view of
          the product right before each cart or purchase, so the last view is the converted item
          for 99 % of conversions and 62 % have no other item viewed in the session: as a subject
          that would make the context the answer. The subject here is the page carrying the
          recommendation slot, usually another item; 0.2 keeps the "user already on the item"
          case present (a model must not ignore the subject's own id) without letting it decide
          the metrics, and stays below the lowest alignment of the sweep (0.3). A subject that
          must share the label's leaf but whose leaf has no other item launched is the label
          itself; the draw is lowered to compensate, so the realised share is 0.20, but it cannot
          fall below ~0.11 x p_aligned;
        - else another item of the label's leaf (on sale, else any launched) until the share of
          subjects sharing the label's leaf is ``p_aligned`` 0.5: the issue 13 log's ~0.5;
          DESIGN.md's 50-90 % for real logs; REES46: the last view of another item in the same
          session within 60 min shares the converted item's leaf for 91 % of the 145 conversions
          that have one (38 %). 0.5 is the hard end; the quality sweep runs 0.3, 0.5, 0.8, 1.0;
        - else an item of another leaf: a sibling leaf (same parent, by traffic) w.p.
          ``p_subject_sibling`` 0.5, else a leaf the user browses anyway (an interest w.p.
          ``p_longterm``, else by traffic). Not calibrated: REES46 has 13 misaligned subjects, 4
          with taxonomy codes (1 in the same second level, 3 in the same top level).
      Events, in the order REES46's shop logs them: Poisson views of items of the subject's or
      the label's leaf, a view of the subject, a view of the converted item (when it is another),
      then the conversion. ``views_before_conversion_mean`` 2.9 counts them (REES46: 2.87 views
      before the first conversion of a converting session). Views log no subject (null).
    * browsing sessions: Poisson(browse_sessions_mean) per user, the mean derived so that views
      per conversion are ``views_per_conversion`` 10 -- REES46 has 45, scaled down 4.5x for
      speed (at 45 a 100 000-user world has ~7M events instead of ~1.7M, and views only feed the
      derived-subject and co-occurrence paths); each has 1 + Poisson(``session_views_mean`` - 1)
      views (3.4: REES46's 17 055 views in 5 066 sessions) of items of one leaf the user
      browses (an interest w.p. ``p_longterm``, else by traffic).

Size (seed 0; examples = conversions with an earlier one, split as the build does):

    users     events      conversions  examples (train / test)  items in the log  unseen test
    10 000      169 000      15 400       5 400 (3 700 / 860)       28 000           0.89
    30 000      506 000      46 000      16 000 (11 100 / 2 500)    39 000           0.85
    100 000   1 690 000     154 000      54 000 (37 100 / 8 600)    43 000           0.81

with 45 000 catalogue items and 3 000 leaf categories (3 469 category ids) at every size. The
pure-pandas path costs ~4 us of CPU per event (7 CPU-s for 100 000 users); through Spark with
the Delta writes of the three tables, 20 CPU-s.

Preset "planted" (the world of the first quality bars; unchanged, same output for the same seed)
==================================================================================================

A planted signal: long-term taste vs session intent. The model's first quality bars relied on
the structure below, so it is the specification of that world.

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
the context's advantage would shrink to ~2.5x. ``tests/pipelines/test_pipelines_synthetic.py``
measures the oracle heuristics on generated data. The subject shares the label's primary category
for every conversion, which no real log shows: that is why the realistic world is the default.

Both presets
============

Malformed rows (``malformed_frac``, default 0.5 % of events, from a separate random stream so
the clean signal does not depend on it): each picked event is turned into one of, uniformly,
an unknown event type ("bogus"), a timestamp in the future (year 2100), an unknown item id
(>= n_items + 10**9), or it is emitted twice (an exact duplicate). Validation quarantines the
first three and one copy of the duplicate. Items and users are generated clean.

Scale: the catalogue is built with numpy on the driver (100k items is a few MB); users and events
are generated inside Spark (``spark.range`` over user ids + ``mapInPandas``) with a per-user RNG
seeded by (seed, user_id), so the output does not depend on partitioning and memory is bounded by
one Arrow batch of users per task. ``simulate_users`` is the same generator without Spark.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field, fields
from datetime import datetime
from functools import cached_property, partial
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import pandas as pd

import ctt_contracts as C
from ctt_contracts.flags import described

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

# --------------------------------------------------------------------------------------
# Configuration: presets and knobs
# --------------------------------------------------------------------------------------
REALISTIC, PLANTED = "realistic", "planted"
PRESETS: Tuple[str, ...] = (REALISTIC, PLANTED)
MEAN_CATEGORY_SIZE = 15.0  # realistic n_categories default = n_items / this (REES46: 6 493 / 434)
TAXONOMY_WEIGHTS = (1.0, 0.5, 0.25)  # realistic category_weights of (leaf, parent, top)
DAY_SECONDS = 86_400

# Per preset: knob -> default. A knob missing from a preset does not apply to it.
PRESET_DEFAULTS: Dict[str, Dict[str, object]] = {
    PLANTED: dict(n_items=10_000, n_categories=20, n_styles=5, p_longterm=0.2, p_style=0.8,
                  popularity_exponent=0.6, p_convert=0.7, sessions_mean=6.0, max_clicks=3),
    REALISTIC: dict(n_items=45_000, n_categories=None, n_styles=5, p_longterm=0.24, p_style=0.5,
                    popularity_exponent=0.9, p_aligned=0.5, p_subject_is_label=0.2,
                    p_subject_sibling=0.5, category_size_sigma=1.55, leaves_per_parent=8,
                    parents_per_top=4, item_lifetime_days=30.0, p_repeat=0.35,
                    views_per_conversion=10.0, views_before_conversion_mean=2.9,
                    session_views_mean=3.4),
}
def preset_knobs(preset: str) -> Tuple[str, ...]:
    """The knobs that apply to `preset`, in declaration order."""
    if preset not in PRESET_DEFAULTS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return tuple(PRESET_DEFAULTS[preset])


ALL_KNOBS: Tuple[str, ...] = tuple(dict.fromkeys(k for p in PRESETS for k in PRESET_DEFAULTS[p]))


@dataclass(frozen=True)
class SyntheticConfig:
    """One world: a preset plus its knobs. Knobs left at None take the preset's default;
    setting a knob the preset does not use is an error (it would silently do nothing). Each
    field is a flag of generate_data (``ctt_contracts.flags``)."""

    preset: str = field(default=REALISTIC, metadata=described(
        "which world; every knob below overrides the preset's default, and a knob of the other "
        "preset is refused", choices=PRESETS))
    n_users: int = field(default=1000, metadata=described("users", flag="--users"))
    malformed_frac: float = field(default=0.005, metadata=described(
        "fraction of deliberately malformed event rows"))
    seed: int = field(default=0, metadata=described("seed of every random draw"))
    start: str = field(default="2024-01-01", metadata=described(
        "first day of the log (ISO date, UTC)"))
    days: int = field(default=180, metadata=described("length of the log in days"))
    n_items: Optional[int] = field(default=None, metadata=described(
        "items in the catalogue", flag="--items"))
    n_categories: Optional[int] = field(default=None, metadata=described(
        "categories (planted: primary categories; realistic: leaf categories, default "
        "n_items / 15)", flag="--categories"))
    n_styles: Optional[int] = field(default=None, metadata=described(
        "latent styles (a taste the history reveals within a category)", flag="--styles"))
    p_longterm: Optional[float] = field(default=None, metadata=described(
        "P(a session's category is one of the user's long-term interests)"))
    p_style: Optional[float] = field(default=None, metadata=described(
        "P(a conversion is in the user's style)"))
    popularity_exponent: Optional[float] = field(default=None, metadata=described(
        "Zipf exponent of item popularity"))
    # planted only
    p_convert: Optional[float] = field(default=None, metadata=described(
        "P(a session converts)"))
    sessions_mean: Optional[float] = field(default=None, metadata=described(
        "sessions per user (mean)"))
    max_clicks: Optional[int] = field(default=None, metadata=described(
        "clicks per session, uniform 0..max"))
    # realistic only
    p_aligned: Optional[float] = field(default=None, metadata=described(
        "P(the subject's leaf category = the converted item's leaf category)"))
    p_subject_is_label: Optional[float] = field(default=None, metadata=described(
        "P(the subject is the converted item itself); <= p_aligned"))
    p_subject_sibling: Optional[float] = field(default=None, metadata=described(
        "P(a misaligned subject comes from a sibling leaf of the label's)"))
    category_size_sigma: Optional[float] = field(default=None, metadata=described(
        "log-normal sigma of the leaf category sizes (long tail)"))
    leaves_per_parent: Optional[int] = field(default=None, metadata=described(
        "leaf categories per parent category (0: no parent level)"))
    parents_per_top: Optional[int] = field(default=None, metadata=described(
        "parent categories per top-level category (0: no top level)"))
    item_lifetime_days: Optional[float] = field(default=None, metadata=described(
        "days an item stays on sale after its launch (catalogue churn)"))
    p_repeat: Optional[float] = field(default=None, metadata=described(
        "P(a user converts once more): conversions per user are 1 + Geometric"))
    views_per_conversion: Optional[float] = field(default=None, metadata=described(
        "views per conversion, all sessions included (mean)"))
    views_before_conversion_mean: Optional[float] = field(default=None, metadata=described(
        "views in a converting session before the conversion (mean; subject and converted item included)"))
    session_views_mean: Optional[float] = field(default=None, metadata=described(
        "views per browsing session without conversion (mean, >= 1)"))

    def __post_init__(self) -> None:
        knobs = preset_knobs(self.preset)
        foreign = [k for k in ALL_KNOBS if k not in knobs and getattr(self, k) is not None]
        if foreign:
            raise ValueError(f"knob(s) {', '.join(foreign)} do not apply to preset "
                             f"{self.preset!r}")
        for name, default in PRESET_DEFAULTS[self.preset].items():
            if getattr(self, name) is None and default is not None:
                object.__setattr__(self, name, default)
        if self.preset == REALISTIC and self.n_categories is None:
            object.__setattr__(self, "n_categories",
                               max(3, int(round(self.n_items / MEAN_CATEGORY_SIZE))))
        self._validate_common()
        if self.preset == PLANTED:
            self._validate_planted()
        else:
            self._validate_realistic()

    def _probabilities(self, *names: str) -> None:
        for name in names:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability, got {getattr(self, name)}")

    def _validate_common(self) -> None:
        if self.n_users < 1 or self.n_items < self.n_categories:
            raise ValueError("need n_users >= 1 and n_items >= n_categories")
        if self.n_categories < 3 or self.n_styles < 1:
            raise ValueError("need n_categories >= 3 (users have up to 3 interests), n_styles >= 1")
        if self.days < 1:
            raise ValueError(f"days must be >= 1, got {self.days}")
        self._probabilities("p_longterm", "p_style", "malformed_frac")

    def _validate_planted(self) -> None:
        self._probabilities("p_convert")
        if self.sessions_mean < 1:
            raise ValueError("sessions_mean must be >= 1")

    def _validate_realistic(self) -> None:
        self._probabilities("p_aligned", "p_subject_is_label", "p_subject_sibling", "p_repeat")
        if self.p_subject_is_label > self.p_aligned:
            raise ValueError(f"p_subject_is_label ({self.p_subject_is_label}) cannot exceed "
                             f"p_aligned ({self.p_aligned}): a subject that is the converted item "
                             f"shares its category")
        if self.p_repeat >= 1.0:
            raise ValueError("p_repeat must be < 1 (conversions per user are 1 + Geometric)")
        if self.category_size_sigma < 0 or self.popularity_exponent < 0:
            raise ValueError("category_size_sigma and popularity_exponent must be >= 0")
        if self.leaves_per_parent < 0 or self.parents_per_top < 0:
            raise ValueError("leaves_per_parent and parents_per_top must be >= 0")
        if self.parents_per_top > 0 and self.leaves_per_parent == 0:
            raise ValueError("a top level needs a parent level (leaves_per_parent >= 1)")
        if self.item_lifetime_days <= 0:
            raise ValueError("item_lifetime_days must be > 0")
        least = 2.0 - self.p_subject_is_label  # the subject's view, then the converted item's
        if not least <= self.views_before_conversion_mean <= 100:
            raise ValueError(f"views_before_conversion_mean must be in [{least:g}, 100] "
                             f"(subject + converted item views), got "
                             f"{self.views_before_conversion_mean}")
        if not 1.0 <= self.session_views_mean <= 100:
            raise ValueError(f"session_views_mean must be in [1, 100], got {self.session_views_mean}")
        if self.views_per_conversion < self.views_before_conversion_mean:
            raise ValueError("views_per_conversion must be >= views_before_conversion_mean")

    # ---- derived quantities
    @property
    def n_advertisers(self) -> int:
        return max(1, self.n_items // 25)

    @cached_property
    def start_seconds(self) -> int:
        return int(C.as_utc(datetime.fromisoformat(self.start)).timestamp())

    @cached_property
    def n_slots(self) -> int:
        return self.days * 24 * 3600 // SESSION_SLOT_SECONDS

    @property
    def conversions_mean(self) -> float:
        """Realistic: mean conversions per user, 1 / (1 - p_repeat)."""
        return 1.0 / (1.0 - self.p_repeat)

    @cached_property
    def browse_sessions_mean(self) -> float:
        """Realistic: browsing sessions per user that give `views_per_conversion` overall."""
        extra = self.views_per_conversion - self.views_before_conversion_mean
        return self.conversions_mean * extra / self.session_views_mean

    @cached_property
    def extra_views_mean(self) -> float:
        """Realistic: views before the subject's view in a converting session."""
        return self.views_before_conversion_mean - (2.0 - self.p_subject_is_label)

    def expected_events_per_user(self) -> float:
        """Mean events per user, corruption included."""
        if self.preset == PLANTED:
            per_session = 1.0 + self.max_clicks / 2.0 + self.p_convert
            clean = min(self.sessions_mean, self.n_slots) * per_session
        else:
            clean = self.conversions_mean * (self.views_per_conversion + 1.0)
        return clean * (1 + self.malformed_frac / 4)

    def to_dict(self) -> Dict[str, object]:
        """The preset, the common settings and the preset's knobs (not the other preset's)."""
        keep = {"preset", "n_users", "malformed_frac", "seed", "start", "days",
                *preset_knobs(self.preset)}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in keep}


def users_for_events(n_events: int, cfg: SyntheticConfig = SyntheticConfig()) -> int:
    """How many users give about `n_events` events with `cfg`'s session parameters."""
    return max(1, int(math.ceil(n_events / cfg.expected_events_per_user())))


def _list_copy(array_of: Callable[[object], np.ndarray]) -> cached_property:
    """A cached property holding ``array_of(self).tolist()``, computed once per instance: the
    per-event loops read these arrays one scalar at a time, and bisect and indexing on a Python
    list are ~10x faster than np.searchsorted / numpy scalar indexing."""
    return cached_property(lambda self: array_of(self).tolist())


# --------------------------------------------------------------------------------------
# Preset "planted": catalogue
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

    # Python list copies for the session simulator's scalar lookups (see _list_copy).
    cum_pop_list = _list_copy(lambda c: c.cum_pop)
    order_list = _list_copy(lambda c: c.order)

    def frame(self) -> pd.DataFrame:
        """The raw_items rows as pandas (item_id, category_ids, category_weights, advertiser_id)."""
        return pd.DataFrame({
            C.ITEM_ID: np.arange(self.n_items, dtype=np.int64),
            C.CATEGORY_IDS: [a.tolist() for a in self.category_ids],
            C.CATEGORY_WEIGHTS: [a.tolist() for a in self.category_weights],
            C.ADVERTISER_ID: self.advertiser,
        })


def build_planted_catalog(cfg: SyntheticConfig) -> Catalog:
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
# Preset "planted": users and sessions (shared: profiles, event buffer, corruption)
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


def planted_user_profile(cfg: SyntheticConfig, user_id: int) -> UserProfile:
    return _draw_profile(cfg, user_rng(cfg, user_id), user_id)


@dataclass
class _EventBuffer:
    user: List[int] = field(default_factory=list)
    item: List[int] = field(default_factory=list)
    etype: List[str] = field(default_factory=list)
    ts: List[int] = field(default_factory=list)  # epoch seconds
    surface: List[str] = field(default_factory=list)
    subject: List[Optional[int]] = field(default_factory=list)  # None: no subject (realistic views)

    def add(self, user: int, item: int, etype: str, ts: int, surface: str,
            subject: Optional[int]) -> None:
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
            C.SUBJECT_ITEM_ID: (pd.array(self.subject, dtype="Int64") if None in self.subject
                                else np.asarray(self.subject, dtype=np.int64)),
            # Every session lives in its own hour slot, so (user, hour) is the session key.
            C.SESSION_ID: pd.Series([f"{u}-{t // SESSION_SLOT_SECONDS}" for u, t in zip(self.user, self.ts)],
                                    dtype=object),
        })


def simulate_planted_sessions(cfg: SyntheticConfig, cat: Catalog, user_id: int,
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


def corrupt(cfg: SyntheticConfig, user_id: int, out: _EventBuffer, start: int,
            rng: Optional[np.random.Generator] = None) -> None:
    """Turn ~malformed_frac of one user's events (out[start:]) into malformed rows, in place.

    The clean events must not depend on `malformed_frac`: the draws come from their own random
    stream (planted), or from the user's stream after all of the user's clean draws (realistic:
    one generator per user instead of two, a third of the generation time).
    """
    n = len(out.user) - start
    if cfg.malformed_frac <= 0 or n == 0:
        return
    if rng is None:
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


def _simulate_planted_users(cfg: SyntheticConfig, cat: Catalog,
                            user_ids: np.ndarray) -> Tuple[pd.DataFrame, pd.DataFrame]:
    profiles, buf = [], _EventBuffer()
    for uid in np.asarray(user_ids, dtype=np.int64).tolist():
        start = len(buf.user)
        profiles.append(simulate_planted_sessions(cfg, cat, uid, buf))
        corrupt(cfg, uid, buf, start)
    return _users_frame(profiles), buf.frame()


def _planted_profiles(cfg: SyntheticConfig, user_ids: np.ndarray) -> List[UserProfile]:
    return [planted_user_profile(cfg, int(u)) for u in user_ids]


def _profiles_table(rows: List[UserProfile]) -> pd.DataFrame:
    """Ground truth the tables do not show (interests, style), for tests and analyses."""
    return pd.DataFrame({
        C.USER_ID: [p.user_id for p in rows],
        "interests": [list(p.interests) for p in rows],
        "style": [p.style for p in rows],
        C.AGE_BUCKET: [p.age_bucket for p in rows],
        C.COUNTRY: [p.country for p in rows],
        C.GENDER: [p.gender for p in rows],
    })


# --------------------------------------------------------------------------------------
# Preset "realistic": catalogue
# --------------------------------------------------------------------------------------
@dataclass
class RealisticCatalog:
    """Items with a leaf category in a 3-level taxonomy, a launch time and a popularity.

    `order` sorts item ids by (leaf, launch time, id); leaf c occupies
    order[leaf_bounds[c]:leaf_bounds[c+1]], so the items of a leaf on sale at time t (launched in
    (t - lifetime, t]) are one contiguous run found by two bisections on `launch_list`.
    """

    primary: np.ndarray  # (N,) int64 leaf category (category_ids[0])
    style: np.ndarray  # (N,) int64
    popularity: np.ndarray  # (N,) float64
    advertiser: np.ndarray  # (N,) int64
    launch: np.ndarray  # (N,) int64 epoch seconds
    n_leaves: int
    leaves_per_parent: int
    parents_per_top: int
    lifetime_seconds: int
    order: np.ndarray = field(repr=False)
    cum_pop: np.ndarray = field(repr=False)  # cumulative popularity in `order`
    leaf_bounds: np.ndarray = field(repr=False)  # (L+1,)
    traffic_cum: np.ndarray = field(repr=False)  # (L,) cumulative popularity mass per leaf
    window: Tuple[int, int] = (0, 1)  # [start, end) of the log in epoch seconds

    @property
    def n_items(self) -> int:
        return int(self.primary.shape[0])

    @property
    def n_parents(self) -> int:
        lpp = self.leaves_per_parent
        return 0 if lpp == 0 else -(-self.n_leaves // lpp)

    @property
    def n_tops(self) -> int:
        ppt = self.parents_per_top
        return 0 if ppt == 0 else -(-self.n_parents // ppt)

    @property
    def n_category_ids(self) -> int:
        """Distinct category ids over all levels (leaves, then parents, then tops)."""
        return self.n_leaves + self.n_parents + self.n_tops

    # Python list copies for the per-event loops (see _list_copy).
    cum_pop_list = _list_copy(lambda c: c.cum_pop)
    order_list = _list_copy(lambda c: c.order)
    launch_list = _list_copy(lambda c: c.launch[c.order])
    bounds_list = _list_copy(lambda c: c.leaf_bounds)
    traffic_list = _list_copy(lambda c: c.traffic_cum)
    style_list = _list_copy(lambda c: c.style)

    @cached_property
    def lone_item_share(self) -> float:
        """Expected share of traffic-weighted draws (uniform in time over the window) that land
        in a leaf with a single item launched so far: there an aligned subject can only be the
        converted item itself."""
        t0, t1 = self.window
        sizes = np.diff(self.leaf_bounds)
        second = np.full(self.n_leaves, t1, dtype=np.int64)
        many = sizes > 1
        second[many] = np.asarray(self.launch_list, dtype=np.int64)[self.leaf_bounds[:-1][many] + 1]
        lone = (np.clip(second, t0, t1) - t0) / float(t1 - t0)  # (L,) share of the window
        traffic = np.diff(self.traffic_cum, prepend=0.0)
        return float((lone * traffic).sum() / traffic.sum())

    def self_draw_probability(self, p_subject_is_label: float, p_aligned: float) -> float:
        """P(draw "subject = label") such that the realised share is p_subject_is_label: an
        aligned subject drawn in a leaf with a single launched item is the label itself, which
        adds (p_aligned - p) x lone_item_share to the draw p."""
        q = self.lone_item_share
        if q >= 1.0:
            return p_subject_is_label
        return max(0.0, (p_subject_is_label - p_aligned * q) / (1.0 - q))

    def parent_index(self, leaf):
        """Parent of a leaf (0-based among parents; the leaf itself without a parent level);
        works on ints and arrays."""
        return leaf if self.leaves_per_parent == 0 else leaf // self.leaves_per_parent

    def top_index(self, leaf):
        """Top-level category of a leaf (0-based among tops); its parent without a top level."""
        if self.parents_per_top == 0:
            return self.parent_index(leaf)
        return self.parent_index(leaf) // self.parents_per_top

    def category_matrix(self) -> np.ndarray:
        """(N, levels) category ids: leaf, parent (offset L), top (offset L + P)."""
        cols = [self.primary]
        if self.leaves_per_parent:
            cols.append(self.n_leaves + self.parent_index(self.primary))
        if self.parents_per_top:
            cols.append(self.n_leaves + self.n_parents + self.top_index(self.primary))
        return np.stack(cols, axis=1).astype(np.int64)

    def frame(self) -> pd.DataFrame:
        """The raw_items rows as pandas (item_id, category_ids, category_weights, advertiser_id)."""
        ids = self.category_matrix()
        weights = list(TAXONOMY_WEIGHTS[:ids.shape[1]])
        return pd.DataFrame({
            C.ITEM_ID: np.arange(self.n_items, dtype=np.int64),
            C.CATEGORY_IDS: ids.tolist(),
            C.CATEGORY_WEIGHTS: [weights] * self.n_items,
            C.ADVERTISER_ID: self.advertiser,
        })

    # ---- sampling (u: uniforms in [0, 1))
    def traffic_leaf(self, u: float, lo: int = 0, hi: Optional[int] = None) -> int:
        """A leaf in [lo, hi) drawn proportionally to its popularity mass."""
        cum = self.traffic_list
        hi = self.n_leaves if hi is None else hi
        base = cum[lo - 1] if lo > 0 else 0.0
        pos = bisect.bisect_right(cum, base + u * (cum[hi - 1] - base), lo, hi)
        return min(pos, hi - 1)

    def on_sale(self, leaf: int, t: int) -> Tuple[int, int]:
        """[a, j) in `order`: the leaf's items on sale at time t (never empty).

        Launched in (t - lifetime, t]; when none is, the newest launched item stays on sale
        (every leaf's first item is launched before the window opens)."""
        lo, hi = self.bounds_list[leaf], self.bounds_list[leaf + 1]
        launch = self.launch_list
        j = max(bisect.bisect_right(launch, t, lo, hi), lo + 1)
        a = min(bisect.bisect_right(launch, t - self.lifetime_seconds, lo, j), j - 1)
        return a, j


def build_realistic_catalog(cfg: SyntheticConfig) -> RealisticCatalog:
    rng = np.random.default_rng([cfg.seed, *_CATALOG_STREAM])
    n, n_leaves = cfg.n_items, cfg.n_categories
    weights = rng.lognormal(0.0, cfg.category_size_sigma, n_leaves)
    sizes = 1 + rng.multinomial(n - n_leaves, weights / weights.sum())
    primary = rng.permutation(np.repeat(np.arange(n_leaves, dtype=np.int64), sizes))
    style = rng.integers(0, cfg.n_styles, n).astype(np.int64)
    popularity = (rng.permutation(n) + 1.0) ** -cfg.popularity_exponent
    advertiser = rng.integers(0, cfg.n_advertisers, n).astype(np.int64)
    life = int(round(cfg.item_lifetime_days * DAY_SECONDS))
    t0 = cfg.start_seconds
    launch = rng.integers(t0 - life, t0 + cfg.days * DAY_SECONDS, n).astype(np.int64)
    order = np.lexsort((np.arange(n), launch, primary))  # by leaf, then launch, then id
    bounds = np.searchsorted(primary[order], np.arange(n_leaves + 1), side="left")
    launch[order[bounds[:-1]]] = t0 - life  # each leaf's first item is on sale from the start
    traffic = np.bincount(primary, weights=popularity, minlength=n_leaves)
    return RealisticCatalog(primary, style, popularity, advertiser, launch, n_leaves,
                            cfg.leaves_per_parent, cfg.parents_per_top, life, order,
                            np.cumsum(popularity[order]), bounds, np.cumsum(traffic),
                            (t0, t0 + cfg.days * DAY_SECONDS))


# --------------------------------------------------------------------------------------
# Preset "realistic": users and sessions
# --------------------------------------------------------------------------------------
_PROFILE_DRAWS = 24  # uniforms a realistic profile consumes (fixed, so users need no sessions)
_TRIES = 8  # rejection-sampling attempts before a deterministic fallback


_Uniforms = Callable[[], float]  # a user's stream of uniforms in [0, 1)


def _uniforms(rng: np.random.Generator, block: int = 128) -> _Uniforms:
    """The next-uniform function of `rng`, drawn in blocks (a scalar numpy draw costs ~10x)."""
    def stream() -> Iterator[float]:
        while True:
            yield from rng.random(block).tolist()

    return stream().__next__


def _poisson(lam: float, u: float) -> int:
    """Poisson(lam) by inversion of one uniform (lam is small here)."""
    k, p = 0, math.exp(-lam)
    cdf = p
    while u > cdf and k < 10_000:
        k += 1
        p *= lam / k
        cdf += p
    return k


def _geometric(p_repeat: float, u: float) -> int:
    """1 + Geometric: P(n) = p_repeat ** (n - 1) * (1 - p_repeat), n >= 1."""
    if p_repeat <= 0.0:
        return 1
    return 1 + int(math.log1p(-u) / math.log(p_repeat))


def _draw_realistic_profile(cfg: SyntheticConfig, cat: RealisticCatalog,
                            rng: np.random.Generator, user_id: int) -> UserProfile:
    d = rng.random(_PROFILE_DRAWS).tolist()
    n_int = 2 if d[0] < 0.5 else 3
    interests: List[int] = []
    for u in d[1:17]:  # distinct leaves by traffic; a tiny catalogue may give fewer
        leaf = cat.traffic_leaf(u)
        if leaf not in interests:
            interests.append(leaf)
            if len(interests) == n_int:
                break
    style = int(d[17] * cfg.n_styles)
    key = int(cat.top_index(interests[0]))
    age = preferred_age(key) if d[18] < 0.6 else 1 + int(d[19] * 7)
    age = 0 if d[20] < 0.03 else age
    country = preferred_country(key) if d[21] < 0.6 else COUNTRIES[int(d[22] * len(COUNTRIES))]
    pref = preferred_gender(key)
    other = "m" if pref == "f" else "f"
    g = d[23]
    gender = pref if g < 0.6 else other if g < 0.85 else "x" if g < 0.95 else "unknown"
    return UserProfile(user_id, tuple(interests), style, age, country, gender)


def realistic_user_profile(cfg: SyntheticConfig, cat: RealisticCatalog,
                           user_id: int) -> UserProfile:
    return _draw_realistic_profile(cfg, cat, user_rng(cfg, user_id), user_id)


def _browse_leaf(cfg: SyntheticConfig, cat: RealisticCatalog, prof: UserProfile,
                 u: _Uniforms) -> int:
    """A leaf the user browses: one of their interests w.p. p_longterm, else by traffic."""
    if u() < cfg.p_longterm:
        return prof.interests[int(u() * len(prof.interests))]
    return cat.traffic_leaf(u())


def _pick(cat: RealisticCatalog, leaf: int, t: int, u: _Uniforms,
          style: Optional[int] = None) -> int:
    """A popularity-weighted item of `leaf` on sale at t; of `style` when one is found."""
    a, j = cat.on_sale(leaf, t)
    return _pick_in(cat, a, j, u, style)


def _pick_in(cat: RealisticCatalog, a: int, j: int, u: _Uniforms,
             style: Optional[int] = None) -> int:
    """`_pick` within a known on-sale run [a, j) of `order`."""
    item = _sample_range(cat, a, j, u())
    if style is not None:
        styles = cat.style_list
        for _ in range(_TRIES):
            if styles[item] == style:
                break
            item = _sample_range(cat, a, j, u())
    return item


def _other_in_leaf(cat: RealisticCatalog, leaf: int, t: int, label: int, u: _Uniforms) -> int:
    """Another item of the label's leaf (on sale, else launched by t); the label itself only
    when the leaf has no other item yet."""
    a, j = cat.on_sale(leaf, t)
    if j - a < 2:
        a = cat.bounds_list[leaf]
    if j - a < 2:
        return label
    for _ in range(_TRIES):
        item = _sample_range(cat, a, j, u())
        if item != label:
            return item
    run = [i for i in cat.order_list[a:j] if i != label]
    return run[int(u() * len(run))]


def _misaligned_leaf(cfg: SyntheticConfig, cat: RealisticCatalog, prof: UserProfile,
                     label_leaf: int, u: _Uniforms) -> int:
    """A leaf other than the label's: a sibling (same parent) w.p. p_subject_sibling, else
    what the user browses anyway (an interest w.p. p_longterm, else by traffic)."""
    lpp = cat.leaves_per_parent
    if u() < cfg.p_subject_sibling and lpp > 1:
        lo = (label_leaf // lpp) * lpp
        hi = min(lo + lpp, cat.n_leaves)
        if hi - lo > 1:
            for _ in range(_TRIES):
                leaf = cat.traffic_leaf(u(), lo, hi)
                if leaf != label_leaf:
                    return leaf
            return lo + (label_leaf - lo + 1 + int(u() * (hi - lo - 1))) % (hi - lo)
    for _ in range(_TRIES):
        leaf = _browse_leaf(cfg, cat, prof, u)
        if leaf != label_leaf:
            return leaf
    n = cat.n_leaves
    return (label_leaf + 1 + int(u() * (n - 1))) % n


class _Clock:
    """Strictly increasing timestamps of one session inside its hour slot."""

    def __init__(self, slot_start: int, n_events: int, u: _Uniforms) -> None:
        self.t = slot_start + int(u() * (SESSION_SLOT_SECONDS // 2))
        room = slot_start + SESSION_SLOT_SECONDS - 1 - self.t
        self.max_gap = max(1, min(120, room // max(1, n_events)))
        self.min_gap = min(10, self.max_gap)
        self.first = True

    def tick(self, u: _Uniforms) -> int:
        if self.first:
            self.first = False
        else:
            self.t += self.min_gap + int(u() * (self.max_gap - self.min_gap + 1))
        return self.t


def _converting_session(cfg: SyntheticConfig, cat: RealisticCatalog, prof: UserProfile,
                        slot_start: int, surface: str, u: _Uniforms, out: _EventBuffer) -> None:
    """[browse views] -> view of the subject -> view of the label (unless it is the subject)
    -> conversion of the label logging the subject."""
    uid = prof.user_id
    label_leaf = (prof.interests[int(u() * len(prof.interests))] if u() < cfg.p_longterm
                  else cat.traffic_leaf(u()))
    t = slot_start  # what is on sale when the session starts
    style = prof.style if u() < cfg.p_style else None
    label = _pick(cat, label_leaf, t, u, style)
    r = u()
    if r < cat.self_draw_probability(cfg.p_subject_is_label, cfg.p_aligned):
        subject = label
    elif r < cfg.p_aligned:
        subject = _other_in_leaf(cat, label_leaf, t, label, u)
    else:
        subject = _pick(cat, _misaligned_leaf(cfg, cat, prof, label_leaf, u), t, u)
    subject_leaf = int(cat.primary[subject])
    n_extra = _poisson(cfg.extra_views_mean, u())
    clock = _Clock(slot_start, n_extra + 3, u)
    runs = (cat.on_sale(subject_leaf, t), cat.on_sale(label_leaf, t)) if n_extra else ()
    for _ in range(n_extra):
        a, j = runs[0] if u() < 0.5 else runs[1]
        out.add(uid, _pick_in(cat, a, j, u), C.EVENT_VIEW, clock.tick(u), surface, None)
    out.add(uid, subject, C.EVENT_VIEW, clock.tick(u), surface, None)
    if subject != label:
        out.add(uid, label, C.EVENT_VIEW, clock.tick(u), surface, None)
    out.add(uid, label, C.EVENT_CONVERSION, clock.tick(u), surface, subject)


def _browsing_session(cfg: SyntheticConfig, cat: RealisticCatalog, prof: UserProfile,
                      slot_start: int, surface: str, u: _Uniforms, out: _EventBuffer) -> None:
    """1 + Poisson(session_views_mean - 1) views in one browsed leaf, no conversion."""
    leaf = _browse_leaf(cfg, cat, prof, u)
    t = slot_start  # what is on sale when the session starts
    n = 1 + _poisson(cfg.session_views_mean - 1.0, u())
    clock = _Clock(slot_start, n, u)
    a, j = cat.on_sale(leaf, t)
    for _ in range(n):
        out.add(prof.user_id, _pick_in(cat, a, j, u), C.EVENT_VIEW, clock.tick(u), surface, None)


def simulate_realistic_sessions(cfg: SyntheticConfig, cat: RealisticCatalog, user_id: int,
                                out: _EventBuffer,
                                rng: Optional[np.random.Generator] = None) -> UserProfile:
    """Append one user's clean events to `out` (time-ordered) and return the user's profile.

    `rng` is the user's generator (``user_rng``), made here when not given."""
    rng = user_rng(cfg, user_id) if rng is None else rng
    prof = _draw_realistic_profile(cfg, cat, rng, user_id)
    u = _uniforms(rng)
    n_conv = _geometric(cfg.p_repeat, u())
    n_browse = _poisson(cfg.browse_sessions_mean, u())
    n_sessions = min(n_conv + n_browse, cfg.n_slots)
    n_conv = min(n_conv, n_sessions)
    slots: set = set()
    while len(slots) < n_sessions:
        slots.add(int(u() * cfg.n_slots))
    converts = [True] * n_conv + [False] * (n_sessions - n_conv)
    for i in range(n_sessions - 1, 0, -1):  # Fisher-Yates: which sessions convert
        k = int(u() * (i + 1))
        converts[i], converts[k] = converts[k], converts[i]
    start = cfg.start_seconds
    for slot, conv in zip(sorted(slots), converts):
        surface = SURFACES[int(u() * len(SURFACES))]
        session = _converting_session if conv else _browsing_session
        session(cfg, cat, prof, start + slot * SESSION_SLOT_SECONDS, surface, u, out)
    return prof


def _simulate_realistic_users(cfg: SyntheticConfig, cat: RealisticCatalog,
                              user_ids: np.ndarray) -> Tuple[pd.DataFrame, pd.DataFrame]:
    profiles, buf = [], _EventBuffer()
    for uid in np.asarray(user_ids, dtype=np.int64).tolist():
        start, rng = len(buf.user), user_rng(cfg, uid)
        profiles.append(simulate_realistic_sessions(cfg, cat, uid, buf, rng))
        corrupt(cfg, uid, buf, start, rng)
    return _users_frame(profiles), buf.frame()


# --------------------------------------------------------------------------------------
# Either preset
# --------------------------------------------------------------------------------------
AnyCatalog = Union[Catalog, RealisticCatalog]


def build_catalog(cfg: SyntheticConfig) -> AnyCatalog:
    """The catalogue of `cfg`'s world (numpy, on the driver)."""
    return build_planted_catalog(cfg) if cfg.preset == PLANTED else build_realistic_catalog(cfg)


def user_profile(cfg: SyntheticConfig, cat: AnyCatalog, user_id: int) -> UserProfile:
    if cfg.preset == PLANTED:
        return planted_user_profile(cfg, user_id)
    return realistic_user_profile(cfg, cat, user_id)


def simulate_users(cfg: SyntheticConfig, cat: AnyCatalog,
                   user_ids: np.ndarray) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """(users, raw events incl. malformed rows) for `user_ids` as pandas -- pure, no Spark."""
    if cfg.preset == PLANTED:
        return _simulate_planted_users(cfg, cat, user_ids)
    return _simulate_realistic_users(cfg, cat, user_ids)


def profiles_frame(cfg: SyntheticConfig, user_ids: np.ndarray,
                   cat: Optional[AnyCatalog] = None) -> pd.DataFrame:
    """Ground truth the tables do not show (interests, style), for tests and analyses.

    The realistic world draws interests by category traffic, so it needs the catalogue (built
    from `cfg` when not given)."""
    if cfg.preset == PLANTED:
        return _profiles_table(_planted_profiles(cfg, user_ids))
    cat = build_catalog(cfg) if cat is None else cat
    return _profiles_table([realistic_user_profile(cfg, cat, int(u)) for u in user_ids])


# --------------------------------------------------------------------------------------
# Spark
# --------------------------------------------------------------------------------------
def _events_batches(cfg: SyntheticConfig, cat: AnyCatalog,
                    batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    for batch in batches:
        _, events = simulate_users(cfg, cat, batch["id"].to_numpy())
        yield events


def _users_batches(cfg: SyntheticConfig, cat: AnyCatalog,
                   batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    for batch in batches:
        yield _users_frame([user_profile(cfg, cat, int(u)) for u in batch["id"].to_numpy()])


@dataclass
class SyntheticTables:
    events: "DataFrame"  # noqa: F821 (pyspark DataFrame)
    items: "DataFrame"  # noqa: F821
    users: "DataFrame"  # noqa: F821
    catalog: AnyCatalog


def default_partitions(n_users: int) -> int:
    """~20k users (~400k events) per task keeps each task's memory small."""
    return max(2, int(math.ceil(n_users / 20_000)))


def generate(spark, cfg: SyntheticConfig, partitions: Optional[int] = None) -> SyntheticTables:
    """The three raw tables as Spark DataFrames (lazy: users/events are produced by the tasks)."""
    cat = build_catalog(cfg)
    items_schema = C.spark_schema(C.T_RAW_ITEMS)
    items = spark.createDataFrame(cat.frame(), schema=items_schema)
    ids = spark.range(0, cfg.n_users, numPartitions=partitions or default_partitions(cfg.n_users))
    users = ids.mapInPandas(partial(_users_batches, cfg, cat),
                            schema=C.spark_schema(C.T_RAW_USERS))
    events = ids.mapInPandas(partial(_events_batches, cfg, cat),
                             schema=C.spark_schema(C.T_RAW_EVENTS))
    return SyntheticTables(events, items, users, cat)
