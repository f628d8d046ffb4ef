"""Daily refresh and model rollout: new events -> sequences -> states -> Feast snapshots -> online.

A thin orchestration of the existing steps, in the order the data flows:

1. ``run_build_sequences``   validates the appended raw events and MERGEs only the affected
                             users into ``user_sequences`` (pipelines/build.py), with the build
                             configuration the lake stores (pipelines/build_config.py) unless
                             flags override it;
2. ``run_batch_inference``   re-encodes only users whose history hash or model version changed
                             and MERGEs ``user_states`` (pipelines/inference.py);
3. ``export_feature_tables`` rewrites the Parquet snapshots Feast reads (pipelines/feast_ops.py);
4. materialize               the rows newer than the store's last materialization go online
                             (``feast_ops.materialize_window``; a full ``materialize`` the
                             first time a store is filled).

Each step already touches only what changed, so the refresh costs what the day's events cost
(benchmarks/refresh.py measures it). What this module adds is the one thing the steps cannot see
alone: WHICH model version an online store serves.

Why one online store (Feast data folder) per model version: the online row of a user is keyed by
``user_id`` only, so a store can hold one state per user. Re-encoding everyone with a new model
and materializing into the store the old resolver reads would leave that resolver, for the whole
rollout, with states it must refuse (409) or serve as cold starts. Materializing the new states
into a NEW folder (its own registry + SQLite file, or its own Redis db) and then switching the
resolver process leaves the old resolver answering from its own states until the switch, and no
request can ever meet a state and a head of different versions. Keying rows by
(user_id, model_version) would do the same inside one store but changes the Feast entity, the
resolver's lookup and every existing store; the folder per version changes nothing that serves.

Three guards make the procedure hard to get wrong (all raise ``RolloutError`` before any work):
- the Feast data folder records the version it serves (``VERSION_MARKER``); a refresh with
  another bundle is refused instead of pushing foreign states into a live store;
- a Redis online store records it too, in the Redis db itself (``REDIS_VERSION_KEY``): two data
  folders whose yaml point at the same Redis db share one keyspace (rows keyed by user_id
  only), so a rollout into a db another version's store already uses is refused, whichever
  folder it comes from;
- a refresh whose bundle differs from the states already in the lake re-encodes EVERY user, so
  it must be asked for (``new_model=True`` / ``--new-model``), and then only into a fresh folder
  (or the one already marked with the new version, i.e. a retry or a rollback).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set

import ctt_contracts as C
from ctt_contracts.flags import (add_dataclass_flags, add_sections, bundle_field,
                                 feature_repo_field, flag_field, from_args, help_of)
from ctt_contracts.process import entry_point
from models.lake_read import open_table, snapshot_arrow
from pipelines import feast_ops
from pipelines.build_config import (BuildConfig, add_build_flags, flag_values,
                                    load_build_config, timestamp_arg, with_overrides)
from pipelines.build import BuildResult, run_build_sequences
from pipelines.delta_io import WriteResult
from pipelines.inference import (DEFAULT_BATCH_SIZE, BatchInferenceConfig, EncodingConfig,
                                 InferenceResult, run_batch_inference)

VERSION_MARKER = "ctt_model_version"  # file in the Feast data folder: the version it serves
# Key in a Redis online store's db: JSON {model_version, feast_data} of the store that filled it.
# Feast's own keys are serialized entity keys, so this plain name cannot collide with them;
# FLUSHDB (the way to hand a db to another version) removes it with the rows.
REDIS_VERSION_KEY = "ctt:served_model_version"
REGISTRY_FILE = "registry.db"  # feature_store.yaml / redis.yaml: ${CTT_FEAST_DATA}/registry.db
# First fill of a store: every row since the contract's earliest valid timestamp (Feast's own
# materialize-incremental would start one year back for views with ttl=0).
FULL_START = datetime.fromtimestamp(C.MIN_EVENT_TS_SECONDS, tz=timezone.utc)
STEPS = ("build_sequences", "batch_inference", "feast_export", "materialize")


class RolloutError(RuntimeError):
    """A refresh would put states of one model version where another version is served."""


@dataclass(frozen=True)
class MaterializeResult:
    """What went online: the window, whether it was a first full fill, how many user states."""

    start: datetime
    end: datetime
    full: bool
    states_in_window: int  # users with a user_states snapshot row of state_ts in (start, end]
    applied: bool  # `feast apply` ran first

    def line(self) -> str:
        kind = "materialize (first fill)" if self.full else "materialize-incremental"
        return (f"{kind}: {self.start.isoformat()} -> {self.end.isoformat()}, "
                f"{self.states_in_window} user states in the window"
                + ("; feast apply ran first" if self.applied else ""))


@dataclass
class RefreshResult:
    """Everything one refresh did, step by step, with wall-clock seconds per step."""

    model_version: str
    build: BuildResult
    inference: InferenceResult
    exports: List[feast_ops.ExportResult]
    materialized: MaterializeResult
    seconds: Dict[str, float] = field(default_factory=dict)

    @property
    def user_sequences_write(self) -> WriteResult:
        return next(w for w in self.build.writes if w.table == C.T_USER_SEQUENCES)

    def lines(self) -> List[str]:
        us = self.user_sequences_write
        s = self.seconds
        out = [f"[1/4 build_sequences {s.get(STEPS[0], 0):.1f}s] user_sequences "
               f"v{us.version}: +{us.inserted} ~{us.updated} -{us.deleted} users"]
        out += [f"    {w.line()}" for w in self.build.writes]
        out.append(f"[2/4 batch_inference {s.get(STEPS[1], 0):.1f}s] {self.inference.summary()}")
        out.append(f"[3/4 feast_export {s.get(STEPS[2], 0):.1f}s]")
        out += [f"    {e.line()}" for e in self.exports]
        out.append(f"[4/4 materialize {s.get(STEPS[3], 0):.1f}s] {self.materialized.line()}")
        return out


# --------------------------------------------------------------------------------------
# Version guards (pure file reads, no Spark)
# --------------------------------------------------------------------------------------
def lake_state_versions(lake: str) -> Set[str]:
    """model_versions present in ``user_states`` (empty: no table yet)."""
    from deltalake.exceptions import TableNotFoundError

    try:
        table = open_table(C.LakePaths(lake).table(C.T_USER_STATES))
    except TableNotFoundError:
        return set()
    column = snapshot_arrow(table, [C.MODEL_VERSION]).column(C.MODEL_VERSION)
    return set(column.unique().to_pylist())


def store_version(feast_data: str | Path) -> Optional[str]:
    """The model version a Feast data folder serves (None: never marked)."""
    marker = Path(feast_data) / VERSION_MARKER
    if not marker.is_file():
        return None
    text = marker.read_text(encoding="utf-8").strip()
    if not text:
        raise RolloutError(f"{marker} is empty; write the served model_version into it or "
                           f"delete the folder and fill a fresh store")
    return text


def store_is_fresh(feast_data: str | Path) -> bool:
    """No registry yet: nothing was ever applied or materialized into this folder."""
    return not (Path(feast_data) / REGISTRY_FILE).exists()


def check_versions(model_version: str, lake_versions: Set[str], served: Optional[str],
                   fresh_store: bool, new_model: bool) -> None:
    """Refuse a refresh that could pair states and heads of different versions (see module doc)."""
    if served is not None and served != model_version:
        raise RolloutError(
            f"the online store serves model_version {served!r}, the bundle is {model_version!r}: "
            f"refusing to write other-version states into a live store. Roll out into a new "
            f"Feast data folder (--feast-data <new folder> --new-model), then switch the resolver")
    other = sorted(lake_versions - {model_version})
    if other and not new_model:
        raise RolloutError(
            f"user_states holds model_version(s) {other}, the bundle is {model_version!r}: this "
            f"would re-encode every user. For a deliberate rollout pass --new-model with a fresh "
            f"--feast-data folder; for the daily refresh pass the bundle that is being served")
    if new_model and served is None and not fresh_store:
        raise RolloutError(
            "--new-model needs a fresh Feast data folder (no registry.db) or one already marked "
            f"with {model_version!r}; this folder holds a store of an unknown version")


def _redis_client(store: Any) -> Optional[Any]:
    """A redis-py client on the store's Redis db (None: the online store is not Redis). Built by
    Feast's own Redis store, so host, db, password, ssl, cluster and sentinel settings are read
    exactly as materialize and the resolver read them."""
    config = store.config.online_store
    if getattr(config, "type", None) != "redis":
        return None
    from feast.infra.online_stores.redis import RedisOnlineStore

    return RedisOnlineStore()._get_client(config)


def _redis_where(store: Any) -> str:
    """host:port[,db=N] of the store's connection string, without credentials."""
    parts = store.config.online_store.connection_string.split(",")
    return ",".join(p for p in parts if "=" not in p or p.split("=", 1)[0].strip() == "db")


