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
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from pipelines import contracts as C
from pipelines import lease
from pipelines.context import (CONTEXT_ROWS_KEY, DEFAULT_TOP_K, SEQUENCES_KEY, build_context_rows,
                               context_rows_schema)
from pipelines.delta_io import (WriteResult, ensure_properties, print_results, read_table,
                                sync_quarantine, sync_table, table_exists, table_version)
from pipelines.sequences import (DEFAULT_MAX_LEN, SplitCutoffs, build_sequences, conversions,
                                 examples_from_ranked, ranked_histories, resolve_cutoffs,
                                 user_sequences_from_ranked)
from pipelines.validate import (ValidationReport, event_reasons, format_reports, item_reasons,
                                report_from_reasons, sort_categories, split_reasoned, user_reasons)

CDF_PROPERTIES = {"delta.enableChangeDataFeed": "true"}


def _timestamp_arg(text: str) -> datetime:
    """ISO-8601 date/time or epoch seconds; naive values are UTC."""
    try:
        ts = (datetime.fromtimestamp(float(text), tz=timezone.utc)
              if text.replace(".", "", 1).isdigit() else datetime.fromisoformat(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not an ISO timestamp or epoch seconds: {text!r}") from err
    return ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)


def _spark_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lake", default="./lake",
                        help="root folder/URI of the Delta tables (default: ./lake)")
    parser.add_argument("--master", default=None,
                        help="Spark master; default: the one spark-submit set, else local[*]")
    parser.add_argument("--shuffle-partitions", type=int, default=None,
                        help="spark.sql.shuffle.partitions (default: Spark's)")


def _session(args: argparse.Namespace, app: str):
    from pipelines.delta_io import tune_local_delta
    from pipelines.spark import get_spark

    spark = get_spark(app, master=args.master, shuffle_partitions=args.shuffle_partitions)
    tune_local_delta(spark)
    return spark


# --------------------------------------------------------------------------------------
# generate_data
# --------------------------------------------------------------------------------------
def generate_parser() -> argparse.ArgumentParser:
    from pipelines.synthetic import SyntheticConfig

    d = SyntheticConfig()
    p = argparse.ArgumentParser(
        prog="generate_data",
        description="Write seeded synthetic raw_events / raw_items / raw_users Delta tables "
                    "with a planted signal (see pipelines/synthetic.py). Overwrites them.")
    _spark_args(p)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--users", type=int, default=d.n_users, help=f"users (default {d.n_users})")
    size.add_argument("--events", type=int, default=None,
                      help="approximate number of events instead of --users")
    p.add_argument("--items", type=int, default=d.n_items, help=f"items (default {d.n_items})")
    p.add_argument("--categories", type=int, default=d.n_categories)
    p.add_argument("--styles", type=int, default=d.n_styles)
    p.add_argument("--p-longterm", type=float, default=d.p_longterm,
                   help="P(session intent is a long-term interest)")
    p.add_argument("--p-style", type=float, default=d.p_style,
                   help="P(conversion has the user's style)")
    p.add_argument("--p-convert", type=float, default=d.p_convert, help="P(session converts)")
    p.add_argument("--sessions-mean", type=float, default=d.sessions_mean)
    p.add_argument("--max-clicks", type=int, default=d.max_clicks)
    p.add_argument("--popularity-exponent", type=float, default=d.popularity_exponent)
    p.add_argument("--malformed-frac", type=float, default=d.malformed_frac,
                   help="fraction of deliberately malformed event rows (default 0.005)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--start", default=d.start, help="first day of the log (ISO date, UTC)")
    p.add_argument("--days", type=int, default=d.days, help="length of the log in days")
    p.add_argument("--partitions", type=int, default=None,
                   help="Spark tasks for users/events (default: one per 20k users)")
    return p


