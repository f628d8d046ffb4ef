"""build_sequences as a function: raw tables -> validated tables + quarantine -> sequences,
context_rows, user_sequences, full or incremental, under the lake's build lease.

Why a module of its own: the build is called by its command line (``pipelines.cli``), by the
daily refresh (``pipelines.refresh``), by benchmarks and by tests, always on a SparkSession they
already hold; none of them should need a parser to run it. ``run_build_sequences`` is the one
entry point and ``BuildResult`` what it returns; the rest of the module is how a full build
(``pipelines.build_progress`` said everything is rebuilt) and an incremental one (only the
appended raw events are validated and only the users they touch recomputed) get there. Both
give the same tables.
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional, Tuple

import ctt_contracts as C
from pipelines import lease
from pipelines.build_config import BuildConfig, store_build_config
from pipelines.build_progress import (FULL, OUTPUT_TABLES, RAW_INPUTS, BuildProgress, Plan,
                                      latest_mark, marked_commits, plan_build, store_progress)
from pipelines.context import build_context_rows
from pipelines.delta_io import (CDF_PROPERTIES, KnownRows, WriteResult, raw_schema,
                                read_table, sync_quarantine, sync_table, table_exists,
                                table_version, ts_literal)
from pipelines.sequences import (SplitCutoffs, build_sequences, conversions,
                                 example_keys_from_ranked, examples_from_ranked,
                                 rank_conversions, resolve_cutoffs,
                                 user_sequences_from_ranked)
from pipelines.spark import (ADAPTIVE_CONF, SHUFFLE_PARTITIONS_CONF, session_settings,
                            small_input_settings)
from pipelines.subjects import (DERIVE_NONE, SubjectCoverage, derive_subjects, store_coverage,
                                subject_coverage)
from pipelines.validate import (ValidationReport, event_reasons, format_reports, item_reasons,
                                report_from_reasons, row_local_reason, sort_categories,
                                split_reasoned, user_reasons)


@dataclass
class BuildResult:
    versions: Dict[str, int]  # output table -> Delta version after the run
    writes: List[WriteResult]
    reports: List[ValidationReport]
    cutoffs: SplitCutoffs
    input_versions: Dict[str, int] = field(default_factory=dict)  # raw tables that exist
    subject_coverage: Optional[SubjectCoverage] = None
    mode: str = FULL  # build_progress.INCREMENTAL or FULL
    mode_reason: str = ""  # why this mode (a full build says why it could not be incremental)
    # incremental: users whose rows were recomputed (``users_to_recompute``); full: users with
    # at least one clean conversion (all of whose rows were recomputed)
    users_recomputed: int = 0

    def summary(self) -> Dict[str, object]:
        return {"versions": self.versions, "input_versions": self.input_versions,
                "mode": self.mode, "mode_reason": self.mode_reason,
                "users_recomputed": self.users_recomputed,
                "changed": {w.table: w.changed for w in self.writes},
                "validation": [r.as_dict() for r in self.reports],
                "split_cutoffs": {"val_start": self.cutoffs.val_start.isoformat(),
                                  "test_start": self.cutoffs.test_start.isoformat(),
                                  "origin": self.cutoffs.origin},
                "subject_coverage": (self.subject_coverage.as_dict()
                                     if self.subject_coverage else None)}


def _validate_source(spark, raw, reasoned, columns, source_table: str):
    """Persist the reasoned rows, count them, and check input == clean + quarantined."""
    from pyspark import StorageLevel

    reasoned = reasoned.persist(StorageLevel.MEMORY_AND_DISK)
    report = report_from_reasons(source_table, reasoned)
    n_raw = raw.count()
    if n_raw != report.n_input:
        raise RuntimeError(f"{source_table}: validation saw {report.n_input} rows but the input has "
                           f"{n_raw} (a join duplicated or lost rows)")
    clean, quarantine = split_reasoned(reasoned, columns, source_table)
    return reasoned, clean, quarantine, report


def _read_raw(spark, lake: str, table: str, version: Optional[int]):
    """A raw table at `version` with the current contract's columns: a table written before a
    nullable column existed (e.g. session_id) reads it as null; a missing optional table
    (raw_users: the users file is optional) reads as empty."""
    from pyspark.sql import functions as F

    schema = raw_schema(table)
    if version is None:
        return spark.createDataFrame([], schema)
    df = read_table(spark, C.LakePaths(lake).table(table), version)
    for f in schema.fields:
        if f.name not in df.columns:
            df = df.withColumn(f.name, F.lit(None).cast(f.dataType))
    return df.select(*schema.fieldNames())


def _fail_fast(reasoned_by_source, reports: List[ValidationReport], max_frac: float) -> None:
    """Stop before any write when a source is mostly quarantined (usually a wrong mapping)."""
    from pipelines.validate import (QuarantineThresholdExceeded, over_threshold, reason_examples,
                                    threshold_message)

    bad = [r for r in reports if over_threshold(r, max_frac)]
    if bad:
        messages = [threshold_message(r, max_frac, reason_examples(reasoned_by_source[r.source_table]))
                    for r in bad]
        raise QuarantineThresholdExceeded(
            "build stopped, nothing written.\n" + "\n".join(messages)
            + "\nFix the import mapping and ingest again, or pass --max-quarantine-frac 1 to "
              "build anyway.")


def repair_command(lake: str) -> str:
    return (f"python jobs/build_sequences.py --lake {lake} --repair-duplicates (with the run's "
            f"other flags)")


@dataclass(frozen=True)
class _Writes:
    """How this run writes: the lease's fence before each commit, and the duplicate policy."""

    fence: Callable[[], None]
    repair: bool
    hint: str

    def sync(self, spark, df, path: str, table: str, schema, key_cols, **kwargs) -> WriteResult:
        return sync_table(spark, df, path, table, schema, key_cols, fence=self.fence,
                          repair_duplicates=self.repair, repair_hint=self.hint, **kwargs)