def redis_store_version(store: Any) -> Optional[Dict[str, str]]:
    """{model_version, feast_data} recorded in the store's Redis db; None if never marked (or
    the store is not Redis)."""
    client = _redis_client(store)
    if client is None:
        return None
    raw = client.get(REDIS_VERSION_KEY)
    return None if raw is None else json.loads(raw)


def check_redis_store(store: Any, model_version: str, feast_data: str | Path) -> None:
    """Refuse when the store's Redis db already serves another model version (any folder)."""
    recorded = redis_store_version(store)
    if recorded is None or recorded["model_version"] == model_version:
        return
    raise RolloutError(
        f"the Redis online store {_redis_where(store)} already holds the states of model_version "
        f"{recorded['model_version']!r} (filled through Feast data folder {recorded['feast_data']}); "
        f"refusing to materialize {model_version!r} into it from {feast_data}: one Redis db is one "
        f"keyspace (rows keyed by user_id), the other version's resolver would read these states. "
        f"Give each version its own db (',db=N' in the connection_string of a copy of redis.yaml) "
        f"or instance (docs/operations.md section 5), or FLUSHDB a db that no resolver reads any "
        f"more")


def claim_redis_store(store: Any, model_version: str, feast_data: str | Path) -> None:
    """Record this version in the store's Redis db (SET NX), or refuse if another version's
    store already did; a no-op for other online stores."""
    client = _redis_client(store)
    if client is None:
        return
    value = json.dumps({"model_version": model_version,
                        "feast_data": str(Path(feast_data).resolve())})
    if not client.set(REDIS_VERSION_KEY, value, nx=True):
        check_redis_store(store, model_version, feast_data)