def config_from_args(args: argparse.Namespace):
    from pipelines.synthetic import SyntheticConfig, users_for_events

    cfg = SyntheticConfig(
        n_users=args.users, n_items=args.items, n_categories=args.categories,
        n_styles=args.styles, p_longterm=args.p_longterm, p_style=args.p_style,
        p_convert=args.p_convert, sessions_mean=args.sessions_mean, max_clicks=args.max_clicks,
        popularity_exponent=args.popularity_exponent, malformed_frac=args.malformed_frac,
        seed=args.seed, start=args.start, days=args.days,
    )
    if args.events is not None:
        from dataclasses import replace

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
    spark = _session(args, "ctt-generate-data")
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

    p = argparse.ArgumentParser(
        prog="ingest",
        description="Import a real event log (CSV/Parquet) + optional items and users files into "
                    "raw_events / raw_items / raw_users. Unparseable values become nulls that "
                    "build_sequences quarantines with the original strings.")
    _spark_args(p)
    p.add_argument("--mode", choices=("overwrite", "append"), default="overwrite",
                   help="overwrite the raw tables, or append a new increment of the log")
    ev = p.add_argument_group("events")
    ev.add_argument("--events", required=True, help="event log path (file or folder)")
    ev.add_argument("--format", choices=I.FORMATS, default="csv")
    ev.add_argument("--sep", default=",", help="CSV separator of all files (default ',')")
    ev.add_argument("--user-col", required=True)
    ev.add_argument("--item-col", required=True)
    ev.add_argument("--ts-col", required=True)
    ev.add_argument("--ts-format", default=I.TS_EPOCH_SECONDS,
                    help="epoch_s | epoch_ms | iso | a Spark datetime pattern "
                         "(e.g. 'yyyy-MM-dd HH:mm:ss'); values without a zone are UTC")
    et = ev.add_mutually_exclusive_group(required=True)
    et.add_argument("--event-type-col", help="column holding the event type")
    et.add_argument("--event-type", choices=C.EVENT_TYPES,
                    help="constant event type for every row (e.g. every rating = conversion)")
    ev.add_argument("--event-type-map", default=None,
                    help="source=contract pairs, e.g. 'addtocart=click,transaction=conversion'")
    ev.add_argument("--subject-col", default=None, help="subject item id column (optional)")
    ev.add_argument("--surface-col", default=None, help="surface column (optional)")
    ev.add_argument("--surface", default=None, help="constant surface (optional)")
    it = p.add_argument_group("items (optional)")
    it.add_argument("--items", default=None, help="items file")
    it.add_argument("--items-format", choices=I.FORMATS, default="csv")
    it.add_argument("--item-id-col", default=None, help="item id column (default: --item-col)")
    it.add_argument("--categories-col", default=None,
                    help="delimited categories, e.g. 'Action|Comedy' or '3:0.9|7:0.4'")
    it.add_argument("--category-sep", default="|")
    it.add_argument("--weight-sep", default=":")
    it.add_argument("--category-flag-cols", default=None,
                    help="comma-separated 0/1 columns, one per category (e.g. MovieLens genres)")
    it.add_argument("--advertiser-col", default=None)
    it.add_argument("--category-vocab-out", default=None,
                    help="write the category name -> id vocabulary to this JSON file")
    us = p.add_argument_group("users (optional)")
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
        surface_col=args.surface_col, surface=args.surface)
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


def ingest_main(argv: Optional[Sequence[str]] = None) -> Dict[str, int]:
    from pipelines import ingest as I

    args = ingest_parser().parse_args(argv)
    ev_map, it_map, us_map = mappings_from_args(args)
    spark = _session(args, "ctt-ingest")
    events = I.ingest_events(spark, args.events, args.format, ev_map, args.sep)
    items = users = None
    if it_map is not None:
        items, vocab = I.ingest_items(spark, args.items, args.items_format, it_map, args.sep)
        print(f"category vocabulary ({len(vocab)}):", json.dumps(vocab, sort_keys=True))
        if args.category_vocab_out:
            with open(args.category_vocab_out, "w", encoding="utf-8") as fh:
                json.dump(vocab, fh, indent=1, sort_keys=True)
    if us_map is not None:
        users = I.ingest_users(spark, args.users, args.users_format, us_map, args.sep)
    try:
        with lease.held(args.lake, lease.SCOPE_RAW, "ingest"):
            results = I.write_ingested(spark, args.lake, events, items, users, args.mode)
    except RuntimeError as err:
        lease.exit_on_refusal("ingest", err)
        raise
    print_results(results)
    return {r.table: r.version for r in results}