def run_build_sequences(spark, lake: str, cfg: BuildConfig = BuildConfig(),
                        now: Optional[datetime] = None, repair_duplicates: bool = False,
                        lease_ttl_s: Optional[float] = None, full: bool = False) -> BuildResult:
    """raw tables -> validated tables + quarantine -> sequences, context_rows, user_sequences.

    raw_events and raw_items are required; raw_users is optional (no users file: every user's
    demographics are unknown, and the users table is empty).

    Incremental by default (``pipelines.build_progress``): when the lake records what the last
    build consumed and raw_events only grew since, only the appended raw rows are validated and
    only the users they touch are recomputed; otherwise (or with ``full``) everything is
    rebuilt, and the result says why. Both give the same tables.

    Holds the lake's ``build_sequences`` writer lease for the whole run (another live build of
    the same lake -> ``lease.LeaseHeldError`` before anything is read or written). A key found
    twice in an output table -> ``DuplicateKeyError`` naming table, key and repair command; with
    ``repair_duplicates`` those keys' rows are deleted and recomputed instead.
    """
    now = now or datetime.now(timezone.utc)
    paths = C.LakePaths(lake)
    for raw in (C.T_RAW_EVENTS, C.T_RAW_ITEMS):  # before the lease: a wrong path must not get
        if not table_exists(spark, paths.table(raw)):  # a lease table; raw_users is optional
            raise FileNotFoundError(
                f"no Delta table {raw} at {paths.table(raw)}: run generate_data or ingest first"
                + (" (ingest writes raw_items from --items or --item-categories-from-events)"
                   if raw == C.T_RAW_ITEMS else ""))
    with lease.held(lake, lease.SCOPE_BUILD, "build_sequences", lease_ttl_s) as writer, \
            marked_commits(spark):
        return _build(spark, lake, cfg, now, _Writes(writer.check, repair_duplicates,
                                                     repair_command(lake)), full)


