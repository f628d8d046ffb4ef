"""Command lines of the data jobs: argparse parsers and the ``*_main`` console scripts.

``jobs/*.py`` only import a main from here, so ``python jobs/x.py``, ``spark-submit jobs/x.py``
and the console scripts (``ctt-generate-data``, ``ctt-ingest``, ``ctt-build-sequences``) behave
the same. A main parses flags, fails on bad ones before Spark starts, opens the job's session,
runs one ``run_*`` function and prints what it wrote; the expected refusals (lease held, too
much quarantined) become an exit code, not a traceback. The build itself is
``pipelines.build.run_build_sequences``, which the refresh, benchmarks and tests call on a
session they hold; ``run_generate`` and ``run_ingest`` stay here, each a short read -> write
around ``pipelines.synthetic`` and ``pipelines.ingest``.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional, Sequence, TypeVar

import ctt_contracts as C
from ctt_contracts.flags import (add_dataclass_flags, add_exclusive_flags, add_sections,
                                 dataclass_parser, flag_field, flag_of, flag_value, from_args,
                                 given_fields, key_value_pairs, lake_field)
from ctt_contracts.process import entry_point
from pipelines import lease
from pipelines.build import run_build_sequences
from pipelines.build_config import BuildConfig, add_build_flags, flag_values, timestamp_arg
from pipelines.delta_io import WriteResult, print_results
from pipelines.ingest import FORMATS
from pipelines.validate import (DEFAULT_MAX_QUARANTINE_FRAC, ValidationReport, format_reports,
                                report_from_reasons)


@dataclass(frozen=True)
class SparkJob:
    """What every Spark data job takes (generate, ingest, build, refresh): the lake it works
    on and its Spark session; batch inference takes ``master`` from here too."""

    lake: str = lake_field("./lake")
    master: Optional[str] = flag_field("Spark master; default: the one spark-submit set, else local[*]", None)
    shuffle_partitions: Optional[int] = flag_field("spark.sql.shuffle.partitions; default Spark's", None)
    driver_memory: Optional[str] = flag_field(
        "spark.driver.memory of a job started with python (spark-submit: its own "
        "--driver-memory); default Spark's 1g, too small for a full build of ~1M users on "
        "local[*] (4g is enough)", None)


def job_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The parser of a Spark data job: its name and description, and the ``SparkJob`` flags
    every such job takes, so that they read the same in each."""
    return dataclass_parser(prog, description, SparkJob)


def job_session(args: argparse.Namespace, app: str):
    """The Spark session of the ``SparkJob`` flags in ``args`` (those a parser did not
    declare keep their defaults)."""
    from pipelines.delta_io import tune_local_delta
    from pipelines.spark import get_spark

    job = from_args(SparkJob, args)
    memory = {"spark.driver.memory": job.driver_memory} if job.driver_memory else None
    spark = get_spark(app, master=job.master, shuffle_partitions=job.shuffle_partitions,
                      extra_conf=memory)
    tune_local_delta(spark)
    return spark


# --------------------------------------------------------------------------------------
# generate_data
# --------------------------------------------------------------------------------------
# The fields of SyntheticConfig that are not knobs, and the size (--users, or --events instead).
WORLD_FIELDS = ("preset", "malformed_frac", "seed", "start", "days")
SIZE_FIELD = "n_users"


def _preset_defaults(knob: str) -> str:
    from pipelines.synthetic import PRESET_DEFAULTS, PRESETS

    return "default: " + ", ".join(
        f"{name} {'derived' if PRESET_DEFAULTS[name][knob] is None else PRESET_DEFAULTS[name][knob]}"
        for name in PRESETS if knob in PRESET_DEFAULTS[name])


@dataclass(frozen=True)
class GenerateRun:
    """What generate_data takes beside the world (``SyntheticConfig``): a size in events
    instead of users, and the Spark tasks."""

    events: Optional[int] = flag_field("approximate number of events instead of --users", None)
    partitions: Optional[int] = flag_field("Spark tasks for users/events (default: one per 20k users)", None)