# --------------------------------------------------------------------------------------
# build_sequences
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildConfig:
    max_len: int = DEFAULT_MAX_LEN
    min_history: int = 1
    val_start: Optional[datetime] = None
    test_start: Optional[datetime] = None
    val_frac: float = 0.1
    test_frac: float = 0.1
    context_top_k: int = DEFAULT_TOP_K

    def explicit_cutoffs(self) -> Optional[SplitCutoffs]:
        if (self.val_start is None) != (self.test_start is None):
            raise ValueError("give both --val-start and --test-start, or neither")
        if self.val_start is None:
            return None
        return SplitCutoffs(self.val_start, self.test_start, origin="explicit")


@dataclass
class BuildResult:
    versions: Dict[str, int]  # output table -> Delta version after the run
    writes: List[WriteResult]
    reports: List[ValidationReport]
    cutoffs: SplitCutoffs
    input_versions: Dict[str, int] = field(default_factory=dict)

    def summary(self) -> Dict[str, object]:
        return {"versions": self.versions, "input_versions": self.input_versions,
                "changed": {w.table: w.changed for w in self.writes},
                "validation": [r.as_dict() for r in self.reports],
                "split_cutoffs": {"val_start": self.cutoffs.val_start.isoformat(),
                                  "test_start": self.cutoffs.test_start.isoformat(),
                                  "origin": self.cutoffs.origin}}


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
                        lease_ttl_s: Optional[float] = None) -> BuildResult:
    """raw tables -> validated tables + quarantine -> sequences, context_rows, user_sequences.

    Holds the lake's ``build_sequences`` writer lease for the whole run (another live build of
    the same lake -> ``lease.LeaseHeldError`` before anything is read or written). A key found
    twice in an output table -> ``DuplicateKeyError`` naming table, key and repair command; with
    ``repair_duplicates`` those keys' rows are deleted and recomputed instead.
    """
    now = now or datetime.now(timezone.utc)
    paths = C.LakePaths(lake)
    for raw in (C.T_RAW_EVENTS, C.T_RAW_ITEMS, C.T_RAW_USERS):  # before the lease: a wrong path
        if not table_exists(spark, paths.table(raw)):          # must not get a lease table
            raise FileNotFoundError(f"no Delta table {raw} at {paths.table(raw)}: run "
                                    f"generate_data or ingest first")
    with lease.held(lake, lease.SCOPE_BUILD, "build_sequences", lease_ttl_s) as writer:
        return _build(spark, lake, cfg, now, _Writes(writer.check, repair_duplicates,
                                                     repair_command(lake)))


def _build(spark, lake: str, cfg: BuildConfig, now: datetime, how: _Writes) -> BuildResult:
    paths = C.LakePaths(lake)
    in_versions = {t: table_version(spark, paths.table(t))
                   for t in (C.T_RAW_EVENTS, C.T_RAW_ITEMS, C.T_RAW_USERS)}
    raw_items = read_table(spark, paths.table(C.T_RAW_ITEMS), in_versions[C.T_RAW_ITEMS])
    raw_users = read_table(spark, paths.table(C.T_RAW_USERS), in_versions[C.T_RAW_USERS])
    raw_events = read_table(spark, paths.table(C.T_RAW_EVENTS), in_versions[C.T_RAW_EVENTS])

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

    outputs, cutoffs = _build_outputs(spark, lake, cfg, now, writes, how)
    writes.extend(outputs)
    return BuildResult({w.table: w.version for w in writes}, writes, reports, cutoffs, in_versions)