def _build(spark, lake: str, cfg: BuildConfig, now: datetime, how: _Writes,
           full: bool) -> BuildResult:
    """Plan (incremental or full), build, then record the progress: last, so that a run that
    stops half way leaves the previous record and the next run redoes the increment."""
    paths = C.LakePaths(lake)
    marks = {t: latest_mark(spark, paths.table(t)) for t in RAW_INPUTS
             if table_exists(spark, paths.table(t))}
    in_versions = {t: m.version for t, m in marks.items()}
    plan = plan_build(spark, lake, cfg, now, marks, full, how.repair)
    print(plan.line(), flush=True)
    if plan.incremental:
        result, validated = _build_increment(spark, lake, cfg, now, how, plan, in_versions)
    else:
        result, validated = _build_full(spark, lake, cfg, now, how, in_versions), True
    result.mode, result.mode_reason = plan.mode, plan.reason
    outputs = {t: latest_mark(spark, paths.table(t)) for t in OUTPUT_TABLES}
    # a run that validated nothing keeps the last reference time: rows quarantined as in the
    # future then are re-checked from that time on
    progress_now = now if validated else plan.progress.now
    how.fence()
    store_progress(spark, lake, BuildProgress(progress_now, marks, outputs, result.cutoffs,
                                              result.subject_coverage), now)
    return result


def _build_full(spark, lake: str, cfg: BuildConfig, now: datetime, how: _Writes,
                in_versions: Dict[str, int]) -> BuildResult:
    paths = C.LakePaths(lake)
    raw_items, raw_users, raw_events = (_read_raw(spark, lake, t, in_versions.get(t))
                                        for t in (C.T_RAW_ITEMS, C.T_RAW_USERS, C.T_RAW_EVENTS))

    writes: List[WriteResult] = []
    reports: List[ValidationReport] = []
    persisted = []
    try:
        r_items, items, q_items, rep = _validate_source(
            spark, raw_items, item_reasons(raw_items), C.ITEMS_COLUMNS, C.T_RAW_ITEMS)
        items = sort_categories(items)
        persisted.append(r_items)
        reports.append(rep)
        r_users, users, q_users, rep = _validate_source(
            spark, raw_users, user_reasons(raw_users), C.USERS_COLUMNS, C.T_RAW_USERS)
        persisted.append(r_users)
        reports.append(rep)
        r_events, events, q_events, rep = _validate_source(
            spark, raw_events, event_reasons(raw_events, items, now), C.RAW_EVENTS_COLUMNS,
            C.T_RAW_EVENTS)
        persisted.append(r_events)
        reports.append(rep)
        print(format_reports(reports))
        _fail_fast({C.T_RAW_ITEMS: r_items, C.T_RAW_USERS: r_users, C.T_RAW_EVENTS: r_events},
                   reports, cfg.max_quarantine_frac)

        writes.append(how.sync(spark, items, paths.table(C.T_ITEMS), C.T_ITEMS,
                               C.spark_schema(C.T_ITEMS), [C.ITEM_ID]))
        writes.append(how.sync(spark, users, paths.table(C.T_USERS), C.T_USERS,
                               C.spark_schema(C.T_USERS), [C.USER_ID]))
        writes.append(how.sync(spark, events, paths.table(C.T_EVENTS), C.T_EVENTS,
                               C.spark_schema(C.T_EVENTS), C.RAW_EVENTS_COLUMNS))
        writes.append(sync_quarantine(spark, q_items.unionByName(q_users).unionByName(q_events),
                                      lake, [C.T_RAW_ITEMS, C.T_RAW_USERS, C.T_RAW_EVENTS], now,
                                      fence=how.fence))
    finally:
        for df in persisted:
            df.unpersist()

    outputs, cutoffs, coverage, n_users = _build_outputs(spark, lake, cfg, now, writes, how)
    writes.extend(outputs)
    return BuildResult({w.table: w.version for w in writes}, writes, reports, cutoffs, in_versions,
                       coverage, users_recomputed=n_users)