def generate_parser() -> argparse.ArgumentParser:
    from pipelines.synthetic import ALL_KNOBS, SyntheticConfig

    p = job_parser(
        "generate_data",
        "Write seeded synthetic raw_events / raw_items / raw_users Delta tables "
        "(see pipelines/synthetic.py: a realistic world calibrated to real logs, or "
        "the planted world of the first quality bars). Overwrites them.")
    add_dataclass_flags(p, SyntheticConfig, only=WORLD_FIELDS)
    add_exclusive_flags(p, (SyntheticConfig, (SIZE_FIELD,)), (GenerateRun, ("events",)))
    knobs = p.add_argument_group("knobs (default: the preset's)")
    add_dataclass_flags(knobs, SyntheticConfig, only=ALL_KNOBS, overrides=True,
                        overrides_default=_preset_defaults)
    add_dataclass_flags(p, GenerateRun, only=("partitions",))
    return p


def config_from_args(args: argparse.Namespace):
    """The SyntheticConfig of parsed flags: the preset plus only the knobs given."""
    from dataclasses import replace

    from pipelines.synthetic import ALL_KNOBS, SyntheticConfig, users_for_events

    try:
        cfg = SyntheticConfig(**given_fields(SyntheticConfig, args))
    except ValueError as err:
        flags = ", ".join(flag_of(SyntheticConfig, k) for k in ALL_KNOBS
                          if flag_value(args, k) is not None)
        raise SystemExit(f"generate_data: {err}" + (f" (flags given: {flags})" if flags else ""))
    events = from_args(GenerateRun, args).events
    if events is not None:
        cfg = replace(cfg, n_users=users_for_events(events, cfg))
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
        results = run_generate(spark, args.lake, cfg, from_args(GenerateRun, args).partitions)
    except RuntimeError as err:
        lease.exit_on_refusal("generate_data", err)
        raise
    print_results(results)
    return {r.table: r.version for r in results}


# --------------------------------------------------------------------------------------
# ingest
# --------------------------------------------------------------------------------------
EVENT_TYPE_FIELDS = ("event_type_col", "event_type")
# Mapping fields whose flags differ from the field: the id columns default to the events' ones
# (--item-id-col, --users-user-col), and --gender-map adds pairs to the default map.
ITEM_HAND_DECLARED = ("item_col",)
USER_HAND_DECLARED = ("user_col", "gender_map")
MODE_OVERWRITE, MODE_APPEND = "overwrite", "append"  # ingest's modes (delta_io.write_raw's)
INGEST_MODES = (MODE_OVERWRITE, MODE_APPEND)


@dataclass(frozen=True, kw_only=True)
class IngestSources:
    """What ingest reads and how it writes (the column mappings of each source:
    ``EventMapping``, ``ItemMapping``, ``UserMapping``)."""

    mode: str = flag_field(
        "overwrite the raw tables, or append a new increment of the log (reports the rows each "
        "append wrote)", MODE_OVERWRITE, choices=INGEST_MODES)
    max_quarantine_frac: float = flag_field(
        "stop without writing when more than this share of a source's rows fail the row checks "
        "(wrong field count, unparseable id or time, unknown event type...); usually a wrong "
        "mapping such as --ts-format. 1 = never stop", DEFAULT_MAX_QUARANTINE_FRAC)
    events: str = flag_field("event log path (file or folder)")
    format: str = flag_field("file format of the event log", "csv", choices=FORMATS)
    sep: str = flag_field("CSV separator of all files", ",")
    items: Optional[str] = flag_field("items file", None)
    item_categories_from_events: Optional[str] = flag_field(
        "no items file: derive each item's categories from this column of the event log (e.g. "
        "category_id); an item logged under several categories gets them all, weighted by their "
        "share of its events; with --mode append only items not imported before are added",
        None, metavar="COL")
    items_format: str = flag_field("file format of the items file", "csv", choices=FORMATS)
    item_id_col: Optional[str] = flag_field("item id column (default: --item-col)", None)
    vocabulary_out: Optional[str] = flag_field(
        "also write the category name -> id vocabulary to this JSON file", None,
        aliases=("--category-vocab-out",))
    users: Optional[str] = flag_field("users file", None)
    users_format: str = flag_field("file format of the users file", "csv", choices=FORMATS)
    users_user_col: Optional[str] = flag_field("user id column (default: --user-col)", None)
    gender_map: Optional[Dict[str, str]] = flag_field(
        "extra source=contract gender pairs, e.g. 'F=f,M=m' (case-insensitive)", None,
        parse=key_value_pairs)

    def __post_init__(self) -> None:
        if not 0 <= self.max_quarantine_frac <= 1:
            raise ValueError("--max-quarantine-frac must be within [0, 1]")