def mark_store(feast_data: str | Path, model_version: str) -> None:
    """Record the version a store serves (written once, before anything goes online)."""
    folder = Path(feast_data)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / VERSION_MARKER).write_text(model_version + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------
# Feast step
# --------------------------------------------------------------------------------------
def _states_in_window(lake: str, start: datetime, end: datetime) -> int:
    """Users whose state the window put online (once each, whatever parts hold it)."""
    path = C.feast_snapshot_path(lake, C.T_USER_STATES)
    if not feast_ops.snapshot_parts(path):
        return 0
    return feast_ops.keys_in_window(path, C.USER_ID, C.STATE_TS, start, end)


def materialize_step(lake: str, feast_data: str | Path, end: datetime,
                     repo_dir: Path = feast_ops.FEATURE_REPO, fs_yaml_file: Optional[Path] = None,
                     apply: bool = False, written_at: Optional[datetime] = None) -> MaterializeResult:
    """Incremental materialize of every view; a full one for a store never filled.

    ``written_at`` = the state_ts this run stamped; if it is older than the store's watermark
    (a rerun with an explicit ``--now`` in the past), the window starts there instead, because
    ``materialize-incremental`` would skip those states and they would never go online.
    """
    store = feast_ops.feature_store(lake, feast_data, repo_dir, fs_yaml_file)
    if apply:
        with feast_ops.feast_env(lake, feast_data):
            objects = feast_ops.repo_objects(repo_dir)
        store.apply(objects)
    elif store_is_fresh(feast_data):
        raise FileNotFoundError(f"no Feast registry in {feast_data}: run `feast apply` there first "
                                f"(or pass --apply)")
    views = [v.name for v in store.list_feature_views()]
    if not views:
        raise RuntimeError(f"the registry in {feast_data} has no feature views: run `feast apply`")
    previous = [store.get_feature_view(v).most_recent_end_time for v in views]
    with feast_ops.feast_env(lake, feast_data):
        if any(p is None for p in previous):
            start, full = FULL_START, True
            feast_ops.materialize(store, start, end)
        else:
            start, full = min(C.as_utc(p) for p in previous), False
            if written_at is not None and written_at <= start:
                start = written_at - timedelta(seconds=1)
                feast_ops.materialize_window(store, end, start)
            else:
                feast_ops.materialize_window(store, end)
    start = C.as_utc(start)
    return MaterializeResult(start, end, full, _states_in_window(lake, start, end), apply)


# --------------------------------------------------------------------------------------
# The refresh
# --------------------------------------------------------------------------------------
def run_refresh(spark: Any, lake: str, bundle: str | Path, feast_data: str | Path,
                cfg: Optional[BuildConfig] = None, new_model: bool = False, apply: bool = False,
                batch_size: int = DEFAULT_BATCH_SIZE, partitions: Optional[int] = None,
                repo_dir: Path = feast_ops.FEATURE_REPO, fs_yaml_file: Optional[Path] = None,
                now: Optional[datetime] = None,
                build_overrides: Mapping[str, Any] = {}, full: bool = False,
                full_inference: bool = False) -> RefreshResult:
    """build_sequences -> batch_inference -> snapshot export -> materialize, guarded by version.

    ``cfg`` None: the build configuration stored in the lake by its last build (defaults for a
    lake built before it was stored), with ``build_overrides`` (BuildConfig fields) replaced;
    where it came from is printed. A given ``cfg`` is used as is.

    ``now`` is the reference time of validation and the ``state_ts`` of re-encoded users
    (default: wall clock). The materialize window ends after batch inference finished, so every
    state written by this run is inside it.
    """
    from models.manifest import verified_manifest

    # the manifest names the version; its checksums are verified before any work (no torch)
    model_version = verified_manifest(bundle)[C.MODEL_VERSION]
    check_versions(model_version, lake_state_versions(lake), store_version(feast_data),
                   store_is_fresh(feast_data), new_model)
    if now is not None and now >= datetime.now(timezone.utc):
        raise ValueError(f"now={now.isoformat()} is not in the past: states stamped with it would "
                         f"fall outside the materialize window, which ends when the run does")
    if store_is_fresh(feast_data) and not apply:
        raise FileNotFoundError(f"no Feast registry in {feast_data}: run `feast apply` there first "
                                f"(or pass --apply)")
    # a Redis db is claimed for this version now, before any work: of two rollouts racing for
    # one db the second stops here
    claim_redis_store(feast_ops.feature_store(lake, feast_data, repo_dir, fs_yaml_file),
                      model_version, feast_data)
    if cfg is None:
        cfg, origin = with_overrides(load_build_config(spark, lake), build_overrides)
        print(origin, flush=True)
    seconds: Dict[str, float] = {}

    t0 = time.perf_counter()
    build = run_build_sequences(spark, lake, cfg, now, full=full)
    seconds[STEPS[0]] = time.perf_counter() - t0

    t0 = time.perf_counter()
    state_ts = now or datetime.now(timezone.utc)
    inference = run_batch_inference(spark, lake, str(bundle), batch_size, partitions, state_ts,
                                    full=full_inference)
    seconds[STEPS[1]] = time.perf_counter() - t0

    t0 = time.perf_counter()
    exports = feast_ops.export_feature_tables(lake)
    seconds[STEPS[2]] = time.perf_counter() - t0

    t0 = time.perf_counter()
    mark_store(feast_data, model_version)
    end = datetime.now(timezone.utc)  # after batch inference: every state of this run is inside
    materialized = materialize_step(lake, feast_data, end, repo_dir, fs_yaml_file, apply,
                                    state_ts if inference.committed else None)
    seconds[STEPS[3]] = time.perf_counter() - t0
    return RefreshResult(model_version, build, inference, exports, materialized, seconds)


# --------------------------------------------------------------------------------------
# CLI: jobs/refresh.py (python or spark-submit)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RefreshConfig:
    """The refresh's own settings (the lake and Spark: ``pipelines.cli.SparkJob``; the encoding
    knobs: ``EncodingConfig``; the build: the lake's stored ``BuildConfig`` with the flags given
    as overrides, and ``pipelines.cli.BuildRun``'s ``--full``)."""

    bundle: str = bundle_field(note="the one being served")
    feast_data: Optional[str] = flag_field(
        f"Feast data folder of the online store (registry + SQLite file); default "
        f"${C.ENV_FEAST_DATA}. One folder per model version", None)
    feature_repo: Path = feature_repo_field(feast_ops.FEATURE_REPO)
    fs_yaml: Optional[Path] = flag_field(
        "Feast config file instead of <feature-repo>/feature_store.yaml "
        "(e.g. feature_repo/redis.yaml)", None)
    apply: bool = flag_field("run `feast apply` before materializing (needed once per new folder)", False)
    new_model: bool = flag_field(
        "the bundle differs from the states in the lake: re-encode everyone into a fresh "
        "--feast-data folder (rollout)", False)
    full_inference: bool = flag_field(
        f"batch inference's --full: {help_of(BatchInferenceConfig, 'full')}", False)
    now: Optional[datetime] = flag_field(
        "reference time for validation and state_ts (default: wall clock, UTC)", None,
        parse=timestamp_arg)


def build_parser() -> argparse.ArgumentParser:
    from pipelines.cli import BuildRun, job_parser

    p = job_parser(
        "refresh",
        "Daily refresh: build_sequences (appended events -> affected users) -> "
        "batch inference (re-encodes only changed users) -> Feast snapshots -> "
        "materialize-incremental into the online store of --feast-data. Prints what "
        "each step touched. With --new-model: roll a new bundle out into a fresh "
        "Feast data folder (docs/operations.md).")
    add_sections(p, RefreshConfig, EncodingConfig)
    build = p.add_argument_group(
        "build_sequences (default: the configuration the lake's last build stored; a flag given "
        "here replaces that one value, and the refresh prints what it used)")
    add_build_flags(build, overrides=True)
    add_dataclass_flags(build, BuildRun, only=("full",))
    return p


def main(argv: Optional[Sequence[str]] = None) -> RefreshResult:
    import os

    from pipelines.cli import BuildRun, job_session

    parser = build_parser()
    args = parser.parse_args(argv)
    cfg, encoding = from_args(RefreshConfig, args), from_args(EncodingConfig, args)
    full = from_args(BuildRun, args).full
    feast_data = cfg.feast_data or os.environ.get(C.ENV_FEAST_DATA)
    if not feast_data:
        raise SystemExit(f"give --feast-data or export {C.ENV_FEAST_DATA}")
    overrides = flag_values(args)
    try:
        BuildConfig(**overrides).explicit_cutoffs()  # a bad flag fails before Spark starts
    except ValueError as err:
        parser.error(str(err))
    spark = job_session(args, "ctt-refresh")
    try:
        result = run_refresh(spark, args.lake, cfg.bundle, feast_data, new_model=cfg.new_model,
                             apply=cfg.apply, batch_size=encoding.batch_size,
                             partitions=encoding.partitions, repo_dir=cfg.feature_repo,
                             fs_yaml_file=cfg.fs_yaml, now=cfg.now, build_overrides=overrides,
                             full=full, full_inference=cfg.full_inference)
    finally:
        spark.stop()
    for line in result.lines():
        print(line, flush=True)
    return result


# Command-line entry point: the process ends with the exit code main chose (ctt_contracts.process).
cli = entry_point(main)


if __name__ == "__main__":
    cli()
