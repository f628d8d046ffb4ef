"""What the last successful build consumed, and whether the next one may build incrementally.

Why: a full build re-validates every raw row and re-derives every user's history, so the daily
refresh would cost what the whole lake costs. The lake therefore keeps, under
``<lake>/_meta/build_progress`` (beside the stored build config and split cutoffs), the Delta
version of each raw table the last successful build read, the version of each table it wrote,
the reference time ``now`` it validated with, the split cutoffs and the subject coverage. The
next build then only validates the raw_events rows appended since (read from raw_events' change
data feed, which ``delta_io.write_raw`` enables) and recomputes the users they touch.

The copy is written after every output, so a run that dies half way leaves the previous copy:
the next run redoes the whole increment from there. Every output write of an increment is
idempotent against that starting point (keyed MERGEs scoped to the recomputed users; the
quarantine partition recomputed from its version as of the copy), so a redo ends where an
uninterrupted run would have.

An incremental build must give exactly what a full build of the same input would, so it falls
back to a full one (``Plan.reason`` says why, in one line) whenever the increment is not a
plain append of events: no copy yet; raw_events overwritten, deleted from, restored or
recreated (any commit other than an append or a property change); raw_items changed (a new item
can turn a quarantined unknown_item event clean, and categories feed context rows); another
build configuration or other split cutoffs; a reference time earlier than the last build's; an
output table written by anything but a build since (e.g. rows appended by hand, which only a
full build's duplicate check sees); ``--repair-duplicates`` or ``--full``. raw_users changes
only re-validate the users table, which no other output reads.

One decision differs on purpose: ``--max-quarantine-frac`` is checked on the rows an increment
validates, so an appended file that is mostly quarantined (usually a wrong import mapping of
that file) stops the build, where the same rows diluted in the whole log would not.

Commits of a build are recognisable in each table's history: the build sets Delta's commit
``userMetadata`` to ``MARKER`` while it runs. A commit is recorded as its version and commit
time (``Mark``); tables created by the project's sessions keep that time in their log
(in-commit timestamps, ``pipelines.spark``), so a lake copied by a tool that resets the files'
modification times still builds incrementally.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import ContextManager, Dict, List, Optional

import ctt_contracts as C
from pipelines.build_config import BuildConfig, load_build_config
from pipelines.sequences import SplitCutoffs, load_cutoffs
from pipelines.spark import session_settings
from pipelines.subjects import SubjectCoverage

MARKER = "ctt:build_sequences"
USER_METADATA_CONF = "spark.databricks.delta.commitInfo.userMetadata"

INCREMENTAL = "incremental"
FULL = "full"

RAW_INPUTS = (C.T_RAW_EVENTS, C.T_RAW_ITEMS, C.T_RAW_USERS)
OUTPUT_TABLES = (C.T_ITEMS, C.T_USERS, C.T_EVENTS, C.T_QUARANTINE, C.T_SEQUENCES,
                 C.T_CONTEXT_ROWS, C.T_USER_SEQUENCES)
# Build config fields that do not change any output row: a change of them alone is no reason
# for a full rebuild.
NOT_IN_OUTPUTS = ("max_quarantine_frac",)

# Commits of raw_events an increment can follow: appends, and commits that change no row
# (a property change such as enabling the change data feed, a compaction, a purge of deletion
# vectors, a vacuum: the maintenance docs/operations.md describes). The latter are also allowed
# on the output tables, written by something other than a build.
_APPEND = "WRITE"
_APPEND_MODE = "Append"
_NO_ROW_CHANGE = ("SET TBLPROPERTIES", "OPTIMIZE", "REORG", "VACUUM START", "VACUUM END")


# Why a recorded Mark no longer matches its table.
_REWRITTEN = ("the table was recreated, restored or written again since; or the lake was copied "
              "by a tool that did not keep the log files' modification times and the table "
              "predates in-commit timestamps (pipelines/spark.py)")


@dataclass(frozen=True)
class Mark:
    """One commit of a table: its version and commit time, which together tell a table that was
    deleted and written again (same version numbers, other times) from the one that was read."""

    version: int
    timestamp_ms: int


@dataclass(frozen=True)
class Commit:
    version: int
    timestamp_ms: int
    operation: str
    parameters: Dict[str, str]
    user_metadata: Optional[str]

    def describe(self) -> str:
        mode = self.parameters.get("mode")
        return f"v{self.version} {self.operation}" + (f" ({mode})" if mode else "")

    @property
    def is_append(self) -> bool:
        return self.operation == _APPEND and self.parameters.get("mode") == _APPEND_MODE


def latest_mark(spark, path: str) -> Mark:
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    row = (DeltaTable.forPath(spark, path).history(1)
           .select("version", F.unix_millis("timestamp").alias("ms")).first())
    return Mark(int(row["version"]), int(row["ms"]))


def commits_after(spark, path: str, mark: Mark) -> Optional[List[Commit]]:
    """The commits after `mark`, oldest first; None when the table's commit of that version is
    not `mark` (the table was deleted and written again, or restored to an older version). One
    read of the log when nothing was committed since (the usual case for the outputs)."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    latest = latest_mark(spark, path)
    if latest.version <= mark.version:
        return [] if latest == mark else None
    rows = (DeltaTable.forPath(spark, path).history(latest.version - mark.version + 1)
            .select("version", F.unix_millis("timestamp").alias("ms"), "operation",
                    "operationParameters", "userMetadata").collect())
    commits = sorted((Commit(int(r["version"]), int(r["ms"]), r["operation"],
                             dict(r["operationParameters"] or {}), r["userMetadata"])
                      for r in rows), key=lambda c: c.version)
    if not commits or Mark(commits[0].version, commits[0].timestamp_ms) != mark:
        return None
    return commits[1:]


