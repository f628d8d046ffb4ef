"""Entry points of the data jobs: argparse mains (console scripts) and the run_* orchestrations.

``jobs/*.py`` only import a main from here, so ``python jobs/x.py``, ``spark-submit jobs/x.py``
and the console scripts (``ctt-generate-data``, ``ctt-ingest``, ``ctt-build-sequences``) behave
the same. Each ``run_*`` function does read -> transforms -> write on a given SparkSession and
returns what it wrote, so tests call them without a subprocess.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import ctt_contracts as C
from pipelines import lease
from pipelines.build_config import (BuildConfig, add_build_flags, flag_values,
                                    store_build_config, timestamp_arg)
from pipelines.build_progress import (FULL, OUTPUT_TABLES, RAW_INPUTS, BuildProgress, Plan,
                                      latest_mark, marked_commits, plan_build, store_progress)
from pipelines.context import build_context_rows
from pipelines.delta_io import (CDF_PROPERTIES, WriteResult, ensure_properties, print_results,
                                raw_schema, ts_literal,
                                read_table, sync_quarantine, sync_table, table_exists,
                                table_version)
from pipelines.sequences import (SplitCutoffs, build_sequences, conversions,
                                 example_keys_from_ranked, examples_from_ranked,
                                 rank_conversions, resolve_cutoffs,
                                 user_sequences_from_ranked)
from pipelines.subjects import (SubjectCoverage, derive_subjects, store_coverage,
                                subject_coverage)
from pipelines.validate import (ValidationReport, event_reasons,
                                format_reports, item_reasons, report_from_reasons,
                                row_local_reason, sort_categories, split_reasoned, user_reasons)



def add_spark_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lake", default="./lake",
                        help="root folder/URI of the Delta tables (default: ./lake)")
    parser.add_argument("--master", default=None,
                        help="Spark master; default: the one spark-submit set, else local[*]")
    parser.add_argument("--shuffle-partitions", type=int, default=None,
                        help="spark.sql.shuffle.partitions (default: Spark's)")


def job_session(args: argparse.Namespace, app: str):
    from pipelines.delta_io import tune_local_delta
    from pipelines.spark import get_spark

    spark = get_spark(app, master=args.master, shuffle_partitions=args.shuffle_partitions)
    tune_local_delta(spark)
    return spark


# --------------------------------------------------------------------------------------
# generate_data
# --------------------------------------------------------------------------------------
_KNOB_FLAGS = {"n_items": "--items", "n_categories": "--categories", "n_styles": "--styles"}


def _knob_flag(knob: str) -> str:
    return _KNOB_FLAGS.get(knob, "--" + knob.replace("_", "-"))


def _default_text(value: object) -> str:
    return "derived" if value is None else str(value)


def generate_parser() -> argparse.ArgumentParser:
    from pipelines.synthetic import (ALL_KNOBS, KNOB_HELP, PRESET_DEFAULTS, PRESETS, REALISTIC,
                                     SyntheticConfig, knob_type)

    d = SyntheticConfig()
    p = argparse.ArgumentParser(
        prog="generate_data",
        description="Write seeded synthetic raw_events / raw_items / raw_users Delta tables "
                    "(see pipelines/synthetic.py: a realistic world calibrated to real logs, or "
                    "the planted world of the first quality bars). Overwrites them.")
    add_spark_args(p)
    p.add_argument("--preset", choices=PRESETS, default=REALISTIC,
                   help=f"which world (default {REALISTIC}); every knob below overrides the "
                        f"preset's default, and a knob of the other preset is refused")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--users", type=int, default=d.n_users, help=f"users (default {d.n_users})")
    size.add_argument("--events", type=int, default=None,
                      help="approximate number of events instead of --users")
    knobs = p.add_argument_group("knobs (default: the preset's)")
    for knob in ALL_KNOBS:
        defaults = ", ".join(f"{name} {_default_text(PRESET_DEFAULTS[name][knob])}"
                             for name in PRESETS if knob in PRESET_DEFAULTS[name])
        knobs.add_argument(_knob_flag(knob), dest=knob, type=knob_type(knob), default=None,
                           help=f"{KNOB_HELP[knob]} (default: {defaults})")
    p.add_argument("--malformed-frac", type=float, default=d.malformed_frac,
                   help="fraction of deliberately malformed event rows (default 0.005)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--start", default=d.start, help="first day of the log (ISO date, UTC)")
    p.add_argument("--days", type=int, default=d.days, help="length of the log in days")
    p.add_argument("--partitions", type=int, default=None,
                   help="Spark tasks for users/events (default: one per 20k users)")
    return p


def config_from_args(args: argparse.Namespace):
    """The SyntheticConfig of parsed flags: the preset plus only the knobs given."""
    from dataclasses import replace

    from pipelines.synthetic import ALL_KNOBS, SyntheticConfig, users_for_events

    knobs = {k: getattr(args, k) for k in ALL_KNOBS if getattr(args, k, None) is not None}
    try:
        cfg = SyntheticConfig(preset=args.preset, n_users=args.users,
                              malformed_frac=args.malformed_frac, seed=args.seed,
                              start=args.start, days=args.days, **knobs)
    except ValueError as err:
        flags = ", ".join(_knob_flag(k) for k in knobs)
        raise SystemExit(f"generate_data: {err}" + (f" (flags given: {flags})" if flags else ""))
    if args.events is not None:
        cfg = replace(cfg, n_users=users_for_events(args.events, cfg))
    return cfg


def run_generate(spark, lake: str, cfg, partitions: Optional[int] = None) -> List[WriteResult]:
    """Generate and write the raw tables, holding the lake's ``raw`` writer lease."""
    from pipelines.delta_io import write_raw
    from pipelines.synthetic import generate

    tables = generate(spark, cfg, partitions)
    with lease.held(lake, lease.SCOPE_RAW, "generate_data") as writer:
        out = []
        for table, df in ((C.T_RAW_ITEMS, tables.items), (C.T_RAW_USERS, tables.users),
                          (C.T_RAW_EVENTS, tables.events)):
            writer.check()
            out.append(write_raw(spark, df, lake, table))
        return out


