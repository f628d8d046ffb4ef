"""Subject items derived from browsing: what the user was looking at when converting.

Why: a conversion's real context is its subject item's categories (``pipelines.context``), but
most public logs never log a subject item (REES46: views, carts and purchases only). What a
shopper looked at right before buying is the best stand-in the log has, so the build can derive
it (``--derive-subject``):

* ``none``            -- the logged subject only (the default: nothing is invented);
* ``last_view``       -- the item of the user's last browsing event (view or click) before the
  conversion. On logs whose front end emits a view of the product right before the cart or the
  purchase (REES46: 99 % of conversions) this is the converted item itself: its categories are
  the label's, a leak of the answer rather than a context;
* ``last_other_view`` -- the last browsed item *different from the converted one*: the product
  the shopper came from, which is the context a recommender sees at serving time (REES46: 38 %
  of conversions have one in their session, sharing the label's category 91 % of the time).
  This is what the REES46 demo uses.

Where a view may come from: when the conversion carries a session id, views of the same user in
the same session (any time earlier in it); when it has none, views of the same user without a
session id at most ``window_minutes`` before the conversion.

What "before" means: a view counts when its timestamp is <= the conversion's. Logs have second
resolution and front ends emit the product view in the same second as the add-to-cart, so a
strict "<" would miss it; the conversion row itself is a conversion, never a view, so it cannot
be its own subject, and views later than the conversion never count. Among views in the same
instant the one with the largest item id is taken as the last (the log has no finer order; the
choice is deterministic so reruns give the same rows).

A logged subject always wins: ``conversions()`` takes the smallest logged subject of a
conversion's rows and falls back to the derived one only when no row logged any.

Algorithm (window functions only, no Python UDFs; one sort per (user, session)):
events are ordered by (time, views before conversions, item). For every row, ``a`` = the last
view so far (item, time). Views form runs of consecutive views of one item; ``b`` = the view just
before the current run (item, time). The last view different from the converted item X is ``a``
when ``a != X``, else ``b`` (every view after ``b`` is of X, and ``b`` is not). A window check on
the candidate's time finishes the session-less case.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.window import Window

import ctt_contracts as C

DERIVE_NONE = "none"
DERIVE_LAST_VIEW = "last_view"
DERIVE_LAST_OTHER_VIEW = "last_other_view"
DERIVE_MODES = (DERIVE_NONE, DERIVE_LAST_VIEW, DERIVE_LAST_OTHER_VIEW)
DEFAULT_WINDOW_MINUTES = 60
BROWSING_TYPES = (C.EVENT_VIEW, C.EVENT_CLICK)

# Where a conversion's subject came from (internal column of conversions; counted, not stored).
SUBJECT_ORIGIN = "__subject_origin"
ORIGIN_LOGGED = "logged"
ORIGIN_SESSION = "session"  # derived from a view in the conversion's session
ORIGIN_WINDOW = "window"  # derived from a session-less view within the time window

# Internal column of events after `derive_subjects`: struct(item, origin) or null.
DERIVED_SUBJECT = "__derived_subject"

_TS = "__subj_ts_us"
_IS_VIEW = "__subj_is_view"
_PREV_ITEM, _PREV_TS = "__subj_prev_item", "__subj_prev_ts"
_RUN_START = "__subj_run_start"
_A_ITEM, _A_TS, _B_ITEM, _B_TS = "__subj_a_item", "__subj_a_ts", "__subj_b_item", "__subj_b_ts"



def _check(mode: str, window_minutes: int) -> None:
    if mode not in DERIVE_MODES:
        raise ValueError(f"derive mode must be one of {DERIVE_MODES}, got {mode!r}")
    if window_minutes <= 0:
        raise ValueError(f"subject window must be > 0 minutes, got {window_minutes}")


def _last(col: Column, w) -> Column:
    return F.last(col, ignorenulls=True).over(w)


def derive_subjects(events: DataFrame, mode: str = DERIVE_NONE,
                    window_minutes: int = DEFAULT_WINDOW_MINUTES) -> DataFrame:
    """Clean events -> the same rows plus DERIVED_SUBJECT on conversions (see the module docstring).

    DERIVED_SUBJECT is struct(item long, origin string) -- origin ORIGIN_SESSION or ORIGIN_WINDOW --
    or null (no qualifying view, a non-conversion row, or mode "none"). The logged
    subject_item_id is left as it is; ``sequences.conversions`` lets it win.
    """
    _check(mode, window_minutes)
    struct_type = "struct<item:bigint,origin:string>"
    if mode == DERIVE_NONE:
        return events.withColumn(DERIVED_SUBJECT, F.lit(None).cast(struct_type))
    cols = events.columns
    order = Window.partitionBy(C.USER_ID, C.SESSION_ID).orderBy(
        _TS, F.col(_IS_VIEW).desc(), C.ITEM_ID)
    before = order.rowsBetween(Window.unboundedPreceding, -1)
    upto = order.rowsBetween(Window.unboundedPreceding, Window.currentRow)
    view_item = F.when(F.col(_IS_VIEW), F.col(C.ITEM_ID))
    view_ts = F.when(F.col(_IS_VIEW), F.col(_TS))
    df = (events.withColumn(_TS, F.unix_micros(F.col(C.EVENT_TS)))
          .withColumn(_IS_VIEW, F.col(C.EVENT_TYPE).isin(*BROWSING_TYPES))
          .withColumn(_PREV_ITEM, _last(view_item, before))
          .withColumn(_PREV_TS, _last(view_ts, before))
          .withColumn(_A_ITEM, _last(view_item, upto))
          .withColumn(_A_TS, _last(view_ts, upto)))
    # A run of views of one item starts where the previous view is of another item; its b is
    # that previous view. Null at the first run (no earlier view), which `last` then skips.
    run_start = F.col(_IS_VIEW) & F.col(_PREV_ITEM).isNotNull() & (
        F.col(_PREV_ITEM) != F.col(C.ITEM_ID))
    df = (df.withColumn(_RUN_START, run_start)
          .withColumn(_B_ITEM, _last(F.when(F.col(_RUN_START), F.col(_PREV_ITEM)), upto))
          .withColumn(_B_TS, _last(F.when(F.col(_RUN_START), F.col(_PREV_TS)), upto)))
    if mode == DERIVE_LAST_VIEW:
        item, ts = F.col(_A_ITEM), F.col(_A_TS)
    else:
        other = F.col(_A_ITEM) != F.col(C.ITEM_ID)
        item = F.when(other, F.col(_A_ITEM)).otherwise(F.col(_B_ITEM))
        ts = F.when(other, F.col(_A_TS)).otherwise(F.col(_B_TS))
    in_session = F.col(C.SESSION_ID).isNotNull()
    in_window = (F.col(_TS) - ts) <= F.lit(window_minutes * 60 * 1_000_000)
    ok = (F.col(C.EVENT_TYPE) == C.EVENT_CONVERSION) & item.isNotNull() & (in_session | in_window)
    origin = F.when(in_session, F.lit(ORIGIN_SESSION)).otherwise(F.lit(ORIGIN_WINDOW))
    derived = F.when(ok, F.struct(item.alias("item"), origin.alias("origin")))
    return df.withColumn(DERIVED_SUBJECT, derived.cast(struct_type)).select(*cols, DERIVED_SUBJECT)


def resolve_subject(logged: Column, derived: Optional[Column]) -> Dict[str, Column]:
    """The conversion's subject (logged wins) and its origin, from the aggregated columns."""
    origin = F.when(logged.isNotNull(), F.lit(ORIGIN_LOGGED))
    if derived is None:
        return {C.SUBJECT_ITEM_ID: logged, SUBJECT_ORIGIN: origin}
    return {C.SUBJECT_ITEM_ID: F.coalesce(logged, derived["item"]),
            SUBJECT_ORIGIN: origin.otherwise(derived["origin"])}