def _build_outputs(spark, lake: str, cfg: BuildConfig, now: datetime, earlier: List[WriteResult],
                   how: _Writes) -> Tuple[List[WriteResult], SplitCutoffs, SubjectCoverage, int]:
    from pyspark import StorageLevel

    paths = C.LakePaths(lake)
    version_of = {r.table: r.version for r in earlier}
    events = read_table(spark, paths.table(C.T_EVENTS), version_of[C.T_EVENTS])
    items = read_table(spark, paths.table(C.T_ITEMS), version_of[C.T_ITEMS])
    events = derive_subjects(events, cfg.derive_subject, cfg.subject_window_minutes)
    conv = conversions(events).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        coverage = subject_coverage(conv, cfg.derive_subject, cfg.subject_window_minutes)
        print(coverage.line())
        how.fence()
        store_coverage(spark, lake, coverage)
        store_build_config(spark, lake, cfg, now)
        cutoffs = resolve_cutoffs(spark, lake, conv, cfg.explicit_cutoffs(), cfg.val_frac,
                                  cfg.test_frac, now)
        out = _write_outputs(spark, paths, cfg, conv, items, cutoffs, how)
        return out, cutoffs, coverage, conv.select(C.USER_ID).distinct().count()
    finally:
        conv.unpersist()


def _write_outputs(spark, paths: C.LakePaths, cfg: BuildConfig, conv, items, cutoffs: SplitCutoffs,
                   how: _Writes, scope=None) -> List[WriteResult]:
    """conversions -> sequences, context_rows, user_sequences, each synchronised with its table
    (only the rows of the users in `scope` when given: an incremental build)."""
    from pyspark import StorageLevel

    # an incremental build's scoped syncs: the table's keys were checked by the last full build
    # and only keyed MERGEs wrote since (build_progress refuses anything else)
    scoped = dict(scope=scope, check_table_duplicates=scope is None)
    ranked = rank_conversions(conv).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        examples = examples_from_ranked(ranked, cfg.max_len, cfg.min_history)
        keys = example_keys_from_ranked(ranked, cfg.max_len, cfg.min_history)
        out = [
            how.sync(spark, build_sequences(examples, cutoffs), paths.table(C.T_SEQUENCES),
                     C.T_SEQUENCES, C.spark_schema(C.T_SEQUENCES), C.SEQUENCES_KEY, **scoped),
            how.sync(spark, build_context_rows(keys, items, cfg.context_top_k),
                     paths.table(C.T_CONTEXT_ROWS), C.T_CONTEXT_ROWS,
                     C.spark_schema(C.T_CONTEXT_ROWS), C.CONTEXT_ROWS_KEY, **scoped),
        ]
        out.append(how.sync(spark, user_sequences_from_ranked(ranked, cfg.max_len),
                            paths.table(C.T_USER_SEQUENCES), C.T_USER_SEQUENCES,
                            C.spark_schema(C.T_USER_SEQUENCES), [C.USER_ID],
                            properties=CDF_PROPERTIES, **scoped))
        return out
    finally:
        ranked.unpersist()


# --------------------------------------------------------------------------------------
# Incremental build: the appended raw events and the users they touch
# --------------------------------------------------------------------------------------
_RECHECKED = "__rechecked"  # candidate row read again: quarantined as in the future last time


def _unchanged(spark, paths: C.LakePaths, table: str) -> WriteResult:
    path = paths.table(table)
    return WriteResult(table, path, table_version(spark, path), False, operation="noop")