def generate_data_main(argv: Optional[Sequence[str]] = None) -> Dict[str, int]:
    args = generate_parser().parse_args(argv)
    cfg = config_from_args(args)
    spark = job_session(args, "ctt-generate-data")
    print("synthetic config:", json.dumps(cfg.to_dict(), sort_keys=True))
    try:
        results = run_generate(spark, args.lake, cfg, args.partitions)
    except RuntimeError as err:
        lease.exit_on_refusal("generate_data", err)
        raise
    print_results(results)
    return {r.table: r.version for r in results}


# --------------------------------------------------------------------------------------
# ingest
# --------------------------------------------------------------------------------------
def _pairs(text: Optional[str]) -> Dict[str, str]:
    """'a=b,c=d' -> {'a': 'b', 'c': 'd'}."""
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        if "=" not in part:
            raise argparse.ArgumentTypeError(f"expected key=value, got {part!r}")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def ingest_parser() -> argparse.ArgumentParser:
    from pipelines import ingest as I
    from pipelines.validate import DEFAULT_MAX_QUARANTINE_FRAC

    p = argparse.ArgumentParser(
        prog="ingest",
        description="Import a real event log (CSV/Parquet) + optional items and users files into "
                    "raw_events / raw_items / raw_users. Unparseable values become nulls that "
                    "build_sequences quarantines with the original strings. CSV is read as "
                    "RFC 4180 (quoted separators, quoted newlines, \"\" escapes); a record with "
                    "the wrong number of fields is kept verbatim and quarantined "
                    "(wrong_number_of_fields); each CSV file is read by one task, so a folder of "
                    "files imports in parallel. Prints row counts; stops before writing when "
                    "more than --max-quarantine-frac of a source cannot be imported cleanly.")
    add_spark_args(p)
    p.add_argument("--mode", choices=("overwrite", "append"), default="overwrite",
                   help="overwrite the raw tables, or append a new increment of the log "
                        "(reports the rows each append wrote)")
    p.add_argument("--max-quarantine-frac", type=float, default=DEFAULT_MAX_QUARANTINE_FRAC,
                   help="stop without writing when more than this share of a source's rows fail "
                        "the row checks (wrong field count, unparseable id or time, unknown "
                        "event type...); usually a wrong mapping such as --ts-format. 1 = never "
                        f"stop (default {DEFAULT_MAX_QUARANTINE_FRAC})")
    ev = p.add_argument_group("events")
    ev.add_argument("--events", required=True, help="event log path (file or folder)")
    ev.add_argument("--format", choices=I.FORMATS, default="csv")
    ev.add_argument("--sep", default=",", help="CSV separator of all files (default ',')")
    ev.add_argument("--user-col", required=True)
    ev.add_argument("--item-col", required=True)
    ev.add_argument("--ts-col", required=True)
    ev.add_argument("--ts-format", default=I.TS_EPOCH_SECONDS,
                    help="epoch_s | epoch_ms | iso | a Spark datetime pattern "
                         "(e.g. 'yyyy-MM-dd HH:mm:ss'; text in single quotes is literal: "
                         "REES46's '2019-10-01 00:00:04 UTC' is \"yyyy-MM-dd HH:mm:ss 'UTC'\"); "
                         "values without a zone are UTC")
    et = ev.add_mutually_exclusive_group(required=True)
    et.add_argument("--event-type-col", help="column holding the event type")
    et.add_argument("--event-type", choices=C.EVENT_TYPES,
                    help="constant event type for every row (e.g. every rating = conversion)")
    ev.add_argument("--event-type-map", default=None,
                    help="source=contract pairs, e.g. 'addtocart=click,transaction=conversion' "
                         "or 'cart=conversion,purchase=conversion' (REES46)")
    ev.add_argument("--subject-col", default=None, help="subject item id column (optional)")
    ev.add_argument("--session-col", default=None,
                    help="session id column (optional, any string) -> session_id; "
                         "build_sequences --derive-subject looks for views in the same session")
    ev.add_argument("--surface-col", default=None, help="surface column (optional)")
    ev.add_argument("--surface", default=None, help="constant surface (optional)")
    it = p.add_argument_group(
        "items (optional)",
        "Category ids are array<int>: names that are all canonical integers of at most 9 digits "
        "are kept as ids; any other names (words, or 19-digit ids such as REES46's "
        "2053013555631882655) are re-indexed densely 0..n-1 in sorted order. The vocabulary "
        "is stored under <lake>/_meta/category_vocabulary and extended by --mode append, so "
        "ids keep their meaning; only counts are printed.")
    src = it.add_mutually_exclusive_group()
    src.add_argument("--items", default=None, help="items file")
    src.add_argument("--item-categories-from-events", default=None, metavar="COL",
                     help="no items file: derive each item's categories from this column of the "
                          "event log (e.g. category_id); an item logged under several categories "
                          "gets them all, weighted by their share of its events; with --mode "
                          "append only items not imported before are added")
    it.add_argument("--items-format", choices=I.FORMATS, default="csv")
    it.add_argument("--item-id-col", default=None, help="item id column (default: --item-col)")
    it.add_argument("--categories-col", default=None,
                    help="delimited categories, e.g. 'Action|Comedy' or '3:0.9|7:0.4'")
    it.add_argument("--category-sep", default="|")
    it.add_argument("--weight-sep", default=":")
    it.add_argument("--category-flag-cols", default=None,
                    help="comma-separated 0/1 columns, one per category (e.g. MovieLens genres)")
    it.add_argument("--advertiser-col", default=None)
    it.add_argument("--vocabulary-out", "--category-vocab-out", dest="vocabulary_out",
                    default=None, help="also write the category name -> id vocabulary to this "
                                       "JSON file")
    us = p.add_argument_group("users (optional: without it every user's demographics are "
                              "unknown)")
    us.add_argument("--users", default=None, help="users file")
    us.add_argument("--users-format", choices=I.FORMATS, default="csv")
    us.add_argument("--users-user-col", default=None, help="user id column (default: --user-col)")
    us.add_argument("--age-col", default=None)
    us.add_argument("--age-is-bucket", action="store_true",
                    help="the age column already holds buckets 0..7 (else years)")
    us.add_argument("--country-col", default=None)
    us.add_argument("--gender-col", default=None)
    us.add_argument("--gender-map", default=None,
                    help="extra source=contract gender pairs, e.g. 'F=f,M=m' (case-insensitive)")
    return p