def ingest_parser() -> argparse.ArgumentParser:
    from pipelines import ingest as I

    p = job_parser(
        "ingest",
        "Import a real event log (CSV/Parquet) + optional items and users files into "
        "raw_events / raw_items / raw_users. Unparseable values become nulls that "
        "build_sequences quarantines with the original strings. CSV is read as "
        "RFC 4180 (quoted separators, quoted newlines, \"\" escapes); a record with "
        "the wrong number of fields is kept verbatim and quarantined "
        "(wrong_number_of_fields); each CSV file is read by one task, so a folder of "
        "files imports in parallel. Prints row counts; stops before writing when "
        "more than --max-quarantine-frac of a source cannot be imported cleanly.")
    add_dataclass_flags(p, IngestSources, only=("mode", "max_quarantine_frac"))
    ev = p.add_argument_group("events")
    add_dataclass_flags(ev, IngestSources, only=("events", "format", "sep"))
    # EVENT_TYPE_FIELDS: exactly one of the column or the constant (EventMapping checks it too)
    add_dataclass_flags(ev, I.EventMapping, skip=EVENT_TYPE_FIELDS)
    add_exclusive_flags(p, (I.EventMapping, EVENT_TYPE_FIELDS), container=ev, required=True)
    it = p.add_argument_group(
        "items (optional)",
        "Category ids are array<int>: names that are all canonical integers of at most 9 digits "
        "are kept as ids; any other names (words, or 19-digit ids such as REES46's "
        "2053013555631882655) are re-indexed densely 0..n-1 in sorted order. The vocabulary "
        "is stored under <lake>/_meta/category_vocabulary and extended by --mode append, so "
        "ids keep their meaning; only counts are printed.")
    add_exclusive_flags(p, (IngestSources, ("items", "item_categories_from_events")), container=it)
    add_dataclass_flags(it, IngestSources, only=("items_format", "item_id_col"))
    add_dataclass_flags(it, I.ItemMapping, skip=ITEM_HAND_DECLARED)
    add_dataclass_flags(it, IngestSources, only=("vocabulary_out",))
    us = p.add_argument_group("users (optional: without it every user's demographics are "
                              "unknown)")
    add_dataclass_flags(us, IngestSources, only=("users", "users_format", "users_user_col"))
    add_dataclass_flags(us, I.UserMapping, skip=USER_HAND_DECLARED)
    add_dataclass_flags(us, IngestSources, only=("gender_map",))
    return p