def _increment_rows(spark, lake: str, plan: Plan, now: datetime):
    """The raw rows to validate: the appended ones, and the earlier ones the last build
    quarantined as in the future whose time has come (a full build at `now` would accept
    them). Carries _RECHECKED."""
    from pyspark.sql import functions as F

    prog = plan.progress
    before = prog.inputs[C.T_RAW_EVENTS].version
    parts = []
    if plan.appended is not None:
        parts.append(plan.appended.withColumn(_RECHECKED, F.lit(False)))
    if now > prog.now:
        raw = _read_raw(spark, lake, C.T_RAW_EVENTS, before)
        ts = F.col(C.EVENT_TS)
        due = ((ts > ts_literal(prog.now)) & (ts <= ts_literal(now))
               & (row_local_reason(raw, C.T_RAW_EVENTS, prog.now) == C.R_FUTURE_TIMESTAMP))
        parts.append(raw.where(due).withColumn(_RECHECKED, F.lit(True)))
    if not parts:
        return spark.createDataFrame([], raw_schema(C.T_RAW_EVENTS)).withColumn(
            _RECHECKED, F.lit(False))
    out = parts[0]
    for part in parts[1:]:
        out = out.unionByName(part)
    return out


def _quarantine_after(spark, lake: str, prog: BuildProgress, reasoned, q_events):
    """The raw_events partition of quarantine after the increment: as the last build left it,
    minus the re-checked rows' timestamp_in_future rows, plus the increment's quarantined rows.
    Computed from the version the progress records, so a redo after a crash gives the same."""
    from pyspark.sql import functions as F

    path = C.LakePaths(lake).table(C.T_QUARANTINE)
    cols = [C.ROW_JSON, C.SOURCE_TABLE, C.REASON]
    base = (read_table(spark, path, prog.outputs[C.T_QUARANTINE].version)
            .where(F.col(C.SOURCE_TABLE) == C.T_RAW_EVENTS).select(*cols))
    removed = reasoned.where(F.col(_RECHECKED)).select(
        C.ROW_JSON, F.lit(C.T_RAW_EVENTS).alias(C.SOURCE_TABLE),
        F.lit(C.R_FUTURE_TIMESTAMP).alias(C.REASON))
    return base.exceptAll(removed).unionByName(q_events.select(*cols))


def _sync_increment_quarantine(spark, lake: str, now: datetime, how: _Writes,
                               prog: BuildProgress, ev: "_Validated",
                               q_users=None) -> WriteResult:
    """One quarantine commit at most, for the sources the increment validated again."""
    rows, sources = [], []
    if q_users is not None:
        rows.append(q_users)
        sources.append(C.T_RAW_USERS)
    if ev.reasoned is not None:
        rows.append(_quarantine_after(spark, lake, prog, ev.reasoned, ev.quarantine))
        sources.append(C.T_RAW_EVENTS)
    if not sources:
        return _unchanged(spark, C.LakePaths(lake), C.T_QUARANTINE)
    union = rows[0] if len(rows) == 1 else rows[0].unionByName(rows[1])
    return sync_quarantine(spark, union, lake, sources, now, fence=how.fence)


def _coverage_shift(base: SubjectCoverage, old: SubjectCoverage,
                    new: SubjectCoverage) -> SubjectCoverage:
    """base - old + new, count by count (old/new: the recomputed users before and after)."""
    counts = ("conversions", "logged", "derived_session", "derived_window",
              "derived_is_converted_item")
    values = {k: getattr(base, k) - getattr(old, k) + getattr(new, k) for k in counts}
    return SubjectCoverage(base.derive_mode, base.window_minutes, **values)


@dataclass
class _Validated:
    """An increment's validation: reasoned rows (None: nothing to validate), clean rows,
    quarantine rows, report, and the clean events the last build left for the increment's
    users (persisted: the later steps read the touched users' events from it)."""

    reasoned: object
    clean: object
    quarantine: object
    report: ValidationReport
    prior: object = None

    def unpersist(self) -> None:
        for df in (self.reasoned, self.prior):
            if df is not None:
                df.unpersist()