def mappings_from_args(args: argparse.Namespace):
    from pipelines import ingest as I

    events = I.EventMapping(
        user_col=args.user_col, item_col=args.item_col, ts_col=args.ts_col,
        ts_format=args.ts_format, event_type_col=args.event_type_col, event_type=args.event_type,
        event_type_map=_pairs(args.event_type_map), subject_col=args.subject_col,
        surface_col=args.surface_col, surface=args.surface, session_col=args.session_col)
    items = None
    if args.items:
        items = I.ItemMapping(
            item_col=args.item_id_col or args.item_col, categories_col=args.categories_col,
            category_sep=args.category_sep, weight_sep=args.weight_sep,
            category_flag_cols=tuple(c.strip() for c in (args.category_flag_cols or "").split(",")
                                     if c.strip()),
            advertiser_col=args.advertiser_col)
    users = None
    if args.users:
        gmap = dict(I.DEFAULT_GENDER_MAP)
        gmap.update({k.lower(): v for k, v in _pairs(args.gender_map).items()})
        users = I.UserMapping(
            user_col=args.users_user_col or args.user_col, age_col=args.age_col,
            age_is_bucket=args.age_is_bucket, country_col=args.country_col,
            gender_col=args.gender_col, gender_map=gmap)
    return events, items, users