def mappings_from_args(args: argparse.Namespace):
    from pipelines import ingest as I

    src = from_args(IngestSources, args)
    events = I.EventMapping(**given_fields(I.EventMapping, args))
    items = None
    if src.items:
        items = I.ItemMapping(item_col=src.item_id_col or args.item_col,
                              **given_fields(I.ItemMapping, args, skip=ITEM_HAND_DECLARED))
    users = None
    if src.users:
        gmap = dict(I.DEFAULT_GENDER_MAP)
        gmap.update({k.lower(): v for k, v in (src.gender_map or {}).items()})
        users = I.UserMapping(user_col=src.users_user_col or args.user_col, gender_map=gmap,
                              **given_fields(I.UserMapping, args, skip=USER_HAND_DECLARED))
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
    sources, lake = from_args(IngestSources, args), args.lake
    base = I.load_vocabulary(spark, lake) if sources.mode == MODE_APPEND else None
    src = I.read_source(spark, sources.events, sources.format, sources.sep)
    if sources.item_categories_from_events:  # read once for the names, the items and the events
        from pyspark import StorageLevel

        src = src.persist(StorageLevel.MEMORY_AND_DISK)
    frames: Dict[str, object] = {C.T_RAW_EVENTS: I.events_from_source(src, ev_map)}
    vocab = None
    if it_map is not None:
        frames[C.T_RAW_ITEMS], vocab = I.ingest_items(
            spark, sources.items, sources.items_format, it_map, sources.sep,
            base_vocab=base)
    elif sources.item_categories_from_events:
        col = sources.item_categories_from_events
        vocab = I.build_vocabulary(I.event_category_names(src, col, args.category_sep), base)
        items = I.items_from_events(src, ev_map, col, vocab, args.category_sep)
        frames[C.T_RAW_ITEMS] = (I.new_items_only(spark, lake, items)
                                 if sources.mode == MODE_APPEND else items)
    if us_map is not None:
        frames[C.T_RAW_USERS] = I.ingest_users(spark, sources.users, sources.users_format,
                                               us_map, sources.sep)
    if vocab is not None:
        print(I.vocabulary_summary(vocab, base))
    checked, reports = {}, []
    try:
        for table in (C.T_RAW_ITEMS, C.T_RAW_USERS, C.T_RAW_EVENTS):
            if table in frames:
                checked[table], report = _checked(spark, frames[table], table,
                                                  sources.max_quarantine_frac, now)
                reports.append(report)
        print("row checks before writing (the build quarantines these rows):")
        print(format_reports(reports))
        with lease.held(lake, lease.SCOPE_RAW, "ingest"):
            writes = I.write_ingested(spark, lake, checked.get(C.T_RAW_EVENTS),
                                      checked.get(C.T_RAW_ITEMS), checked.get(C.T_RAW_USERS),
                                      sources.mode)
            if vocab is not None:
                I.store_vocabulary(spark, lake, vocab)
    finally:
        for df in checked.values():
            df.unpersist()
        src.unpersist()
    if vocab is not None and sources.vocabulary_out:
        with open(sources.vocabulary_out, "w", encoding="utf-8") as fh:
            json.dump(vocab, fh, indent=1, sort_keys=True)
        print(f"category vocabulary written to {sources.vocabulary_out}")
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
    try:
        from_args(IngestSources, args)
    except ValueError as err:
        parser.error(str(err))
    mappings_from_args(args)  # fail on a bad mapping before starting Spark
    spark = job_session(args, "ctt-ingest")
    result = run_or_exit(parser, "ingest", lambda: run_ingest(spark, args))
    print_results(result.writes)
    print("rows written:", json.dumps(result.rows_written(), sort_keys=True))
    return {r.table: r.version for r in result.writes}


# --------------------------------------------------------------------------------------
# build_sequences (the build itself: pipelines/build.py)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildRun:
    """How one build_sequences run goes, beside the settings the lake keeps (``BuildConfig``);
    ``full`` is a flag of the refresh too."""

    now: Optional[datetime] = flag_field(
        "reference time for 'timestamp in the future' (default: wall clock, UTC)", None,
        parse=timestamp_arg)
    repair_duplicates: bool = flag_field(
        "if an output table holds a key twice (left by overlapping runs of an older version), "
        "delete those keys' rows and recompute them in this run (default: stop with an error "
        "naming table and key)", False)
    full: bool = flag_field(
        "rebuild everything from the raw tables (default: incremental when the lake records what "
        "the last build consumed and raw_events only grew since: only the new raw rows are "
        "validated and only the users they touch are recomputed; the run prints which mode and "
        "why)", False)


def build_parser() -> argparse.ArgumentParser:
    p = job_parser(
        "build_sequences",
        "Validate the raw tables (-> events/items/users + quarantine) and build "
        "sequences, context_rows and user_sequences as Delta tables. Idempotent: a "
        "rerun on the same input commits nothing. Incremental: appended raw events "
        "are validated alone and only the users they touch are recomputed (--full "
        "rebuilds everything). Prints and returns the Delta version of each output.")
    add_build_flags(p)
    return add_sections(p, BuildRun)


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
    run = from_args(BuildRun, args)
    spark = job_session(args, "ctt-build-sequences")
    result = run_or_exit(parser, "build_sequences", lambda: run_build_sequences(
        spark, args.lake, cfg, run.now, run.repair_duplicates, full=run.full))
    print_results(result.writes)
    summary = result.summary()
    print("summary:", json.dumps(summary, sort_keys=True))
    return summary


# Command-line entry point: the process ends with the exit code main chose (ctt_contracts.process).
generate_data_cli = entry_point(generate_data_main)
build_sequences_cli = entry_point(build_sequences_main)
ingest_cli = entry_point(ingest_main)