def _build_outputs(spark, lake: str, cfg: BuildConfig, now: datetime,
                   earlier: List[WriteResult], how: _Writes) -> Tuple[List[WriteResult], SplitCutoffs]:
    from pyspark import StorageLevel

    paths = C.LakePaths(lake)
    version_of = {r.table: r.version for r in earlier}
    events = read_table(spark, paths.table(C.T_EVENTS), version_of[C.T_EVENTS])
    items = read_table(spark, paths.table(C.T_ITEMS), version_of[C.T_ITEMS])
    conv = conversions(events).persist(StorageLevel.MEMORY_AND_DISK)
    ranked = examples = None
    try:
        how.fence()
        cutoffs = resolve_cutoffs(spark, lake, conv, cfg.explicit_cutoffs(), cfg.val_frac,
                                  cfg.test_frac, now)
        ranked = ranked_histories(conv, cfg.max_len).persist(StorageLevel.MEMORY_AND_DISK)
        examples = examples_from_ranked(ranked, cfg.min_history).persist(
            StorageLevel.MEMORY_AND_DISK)
        out = [
            how.sync(spark, build_sequences(examples, cutoffs), paths.table(C.T_SEQUENCES),
                     C.T_SEQUENCES, C.spark_schema(C.T_SEQUENCES), SEQUENCES_KEY),
            how.sync(spark, build_context_rows(examples, items, cfg.context_top_k),
                     paths.table(C.T_CONTEXT_ROWS), C.T_CONTEXT_ROWS, context_rows_schema(),
                     CONTEXT_ROWS_KEY),
        ]
        us_path = paths.table(C.T_USER_SEQUENCES)
        out.append(how.sync(spark, user_sequences_from_ranked(ranked, cfg.max_len), us_path,
                            C.T_USER_SEQUENCES, C.spark_schema(C.T_USER_SEQUENCES), [C.USER_ID],
                            properties=CDF_PROPERTIES))
        how.fence()
        ensure_properties(spark, us_path, CDF_PROPERTIES)
        return out, cutoffs
    finally:
        for df in (conv, ranked, examples):
            if df is not None:
                df.unpersist()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="build_sequences",
        description="Validate the raw tables (-> events/items/users + quarantine) and build "
                    "sequences, context_rows and user_sequences as Delta tables. Idempotent: a "
                    "rerun on the same input commits nothing; appended events change only the "
                    "affected users' rows. Prints and returns the Delta version of each output.")
    _spark_args(p)
    p.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN,
                   help=f"history cap: newest N conversions kept (default {DEFAULT_MAX_LEN})")
    p.add_argument("--min-history", type=int, default=1,
                   help="minimum earlier conversions for a training example (default 1)")
    p.add_argument("--val-start", type=_timestamp_arg, default=None,
                   help="first label time of the validation split (ISO or epoch s, UTC); with "
                        "--test-start. Default: stored cutoffs, else derived once from quantiles")
    p.add_argument("--test-start", type=_timestamp_arg, default=None,
                   help="first label time of the test split")
    p.add_argument("--val-frac", type=float, default=0.1,
                   help="fraction of conversions (by time) for validation when deriving cutoffs")
    p.add_argument("--test-frac", type=float, default=0.1,
                   help="fraction of conversions (by time) for test when deriving cutoffs")
    p.add_argument("--context-top-k", type=int, default=DEFAULT_TOP_K,
                   help=f"categories per context row (default {DEFAULT_TOP_K})")
    p.add_argument("--now", type=_timestamp_arg, default=None,
                   help="reference time for 'timestamp in the future' (default: wall clock, UTC)")
    p.add_argument("--repair-duplicates", action="store_true",
                   help="if an output table holds a key twice (left by overlapping runs of an older "
                        "version), delete those keys' rows and recompute them in this run "
                        "(default: stop with an error naming table and key)")
    return p


def build_sequences_main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Run the build; returns the summary: {"versions": {table: version}, "validation": [...],
    "changed": {...}, "input_versions": {...}, "split_cutoffs": {...}} (also printed)."""
    args = build_parser().parse_args(argv)
    cfg = BuildConfig(max_len=args.max_len, min_history=args.min_history,
                      val_start=args.val_start, test_start=args.test_start,
                      val_frac=args.val_frac, test_frac=args.test_frac,
                      context_top_k=args.context_top_k)
    cfg.explicit_cutoffs()  # fail on a half-given pair before starting Spark
    spark = _session(args, "ctt-build-sequences")
    try:
        result = run_build_sequences(spark, args.lake, cfg, args.now, args.repair_duplicates)
    except RuntimeError as err:
        lease.exit_on_refusal("build_sequences", err)
        raise
    print_results(result.writes)
    summary = result.summary()
    print("summary:", json.dumps(summary, sort_keys=True))
    return summary