def marked_commits(spark) -> ContextManager[None]:
    """Every Delta commit of the session carries MARKER while the block runs."""
    return session_settings(spark, {USER_METADATA_CONF: MARKER})


# --------------------------------------------------------------------------------------
# The stored copy
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildProgress:
    now: datetime  # the reference time of the build's validation
    inputs: Dict[str, Mark]  # raw table -> the commit the build read (absent: no such table)
    outputs: Dict[str, Mark]  # output table -> its commit after the build
    cutoffs: SplitCutoffs
    coverage: SubjectCoverage

    def to_json(self) -> str:
        return json.dumps({
            "now": self.now.isoformat(),
            "inputs": {t: asdict(m) for t, m in self.inputs.items()},
            "outputs": {t: asdict(m) for t, m in self.outputs.items()},
            "cutoffs": {"val_start": self.cutoffs.val_start.isoformat(),
                        "test_start": self.cutoffs.test_start.isoformat(),
                        "origin": self.cutoffs.origin},
            "coverage": asdict(self.coverage)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "BuildProgress":
        d = json.loads(text)
        cut = d["cutoffs"]
        return cls(datetime.fromisoformat(d["now"]),
                   {t: Mark(**m) for t, m in d["inputs"].items()},
                   {t: Mark(**m) for t, m in d["outputs"].items()},
                   SplitCutoffs(datetime.fromisoformat(cut["val_start"]),
                                datetime.fromisoformat(cut["test_start"]), cut["origin"]),
                   SubjectCoverage(**d["coverage"]))


def progress_path(lake: str) -> str:
    return C.LakePaths(lake).meta(C.META_BUILD_PROGRESS)


def load_progress(spark, lake: str) -> Optional[BuildProgress]:
    from pipelines.delta_io import load_record

    row = load_record(spark, progress_path(lake))
    return None if row is None else BuildProgress.from_json(row[C.BUILD_PROGRESS_JSON])


def store_progress(spark, lake: str, progress: BuildProgress, now: datetime) -> bool:
    """Replace the stored copy when it changed (True when written)."""
    from pipelines.delta_io import store_json_record

    stored = load_progress(spark, lake)
    if stored is not None and stored.to_json() == progress.to_json():
        return False
    store_json_record(spark, progress_path(lake), C.BUILD_PROGRESS_JSON, progress.to_json(), now)
    return True


# --------------------------------------------------------------------------------------
# Incremental or full?
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    mode: str
    reason: str
    progress: Optional[BuildProgress] = None
    users_changed: bool = False  # raw_users moved: re-validate the users table
    appended: Optional[object] = field(default=None, compare=False)  # DataFrame of new raw rows

    @property
    def incremental(self) -> bool:
        return self.mode == INCREMENTAL

    def line(self) -> str:
        return f"build mode: {self.mode} ({self.reason})"


def _full(reason: str) -> Plan:
    return Plan(FULL, reason)


def _config_change(stored: Optional[BuildConfig], cfg: BuildConfig) -> Optional[str]:
    if stored is None:
        return "the lake stores no build config"
    old, new = stored.stored_fields(), cfg.stored_fields()
    changed = sorted(k for k in new if k not in NOT_IN_OUTPUTS and old.get(k) != new[k])
    if not changed:
        return None
    return "the build config differs from the last build's (" + ", ".join(
        f"{k}: {old.get(k)} -> {new[k]}" for k in changed) + ")"


def _cutoffs_change(spark, lake: str, cfg: BuildConfig,
                    progress: BuildProgress) -> Optional[str]:
    stored = load_cutoffs(spark, lake)
    if stored is None:
        return "the lake stores no split cutoffs"
    same = lambda a, b: (a.val_start, a.test_start) == (b.val_start, b.test_start)  # noqa: E731
    if not same(stored, progress.cutoffs):
        return "the stored split cutoffs changed since the last build"
    explicit = cfg.explicit_cutoffs()
    if explicit is not None and not same(explicit, stored):
        return "--val-start/--test-start differ from the stored split cutoffs"
    return None


def _input_change(spark, lake: str, table: str, progress: BuildProgress,
                  inputs: Dict[str, Mark]) -> Optional[str]:
    """Why raw_items / raw_users are not the ones the last build read (None: they are)."""
    before, now = progress.inputs.get(table), inputs.get(table)
    if before == now:
        return None
    if before is None or now is None:
        return f"{table} {'appeared' if before is None else 'disappeared'} since the last build"
    if before.version == now.version:
        return (f"{table} v{now.version} is not the commit the last build read (its commit time "
                f"differs: {_REWRITTEN})")
    return f"{table} changed since the last build (v{before.version} -> v{now.version})"


def _events_change(spark, lake: str, progress: BuildProgress,
                   inputs: Dict[str, Mark]) -> Optional[str]:
    """Why raw_events is not the table the last build read plus appends (None: it is)."""
    before = progress.inputs.get(C.T_RAW_EVENTS)
    if before is None:
        return "the last build read no raw_events"
    commits = commits_after(spark, C.LakePaths(lake).table(C.T_RAW_EVENTS), before)
    if commits is None:
        return (f"raw_events v{before.version} is not the commit the last build read "
                f"({_REWRITTEN})")
    for c in commits:
        if not (c.is_append or c.operation in _NO_ROW_CHANGE):
            return f"raw_events {c.describe()} is not an append"
    return None


def _outputs_change(spark, lake: str, progress: BuildProgress) -> Optional[str]:
    """Why an output table is not as the last build left it, apart from later builds' commits."""
    from pipelines.delta_io import table_exists

    paths = C.LakePaths(lake)
    for table in OUTPUT_TABLES:
        before = progress.outputs.get(table)
        path = paths.table(table)
        if before is None or not table_exists(spark, path):
            return f"{table} is missing"
        commits = commits_after(spark, path, before)
        if commits is None:
            return f"{table} is not as the last build left it ({_REWRITTEN})"
        foreign = [c for c in commits
                   if c.user_metadata != MARKER and c.operation not in _NO_ROW_CHANGE]
        if foreign:
            return f"{table} {foreign[0].describe()} was written outside build_sequences"
    return None


def appended_events(spark, lake: str, after: int, until: int):
    """The raw_events rows appended in versions (after, until], from the change data feed,
    with the raw columns (``delta_io.raw_schema``). Raises AnalysisException when the feed was
    not recorded for some of those versions."""
    from pyspark.sql import functions as F

    from pipelines.delta_io import raw_schema

    schema = raw_schema(C.T_RAW_EVENTS)
    feed = (spark.read.format("delta").option("readChangeFeed", "true")
            .option("startingVersion", after + 1).option("endingVersion", until)
            .load(C.LakePaths(lake).table(C.T_RAW_EVENTS)))
    feed = feed.where(F.col(C.CDF_TYPE) == C.CDF_INSERT)
    for f in schema.fields:
        if f.name not in feed.columns:
            feed = feed.withColumn(f.name, F.lit(None).cast(f.dataType))
    return feed.select(*schema.fieldNames())


def plan_build(spark, lake: str, cfg: BuildConfig, now: datetime, inputs: Dict[str, Mark],
               full: bool = False, repair: bool = False) -> Plan:
    """Incremental when every condition of the module docstring holds, else full with the
    first reason found."""
    from pyspark.errors import AnalysisException

    if full:
        return _full("--full given")
    if repair:
        return _full("--repair-duplicates given")
    progress = load_progress(spark, lake)
    if progress is None:
        return _full("no build progress recorded in the lake yet")
    if now < progress.now:
        return _full(f"now {now.isoformat()} is earlier than the last build's "
                     f"{progress.now.isoformat()}")
    for why in (lambda: _config_change(load_build_config(spark, lake), cfg),
                lambda: _cutoffs_change(spark, lake, cfg, progress),
                lambda: _input_change(spark, lake, C.T_RAW_ITEMS, progress, inputs),
                lambda: _events_change(spark, lake, progress, inputs),
                lambda: _outputs_change(spark, lake, progress)):
        reason = why()
        if reason is not None:
            return _full(reason)
    after, until = progress.inputs[C.T_RAW_EVENTS].version, inputs[C.T_RAW_EVENTS].version
    appended = None
    if until > after:
        try:
            appended = appended_events(spark, lake, after, until)
        except AnalysisException as err:
            first = str(err).strip().splitlines()[0]
            return _full(f"raw_events has no change data feed for v{after + 1}..v{until}: {first}")
    users_changed = _input_change(spark, lake, C.T_RAW_USERS, progress, inputs) is not None
    n_new = until - after
    return Plan(INCREMENTAL, f"raw_events v{after} -> v{until}, {n_new} new commit(s)"
                + ("; raw_users changed" if users_changed else ""),
                progress, users_changed, appended)