# --------------------------------------------------------------------------------------
# Coverage: how many conversions got a subject, and from where
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SubjectCoverage:
    """Counts over all distinct conversions of the build (before the min-history filter)."""

    derive_mode: str
    window_minutes: int
    conversions: int
    logged: int
    derived_session: int
    derived_window: int
    derived_is_converted_item: int  # derived subjects equal to the converted item itself

    @property
    def derived(self) -> int:
        return self.derived_session + self.derived_window

    @property
    def without_subject(self) -> int:
        return self.conversions - self.logged - self.derived

    def share(self, n: int) -> float:
        return n / self.conversions if self.conversions else 0.0

    def as_dict(self) -> Dict[str, object]:
        out: Dict[str, object] = asdict(self)
        out.update(derived=self.derived, without_subject=self.without_subject,
                   share_logged=round(self.share(self.logged), 6),
                   share_derived=round(self.share(self.derived), 6),
                   share_without_subject=round(self.share(self.without_subject), 6))
        return out

    def line(self) -> str:
        pct = lambda n: f"{n} ({self.share(n):.1%})"  # noqa: E731
        return (f"subjects of {self.conversions} conversions (derive {self.derive_mode}, window "
                f"{self.window_minutes} min): logged {pct(self.logged)}, derived "
                f"{pct(self.derived)} [session {self.derived_session}, window "
                f"{self.derived_window}; = converted item {self.derived_is_converted_item}], "
                f"none {pct(self.without_subject)}")


def subject_coverage(conv: DataFrame, mode: str, window_minutes: int) -> SubjectCoverage:
    """One aggregation over conversions carrying SUBJECT_ORIGIN (``sequences.conversions``)."""
    origin = F.col(SUBJECT_ORIGIN)
    count = lambda cond: F.count(F.when(cond, 1))  # noqa: E731
    row = conv.agg(
        F.count(F.lit(1)).alias("n"),
        count(origin == ORIGIN_LOGGED).alias("logged"),
        count(origin == ORIGIN_SESSION).alias("session"),
        count(origin == ORIGIN_WINDOW).alias("window"),
        count(origin.isin(ORIGIN_SESSION, ORIGIN_WINDOW)
              & (F.col(C.SUBJECT_ITEM_ID) == F.col(C.ITEM_ID))).alias("same"),
    ).first()
    return SubjectCoverage(mode, window_minutes, int(row["n"]), int(row["logged"]),
                           int(row["session"]), int(row["window"]), int(row["same"]))


def coverage_path(lake: str) -> str:
    """The share of conversions with a subject, stored like the split cutoffs (one-row table)."""
    return C.LakePaths(lake).meta(C.META_SUBJECT_COVERAGE)


def load_coverage(spark: SparkSession, lake: str) -> Optional[SubjectCoverage]:
    from pipelines.delta_io import load_record

    row = load_record(spark, coverage_path(lake))
    return None if row is None else SubjectCoverage(**row.asDict())


def store_coverage(spark: SparkSession, lake: str, coverage: SubjectCoverage) -> bool:
    """Replace the stored coverage when it changed (True when written): reruns commit nothing."""
    if load_coverage(spark, lake) == coverage:
        return False
    df = spark.createDataFrame([tuple(asdict(coverage).values())],
                               "derive_mode string, window_minutes int, conversions long, "
                               "logged long, derived_session long, derived_window long, "
                               "derived_is_converted_item long")
    df.coalesce(1).write.format("delta").mode("overwrite").save(coverage_path(lake))
    return True