@dataclass
class IngestResult:
    writes: List[WriteResult]
    checks: List[ValidationReport]  # row-local checks per source, before writing
    vocabulary: Optional[Dict[str, int]] = None

    def rows_written(self) -> Dict[str, int]:
        return {w.table: w.inserted for w in self.writes}


def _checked(spark, df, source_table: str, max_frac: float, now: datetime):
    """Persist a mapped source, count its row-local problems, stop if too many (nothing written)."""
    from pyspark import StorageLevel

    from pipelines.validate import (QuarantineThresholdExceeded, over_threshold, reason_examples,
                                    row_local_reasons, threshold_message)

    df = df.persist(StorageLevel.MEMORY_AND_DISK)
    reasoned = row_local_reasons(df, source_table, now)
    report = report_from_reasons(source_table, reasoned)
    if over_threshold(report, max_frac):
        message = threshold_message(report, max_frac, reason_examples(reasoned))
        df.unpersist()
        raise QuarantineThresholdExceeded(
            f"ingest stopped, nothing written.\n{message}\nCheck the mapping flags (e.g. "
            f"--ts-format, --event-type-map, --sep), or pass --max-quarantine-frac 1 to import "
            f"anyway.")
    return df, report


def run_ingest(spark, args: argparse.Namespace, now: Optional[datetime] = None) -> IngestResult:
    """Map, check, write; the vocabulary is extended (append) or rebuilt (overwrite) and stored."""
    from pipelines import ingest as I

    now = now or datetime.now(timezone.utc)
    ev_map, it_map, us_map = mappings_from_args(args)
    base = I.load_vocabulary(spark, args.lake) if args.mode == "append" else None
    src = I.read_source(spark, args.events, args.format, args.sep)
    if args.item_categories_from_events:  # read once for the names, the items and the events
        from pyspark import StorageLevel

        src = src.persist(StorageLevel.MEMORY_AND_DISK)
    frames: Dict[str, object] = {C.T_RAW_EVENTS: I.events_from_source(src, ev_map)}
    vocab = None
    if it_map is not None:
        frames[C.T_RAW_ITEMS], vocab = I.ingest_items(
            spark, args.items, args.items_format, it_map, args.sep, base_vocab=base)
    elif args.item_categories_from_events:
        col = args.item_categories_from_events
        vocab = I.build_vocabulary(I.event_category_names(src, col, args.category_sep), base)
        items = I.items_from_events(src, ev_map, col, vocab, args.category_sep)
        frames[C.T_RAW_ITEMS] = (I.new_items_only(spark, args.lake, items)
                                 if args.mode == "append" else items)
    if us_map is not None:
        frames[C.T_RAW_USERS] = I.ingest_users(spark, args.users, args.users_format, us_map,
                                               args.sep)
    if vocab is not None:
        print(I.vocabulary_summary(vocab, base))
    checked, reports = {}, []
    try:
        for table in (C.T_RAW_ITEMS, C.T_RAW_USERS, C.T_RAW_EVENTS):
            if table in frames:
                checked[table], report = _checked(spark, frames[table], table,
                                                  args.max_quarantine_frac, now)
                reports.append(report)
        print("row checks before writing (the build quarantines these rows):")
        print(format_reports(reports))
        with lease.held(args.lake, lease.SCOPE_RAW, "ingest"):
            writes = I.write_ingested(spark, args.lake, checked.get(C.T_RAW_EVENTS),
                                      checked.get(C.T_RAW_ITEMS), checked.get(C.T_RAW_USERS),
                                      args.mode)
            if vocab is not None:
                I.store_vocabulary(spark, args.lake, vocab)
    finally:
        for df in checked.values():
            df.unpersist()
        src.unpersist()
    if vocab is not None and args.vocabulary_out:
        with open(args.vocabulary_out, "w", encoding="utf-8") as fh:
            json.dump(vocab, fh, indent=1, sort_keys=True)
        print(f"category vocabulary written to {args.vocabulary_out}")
    return IngestResult(writes, reports, vocab)