def _validate_increment(spark, lake: str, now: datetime, plan: Plan, items,
                        clean_before) -> _Validated:
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    candidates = _increment_rows(spark, lake, plan, now).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        if candidates.isEmpty():
            return _Validated(None, None, None, ValidationReport(C.T_RAW_EVENTS, 0, 0, {}))
        users = candidates.where(F.col(C.USER_ID).isNotNull()).select(C.USER_ID).distinct()
        prior = clean_before.join(users, C.USER_ID, "left_semi").persist(
            StorageLevel.MEMORY_AND_DISK)
        reasoned, clean, quarantine, report = _validate_source(
            spark, candidates, event_reasons(candidates, items, now, prior),
            C.RAW_EVENTS_COLUMNS, C.T_RAW_EVENTS)
        return _Validated(reasoned, clean, quarantine, report, prior)
    finally:
        candidates.unpersist()  # the reasoned rows are persisted


def _increment_settings(spark, reports: List[ValidationReport], ev: _Validated) -> Dict[str, str]:
    """The session settings for the rest of an incremental build, which shuffles the increment
    and its users' earlier events, not the lake (``spark.small_input_settings``); printed,
    since they differ from the job's own."""
    shuffled = sum(r.n_input for r in reports) + (ev.prior.count() if ev.prior is not None else 0)
    settings = small_input_settings(shuffled, spark.sparkContext.defaultParallelism)
    print(f"increment: {shuffled:,} rows with its users' earlier events: " + (
        f"{ADAPTIVE_CONF}=false, {SHUFFLE_PARTITIONS_CONF}={settings[SHUFFLE_PARTITIONS_CONF]}"
        if settings else "the session's settings"), flush=True)
    return settings


def users_to_recompute(passed, derive_subject: str):
    """The users whose sequences, context rows and user_sequences rows an increment can change:
    ``passed`` holds the increment's rows that passed validation (DataFrame -> user ids).

    Why not every user with a new event: without subject derivation only conversions enter
    those tables, and a day's events are mostly views (91 % in the realistic preset), so
    recomputing the viewers too multiplied the users recomputed, diffed and MERGEd ~20x for
    nothing. With derivation a view can become a conversion's subject: every user counts.
    """
    from pyspark.sql import functions as F

    if derive_subject == DERIVE_NONE:
        passed = passed.where(F.col(C.EVENT_TYPE) == C.EVENT_CONVERSION)
    return passed.select(C.USER_ID).distinct()