T = TypeVar("T")


def run_or_exit(parser: argparse.ArgumentParser, job: str, run: Callable[[], T]) -> T:
    """``run()``, with the expected refusals as one line and an exit code instead of a traceback:
    too much of a source quarantined -> 2; the lake's lease held or lost, a contested table -> 75;
    duplicate keys -> 65 (``lease.exit_on_refusal``)."""
    from pipelines.validate import QuarantineThresholdExceeded

    try:
        return run()
    except QuarantineThresholdExceeded as err:
        parser.exit(2, f"error: {err}\n")
    except RuntimeError as err:
        lease.exit_on_refusal(job, err)
        raise


def ingest_main(argv: Optional[Sequence[str]] = None) -> Dict[str, int]:
    """Run the import; returns {raw table: Delta version}. Rows written are printed (+N).
    Exit 2: too much of a source would be quarantined; 75: another writer holds the raw lease."""
    parser = ingest_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.max_quarantine_frac <= 1:
        parser.error("--max-quarantine-frac must be within [0, 1]")
    mappings_from_args(args)  # fail on a bad mapping before starting Spark
    spark = job_session(args, "ctt-ingest")
    result = run_or_exit(parser, "ingest", lambda: run_ingest(spark, args))
    print_results(result.writes)
    print("rows written:", json.dumps(result.rows_written(), sort_keys=True))
    return {r.table: r.version for r in result.writes}


# --------------------------------------------------------------------------------------
# build_sequences
# --------------------------------------------------------------------------------------
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
    # incremental: users whose rows were recomputed (touched by the new events); full: users
    # with at least one clean conversion (all of whose rows were recomputed)
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
        us_path = paths.table(C.T_USER_SEQUENCES)
        out.append(how.sync(spark, user_sequences_from_ranked(ranked, cfg.max_len), us_path,
                            C.T_USER_SEQUENCES, C.spark_schema(C.T_USER_SEQUENCES), [C.USER_ID],
                            properties=CDF_PROPERTIES, **scoped))
        how.fence()
        ensure_properties(spark, us_path, CDF_PROPERTIES)
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

        if plan.users_changed:
            writes.append(how.sync(spark, users, paths.table(C.T_USERS), C.T_USERS,
                                   C.spark_schema(C.T_USERS), [C.USER_ID]))
        else:
            writes.append(_unchanged(spark, paths, C.T_USERS))

        n_touched, touched, events_of_touched = 0, None, None
        if ev.reasoned is not None:
            # users with a row that passed checks 1-7 (clean, or a copy of a clean one)
            passed = (F.col(REASON_COLUMN).isNull()
                      | (F.col(REASON_COLUMN) == C.R_DUPLICATE_EVENT))
            touched = (ev.reasoned.where(passed).select(C.USER_ID).distinct()
                       .persist(StorageLevel.MEMORY_AND_DISK))
            persisted.append(touched)
            n_touched = touched.count()
        if n_touched:
            before = ev.prior.join(touched, C.USER_ID, "left_semi")
            events_of_touched = (before.unionByName(ev.clean).persist(StorageLevel.MEMORY_AND_DISK))
            persisted.append(events_of_touched)
            writes.append(how.sync(spark, events_of_touched, paths.table(C.T_EVENTS), C.T_EVENTS,
                                   C.spark_schema(C.T_EVENTS), C.RAW_EVENTS_COLUMNS,
                                   scope=touched, check_table_duplicates=False))
        else:
            writes.append(_unchanged(spark, paths, C.T_EVENTS))

        writes.append(_sync_increment_quarantine(spark, lake, now, how, prog, ev,
                                                 q_users if plan.users_changed else None))

        coverage = prog.coverage
        if n_touched:
            outputs, coverage = _recompute_users(spark, lake, cfg, prog, items, touched,
                                                 events_of_touched, before, how)
            writes.extend(outputs)
        else:
            writes.extend(_unchanged(spark, paths, t)
                          for t in (C.T_SEQUENCES, C.T_CONTEXT_ROWS, C.T_USER_SEQUENCES))
        how.fence()
        store_coverage(spark, lake, coverage)
        store_build_config(spark, lake, cfg, now)  # differs at most in a field no row depends on
    finally:
        for df in persisted:
            df.unpersist()
    result = BuildResult({w.table: w.version for w in writes}, writes, reports, prog.cutoffs,
                         in_versions, coverage, users_recomputed=n_touched)
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="build_sequences",
        description="Validate the raw tables (-> events/items/users + quarantine) and build "
                    "sequences, context_rows and user_sequences as Delta tables. Idempotent: a "
                    "rerun on the same input commits nothing. Incremental: appended raw events "
                    "are validated alone and only the users they touch are recomputed (--full "
                    "rebuilds everything). Prints and returns the Delta version of each output.")
    add_spark_args(p)
    add_build_flags(p)
    p.add_argument("--now", type=timestamp_arg, default=None,
                   help="reference time for 'timestamp in the future' (default: wall clock, UTC)")
    p.add_argument("--repair-duplicates", action="store_true",
                   help="if an output table holds a key twice (left by overlapping runs of an older "
                        "version), delete those keys' rows and recompute them in this run "
                        "(default: stop with an error naming table and key)")
    p.add_argument("--full", action="store_true",
                   help="rebuild everything from the raw tables (default: incremental when the "
                        "lake records what the last build consumed and raw_events only grew "
                        "since: only the new raw rows are validated and only the users they "
                        "touch are recomputed; the run prints which mode and why)")
    return p


def build_sequences_main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Run the build; returns the summary: {"versions": {table: version}, "validation": [...],
    "changed": {...}, "input_versions": {...}, "mode": "incremental" | "full", "mode_reason",
    "users_recomputed", "split_cutoffs": {...}, "subject_coverage": {...}} (also printed)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = BuildConfig(**flag_values(args))
        cfg.explicit_cutoffs()  # fail on a half-given pair before starting Spark
    except ValueError as err:
        parser.error(str(err))
    spark = job_session(args, "ctt-build-sequences")
    result = run_or_exit(parser, "build_sequences", lambda: run_build_sequences(
        spark, args.lake, cfg, args.now, args.repair_duplicates, full=args.full))
    print_results(result.writes)
    summary = result.summary()
    print("summary:", json.dumps(summary, sort_keys=True))
    return summary