def _build_increment(spark, lake: str, cfg: BuildConfig, now: datetime, how: _Writes, plan: Plan,
                     in_versions: Dict[str, int]) -> Tuple[BuildResult, bool]:
    """Validate the increment, MERGE its clean events and quarantine rows, recompute the touched
    users. Returns the result and whether any raw row was validated."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from pipelines.validate import REASON_COLUMN

    paths = C.LakePaths(lake)
    prog = plan.progress
    items = read_table(spark, paths.table(C.T_ITEMS))  # as the last build wrote it (checked)
    clean_before = read_table(spark, paths.table(C.T_EVENTS), prog.outputs[C.T_EVENTS].version)
    reports: List[ValidationReport] = []
    writes: List[WriteResult] = [_unchanged(spark, paths, C.T_ITEMS)]
    persisted = []
    small = ExitStack()
    try:
        reasoned_by_source = {}
        if plan.users_changed:
            raw_users = _read_raw(spark, lake, C.T_RAW_USERS, in_versions.get(C.T_RAW_USERS))
            r_users, users, q_users, rep = _validate_source(
                spark, raw_users, user_reasons(raw_users), C.USERS_COLUMNS, C.T_RAW_USERS)
            persisted.append(r_users)
            reports.append(rep)
            reasoned_by_source[C.T_RAW_USERS] = r_users
        ev = _validate_increment(spark, lake, now, plan, items, clean_before)
        reports.append(ev.report)
        persisted.append(ev)
        if ev.reasoned is not None:
            reasoned_by_source[C.T_RAW_EVENTS] = ev.reasoned
        print(format_reports(reports))
        _fail_fast(reasoned_by_source, reports, cfg.max_quarantine_frac)
        small.enter_context(session_settings(spark, _increment_settings(spark, reports, ev)))

        if plan.users_changed:
            writes.append(how.sync(spark, users, paths.table(C.T_USERS), C.T_USERS,
                                   C.spark_schema(C.T_USERS), [C.USER_ID]))
        else:
            writes.append(_unchanged(spark, paths, C.T_USERS))

        n_touched, touched, events_of_touched = 0, None, None
        n_recompute, recompute = 0, None
        if ev.reasoned is not None:
            # rows that passed checks 1-7 (clean, or a copy of a clean one)
            passed = ev.reasoned.where(F.col(REASON_COLUMN).isNull()
                                       | (F.col(REASON_COLUMN) == C.R_DUPLICATE_EVENT))
            touched = (passed.select(C.USER_ID).distinct()
                       .persist(StorageLevel.MEMORY_AND_DISK))
            persisted.append(touched)
            n_touched = touched.count()
            recompute = users_to_recompute(passed, cfg.derive_subject).persist(
                StorageLevel.MEMORY_AND_DISK)
            persisted.append(recompute)
            n_recompute = recompute.count()
        if n_touched:
            before = ev.prior.join(touched, C.USER_ID, "left_semi")
            events_of_touched = (before.unionByName(ev.clean).persist(StorageLevel.MEMORY_AND_DISK))
            persisted.append(events_of_touched)
            writes.append(how.sync(spark, events_of_touched, paths.table(C.T_EVENTS), C.T_EVENTS,
                                   C.spark_schema(C.T_EVENTS), C.RAW_EVENTS_COLUMNS,
                                   scope=touched, check_table_duplicates=False,
                                   known=KnownRows(prog.outputs[C.T_EVENTS].version, before,
                                                   added=ev.clean)))
        else:
            writes.append(_unchanged(spark, paths, C.T_EVENTS))

        writes.append(_sync_increment_quarantine(spark, lake, now, how, prog, ev,
                                                 q_users if plan.users_changed else None))

        coverage = prog.coverage
        if n_recompute:
            outputs, coverage = _recompute_users(
                spark, lake, cfg, prog, items, recompute,
                events_of_touched.join(recompute, C.USER_ID, "left_semi"),
                before.join(recompute, C.USER_ID, "left_semi"), how)
            writes.extend(outputs)
        else:
            writes.extend(_unchanged(spark, paths, t)
                          for t in (C.T_SEQUENCES, C.T_CONTEXT_ROWS, C.T_USER_SEQUENCES))
        how.fence()
        store_coverage(spark, lake, coverage)
        store_build_config(spark, lake, cfg, now)  # differs at most in a field no row depends on
    finally:
        small.close()
        for df in persisted:
            df.unpersist()
    result = BuildResult({w.table: w.version for w in writes}, writes, reports, prog.cutoffs,
                         in_versions, coverage, users_recomputed=n_recompute)
    return result, ev.report.n_input > 0 or plan.users_changed


def _recompute_users(spark, lake: str, cfg: BuildConfig, prog: BuildProgress, items, touched,
                     events_after, events_before,
                     how: _Writes) -> Tuple[List[WriteResult], SubjectCoverage]:
    """sequences, context_rows, user_sequences of the touched users, from all their clean
    events, with the stored split cutoffs; and the subject coverage shifted by their change."""
    from pyspark import StorageLevel

    def conv_of(events):
        return conversions(derive_subjects(events, cfg.derive_subject,
                                           cfg.subject_window_minutes))

    conv = conv_of(events_after).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        coverage = _coverage_shift(
            prog.coverage,
            subject_coverage(conv_of(events_before), cfg.derive_subject,
                             cfg.subject_window_minutes),
            subject_coverage(conv, cfg.derive_subject, cfg.subject_window_minutes))
        print(coverage.line())
        return (_write_outputs(spark, C.LakePaths(lake), cfg, conv, items, prog.cutoffs, how,
                               scope=touched), coverage)
    finally:
        conv.unpersist()
