"""Feast operations of the project: the offline snapshots Feast reads, and apply / materialize.

Why Feast reads Parquet snapshots and not the Delta tables (the full comparison is in
feature_repo/definitions.py): the installed Feast 0.67 has no JVM-free, Delta-aware offline
store. Its file (dask) store ignores ``DeltaFormat`` and reads every Parquet file of a Delta
folder, including files that MERGE/DELETE/overwrite removed (a deleted user stays served; an
updated state appears twice); its Spark store reads Delta correctly but starts a JVM for every
``feast apply`` and ``feast materialize``. So :func:`export_feature_tables` reads each Delta
table at one version with ``deltalake`` (Delta-aware, no JVM) and writes each feature view's
snapshot, a folder of Parquet parts that each record the Delta version they came from. It is
the ONE place that writes the layout; definitions.py points the sources at
``ctt_contracts.feast_snapshot_path``.

A snapshot folder holds one part with every row (a full export), then one part per later export
of user_states with the states written since (read from the table's change data feed): a day's
refresh of a 1M-user lake writes its ~1k new states, not the 1M (256 MB) again. Feast reads the
folder as one table and keeps each user's newest row, as it does for any offline log. A removed
user, too many parts, or increments outgrowing a quarter of the first part make the next export
a full one again (a part adds rows; it cannot remove any).

The users and items tables carry no event timestamp, which Feast needs. The snapshot adds
``feature_ts`` = when the row's content was first exported in its current form: a row whose
values did not change since the previous snapshot keeps its old ``feature_ts``, so
``feast materialize-incremental`` re-sends only changed profiles and items, and reruns over an
unchanged Delta version write nothing at all.

The apply/materialize helpers wrap the Feast SDK for tests, the demo and notebooks; the
``feast`` CLI works the same on feature_repo/ once CTT_LAKE and CTT_FEAST_DATA are exported.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

import ctt_contracts as C
from ctt_contracts.files import atomic_write
from ctt_contracts.flags import dataclass_parser, flag_field, from_args, lake_field
from ctt_contracts.process import entry_point
from models.lake_read import at_least, change_feed_arrow, open_table, snapshot_arrow

# Snapshot names, paths and the environment variables are in ctt_contracts (feature_repo/
# reads them too); what follows is local to writing the snapshots.
SOURCE_VERSION_KEY = b"ctt.delta_version"  # Parquet schema metadata: Delta version exported
SNAPSHOT_ROW_GROUP = 65_536  # rows per Parquet row group of a snapshot (see by_event_time)
PART_PREFIX = "v"  # a snapshot part: v<Delta version, 12 digits>.parquet
MAX_PARTS = 16  # parts of a snapshot folder before an export compacts it to one
COMPACT_FRACTION = 0.25  # rows of a folder's increments, as a share of its first part, ditto

REPO_ROOT = Path(__file__).resolve().parents[1]
FEATURE_REPO = REPO_ROOT / "feature_repo"
DEFAULT_LAKE = REPO_ROOT / "demo_run" / "lake"  # the lake of `make demo` (CLI default only)

_UTC_TS = pa.timestamp("us", tz="UTC")
SNAPSHOT_SCHEMAS: Dict[str, pa.Schema] = {
    C.T_USER_STATES: pa.schema([
        (C.USER_ID, pa.int64()), (C.HIDDEN_STATE, pa.list_(pa.float32())),
        (C.MODEL_VERSION, pa.string()), (C.SEQUENCE_HASH, pa.string()), (C.STATE_TS, _UTC_TS)]),
    C.T_USER_PROFILE_FEATURES: pa.schema([
        (C.USER_ID, pa.int64()), (C.AGE_BUCKET, pa.int64()), (C.COUNTRY, pa.string()),
        (C.GENDER, pa.string()), (C.FEATURE_TS, _UTC_TS)]),
    C.T_ITEM_CATEGORY_FEATURES: pa.schema([
        (C.ITEM_ID, pa.int64()), (C.CATEGORY_IDS, pa.list_(pa.int64())),
        (C.CATEGORY_WEIGHTS, pa.list_(pa.float32())), (C.FEATURE_TS, _UTC_TS)]),
}
_KEYS = {C.T_USER_STATES: C.USER_ID, C.T_USER_PROFILE_FEATURES: C.USER_ID,
         C.T_ITEM_CATEGORY_FEATURES: C.ITEM_ID}


def _local_dir(lake_root: str | Path) -> Path:
    """The lake root as a local folder (the snapshot is written with local file I/O)."""
    parsed = urlparse(str(lake_root))
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme else str(lake_root))
    raise ValueError(f"Feast snapshots are written to a local lake only, got {lake_root!r}; "
                     f"export from a machine that mounts the lake")


# --------------------------------------------------------------------------------------
# Snapshot export
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportResult:
    """One snapshot: where, from which Delta version, what the export wrote."""

    snapshot: str
    path: str
    source_version: int
    rows: int  # rows of the part written (a full export: every row); up to date: 0
    changed_rows: int  # rows with a new feature_ts / state (all rows on a first export)
    mode: str  # MODE_FULL, MODE_INCREMENT or MODE_UP_TO_DATE

    @property
    def written(self) -> bool:
        """False: the snapshot already matched this Delta version (nothing written)."""
        return self.mode != MODE_UP_TO_DATE

    def line(self) -> str:
        return (f"{self.snapshot:<24} from Delta v{self.source_version:<4} rows {self.rows:>9} "
                f"changed {self.changed_rows:>9}  {self.mode}")


MODE_FULL, MODE_INCREMENT, MODE_UP_TO_DATE = "full", "increment", "up to date"


def part_path(folder: str | Path, version: int) -> Path:
    """The part of a snapshot folder exported from Delta version ``version``."""
    return Path(folder) / f"{PART_PREFIX}{version:012d}.parquet"


def snapshot_parts(path: str | Path) -> List[Path]:
    """The parts of the snapshot at ``path``, oldest first (a snapshot of an earlier release
    is one Parquet file: its only part; no snapshot: none)."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(path.glob(f"{PART_PREFIX}*.parquet")) if path.is_dir() else []


def _part_version(part: Path) -> int:
    meta = pq.read_schema(part).metadata or {}
    if SOURCE_VERSION_KEY not in meta:
        raise ValueError(f"{part}: a Parquet file without {SOURCE_VERSION_KEY.decode()} metadata "
                         f"is not a snapshot of this project; delete it and export again")
    return int(meta[SOURCE_VERSION_KEY])


def snapshot_source_version(path: str | Path) -> Optional[int]:
    """Delta version the snapshot at ``path`` is at: that of its newest part (None: no
    snapshot)."""
    versions = [_part_version(part) for part in snapshot_parts(path)]
    return max(versions) if versions else None


def _hashable(value: Any) -> Any:
    """Lists/arrays -> tuples so that rows compare by value."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return tuple(value.tolist() if isinstance(value, np.ndarray) else value)
    return value


def stable_feature_ts(new: pd.DataFrame, previous: Optional[pd.DataFrame], key: str,
                      now: datetime) -> pd.DataFrame:
    """Add FEATURE_TS: the previous snapshot's timestamp for unchanged rows, ``now`` otherwise.

    ``new`` holds the key + value columns; ``previous`` the last snapshot (with FEATURE_TS) or
    None. Pure pandas so it is testable without files.
    """
    if new[key].duplicated().any():
        dup = new.loc[new[key].duplicated(), key].iloc[0]
        raise ValueError(f"duplicate {key} {dup} in the source table; cannot build a snapshot")
    if now.tzinfo is None:
        raise ValueError(f"now must be timezone-aware, got {now!r}")
    stamp = pd.Timestamp(now).tz_convert("UTC")
    out = new.copy()
    out[C.FEATURE_TS] = stamp
    if previous is None or previous.empty:
        return out
    values = [c for c in new.columns if c != key]
    old = previous.set_index(key)
    common = out[key].isin(old.index)
    if common.any():
        idx = out.loc[common, key]
        same = np.ones(int(common.sum()), dtype=bool)
        for col in values:
            a = out.loc[common, col].map(_hashable).to_numpy(dtype=object)
            b = old.loc[idx, col].map(_hashable).to_numpy(dtype=object)
            same &= np.array([x == y for x, y in zip(a, b)], dtype=bool)
        keep = out.index[common][same]
        out.loc[keep, C.FEATURE_TS] = old.loc[out.loc[keep, key], C.FEATURE_TS].to_numpy()
    return out


def _conform(data: pd.DataFrame | pa.Table, schema: pa.Schema, version: int) -> pa.Table:
    """pandas/Arrow -> Arrow with exactly the snapshot schema and the Delta version as metadata."""
    columns = list(data.columns) if isinstance(data, pd.DataFrame) else data.column_names
    missing = [n for n in schema.names if n not in columns]
    if missing:
        raise ValueError(f"source lacks columns {missing}; has {columns}")
    if isinstance(data, pd.DataFrame):
        table = pa.Table.from_pandas(data[schema.names], preserve_index=False)
    else:
        table = data.select(schema.names)
    table = table.cast(schema)
    return table.replace_schema_metadata({SOURCE_VERSION_KEY: str(version).encode()})


def _write_atomic(table: pa.Table, path: Path) -> None:
    """One snapshot part, whole or not at all (a reader never sees a half-written part)."""
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, row_group_size=SNAPSHOT_ROW_GROUP))


def _replace_parts(target: Path, table: pa.Table, version: int) -> None:
    """A full export: ``table`` becomes the snapshot's one part, then the older parts go (a
    reader in between sees both: duplicate rows of one time, or an older row beside its
    newer one, which Feast resolves to the newest). A one-file snapshot of an earlier release
    is replaced by the folder."""
    if target.is_file():
        target.unlink()
    old = snapshot_parts(target)
    new = part_path(target, version)
    _write_atomic(table, new)
    for part in old:
        if part != new:
            part.unlink()


def _feed_on(table) -> bool:
    return table.metadata().configuration.get(C.CDF_PROPERTY) == "true"


def changed_states(source: str, delta, since: Optional[int]) -> Optional[pa.Table]:
    """The user_states rows written after Delta version ``since`` (each user's newest), as the
    table's change data feed says; None when the feed cannot say: no earlier export, a table
    behind it (recreated), the feed off at either end or its files gone, or a user removed (a
    part can add rows, not remove one: the export then rewrites the snapshot).

    The feed gives who changed and when; the rows are read from the table at its current
    version (a changed user's row there is its newest image), where ``state_ts`` is at least
    the oldest new image's: the files and row groups of earlier days are skipped. (Spark
    writes the feed's state vectors as lists of nullable floats, the table declares them
    non-null, and delta-rs refuses that cast.)"""
    import pyarrow.compute as pc
    from deltalake.exceptions import DeltaError

    version = int(delta.version())
    if since is None or since >= version or not _feed_on(delta) \
            or not _feed_on(open_table(source, since)):
        return None
    try:
        feed = change_feed_arrow(delta, since + 1, version, [C.USER_ID, C.STATE_TS],
                                 [(C.CDF_TYPE, pa.string()), (C.CDF_VERSION, pa.int64())])
    except (DeltaError, OSError, ValueError):  # its files vacuumed, its versions expired
        return None
    kinds = feed.column(C.CDF_TYPE)
    if pc.any(pc.equal(kinds, C.CDF_DELETE)).as_py():
        return None
    images = feed.filter(pc.not_equal(kinds, C.CDF_PREIMAGE))  # inserts + update post-images
    names = SNAPSHOT_SCHEMAS[C.T_USER_STATES].names
    if not images.num_rows:
        return SNAPSHOT_SCHEMAS[C.T_USER_STATES].empty_table()
    oldest = pc.min(images.column(C.STATE_TS)).as_py()
    rows = snapshot_arrow(delta, names, where=at_least(C.STATE_TS, oldest))
    return rows.filter(pc.is_in(rows.column(C.USER_ID), value_set=images.column(C.USER_ID)))


def _increment_fits(target: Path, rows: int) -> bool:
    """Whether a part of ``rows`` rows may be added to the snapshot at ``target``: it is a
    folder, under MAX_PARTS parts, whose increments (the parts after the first, whose rows
    newer parts may supersede) stay within COMPACT_FRACTION of its first part's rows; else the
    export compacts it to one part (readers scan every part: superseded rows cost them)."""
    parts = snapshot_parts(target)
    if not target.is_dir() or not parts or len(parts) >= MAX_PARTS:
        return False
    counts = [pq.read_metadata(part).num_rows for part in parts]
    return sum(counts[1:]) + rows <= COMPACT_FRACTION * counts[0]


def _changed_state_count(target: Path, current: pa.Table) -> int:
    """Rows of ``current`` (user, state_ts) that the snapshot at ``target`` does not hold."""
    if not snapshot_parts(target):
        return current.num_rows
    prev = pq.read_table(target, columns=[C.USER_ID, C.STATE_TS]).to_pandas().drop_duplicates()
    cur = current.select([C.USER_ID, C.STATE_TS]).to_pandas()
    return int((~cur.merge(prev, how="left", indicator=True)["_merge"].eq("both")).sum())


def export_snapshot(lake_root: str | Path, snapshot: str, now: Optional[datetime] = None) -> ExportResult:
    """Export one Delta table to its Parquet snapshot folder: nothing when it is at this
    version already; user_states changed since the last export as one more part (read from
    the table's change data feed: a day's states, not the lake's); otherwise the whole table
    as the one part."""
    now = now or datetime.now(timezone.utc)
    source = C.LakePaths(str(lake_root)).table(C.FEAST_SNAPSHOT_SOURCES[snapshot])
    target = _local_dir(lake_root) / C.FEAST_EXPORT_DIR / f"{snapshot}.parquet"
    schema, key, ts = SNAPSHOT_SCHEMAS[snapshot], _KEYS[snapshot], C.FEAST_SNAPSHOT_TS[snapshot]
    delta = open_table(source)  # one version for the check and the read
    version = int(delta.version())
    exported = snapshot_source_version(target)
    if exported == version:
        return ExportResult(snapshot, str(target), version, 0, 0, MODE_UP_TO_DATE)
    if snapshot == C.T_USER_STATES:
        changes = changed_states(source, delta, exported)
        if changes is not None and _increment_fits(target, changes.num_rows):
            _write_atomic(by_event_time(_conform(changes, schema, version), ts),
                          part_path(target, version))
            return ExportResult(snapshot, str(target), version, changes.num_rows,
                                changes.num_rows, MODE_INCREMENT)
    table = snapshot_arrow(delta, [n for n in schema.names if n != C.FEATURE_TS])
    if snapshot == C.T_USER_STATES:
        # Arrow end to end: the vectors are the bulk of the data, pandas would box every row.
        if len(np.unique(table.column(key).to_numpy())) != table.num_rows:
            raise ValueError(f"{source}: duplicate {key} rows; user_states must have one row per user")
        out, changed = table, _changed_state_count(target, table)
    else:
        previous = pq.read_table(target).to_pandas() if snapshot_parts(target) else None
        out = stable_feature_ts(table.to_pandas(), previous, key, now)
        changed = int((out[C.FEATURE_TS] == pd.Timestamp(now).tz_convert("UTC")).sum())
    _replace_parts(target, by_event_time(_conform(out, schema, version), ts), version)
    return ExportResult(snapshot, str(target), version, len(out), changed, MODE_FULL)


def by_event_time(table: pa.Table, ts_field: str) -> pa.Table:
    """The snapshot's rows oldest first by ``ts_field`` (rows of one time keep their order).

    Why: a refresh materializes only the rows newer than the last materialization, and these
    are then the last rows of the file; written in row groups of ``SNAPSHOT_ROW_GROUP`` rows,
    :func:`window_rows` reads the row groups whose timestamp statistics reach the window and
    skips the others (a day of 800 new states on a 1M-user lake: one group of 64k rows, not
    the whole 1M x 64 floats)."""
    import pyarrow.compute as pc

    order = pc.sort_indices(table.column(ts_field))  # (N,) a stable sort
    return pa.table([_take(table.column(name), order) for name in table.column_names],
                    schema=table.schema)


def _take(column: pa.ChunkedArray, order: pa.Array) -> pa.Array:
    """``column`` reordered. A list column whose rows all have one length (the user states) is
    moved as a fixed-size list: Arrow takes variable-size lists row by row (``Table.sort_by``
    spent 2.4 s on 1M states of 64 floats), fixed-size ones as one block (0.15 s)."""
    import pyarrow.compute as pc

    data = column.combine_chunks()
    if pa.types.is_list(data.type) and len(data) and data.null_count == 0:
        lengths = pc.min_max(pc.list_value_length(data)).as_py()
        if lengths["min"] == lengths["max"]:
            fixed = data.cast(pa.list_(data.type.value_type, lengths["min"]))
            return fixed.take(order).cast(data.type)
    return data.take(order)


def export_feature_tables(lake_root: str | Path,
                          snapshots: Sequence[str] = tuple(C.FEAST_SNAPSHOT_SOURCES),
                          now: Optional[datetime] = None) -> List[ExportResult]:
    """Refresh the Parquet snapshots Feast reads (user_states, user profiles, item categories).

    Run after batch inference (jobs/batch_inference.py does it by default) and after the users /
    items tables change; then ``feast materialize-incremental`` moves the new rows online.
    """
    now = now or datetime.now(timezone.utc)
    return [export_snapshot(lake_root, name, now) for name in snapshots]


# --------------------------------------------------------------------------------------
# apply / materialize through the Feast SDK
# --------------------------------------------------------------------------------------
@contextlib.contextmanager
def scoped_environ(values: Dict[str, Optional[str]]) -> Iterator[None]:
    """Set (None: unset) environment variables for the duration of the block, then restore the
    previous values (unset ones are removed again)."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        _set_environ(values)
        yield
    finally:
        _set_environ(saved)


def _set_environ(values: Dict[str, Optional[str]]) -> None:
    """Set each variable to its value, or unset it where the value is None."""
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def feast_env(lake_root: str | Path, feast_data: str | Path) -> contextlib.AbstractContextManager[None]:
    """Set CTT_LAKE / CTT_FEAST_DATA while Feast reads feature_store.yaml and definitions.py.

    Feast resolves ``${CTT_FEAST_DATA}`` when it loads the YAML and definitions.py reads
    CTT_LAKE at import; the previous values are restored afterwards.
    """
    return scoped_environ({C.ENV_LAKE: str(lake_root), C.ENV_FEAST_DATA: str(Path(feast_data).resolve())})


def feature_store(lake_root: str | Path, feast_data: str | Path, repo_dir: Path = FEATURE_REPO,
                  fs_yaml_file: Optional[Path] = None) -> Any:
    """A FeatureStore over feature_repo/ with the given lake and Feast data folder."""
    from feast import FeatureStore

    Path(feast_data).mkdir(parents=True, exist_ok=True)
    with feast_env(lake_root, feast_data):
        return FeatureStore(repo_path=str(repo_dir), fs_yaml_file=fs_yaml_file)


def repo_objects(repo_dir: Path = FEATURE_REPO) -> List[Any]:
    """The Feast objects declared in ``repo_dir``/definitions.py (imported under a private name,
    so applying two repos in one process cannot mix their modules)."""
    from feast import Entity, FeatureService, FeatureView

    spec = importlib.util.spec_from_file_location(f"_ctt_feast_defs_{uuid.uuid4().hex}",
                                                  Path(repo_dir) / "definitions.py")
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"{repo_dir}/definitions.py not found")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kinds = (Entity, FeatureView, FeatureService)
    found = {id(v): v for v in vars(module).values() if isinstance(v, kinds)}
    return list(found.values())


def apply(lake_root: str | Path, feast_data: str | Path, repo_dir: Path = FEATURE_REPO) -> Any:
    """``feast apply`` through the SDK: register the definitions, create online tables."""
    store = feature_store(lake_root, feast_data, repo_dir)
    with feast_env(lake_root, feast_data):
        objects = repo_objects(repo_dir)
    store.apply(objects)
    return store


def materialize(store: Any, start: datetime, end: datetime,
                views: Optional[List[str]] = None) -> None:
    """``feast materialize START END``: rows with event time in [start, end] go online."""
    store.materialize(start_date=start, end_date=end, feature_views=views)


def materialize_incremental(store: Any, end: Optional[datetime] = None,
                            views: Optional[List[str]] = None) -> None:
    """``feast materialize-incremental END``: rows newer than the last materialization."""
    store.materialize_incremental(end_date=end or datetime.now(timezone.utc), feature_views=views)


def keys_in_window(path: str | Path, key: str, timestamp_field: str, start: datetime,
                   end: datetime) -> int:
    """How many distinct ``key`` values of the Parquet snapshot at ``path`` have a row with
    start < timestamp <= end (:func:`window_rows` of those two columns, not the 64 floats of a
    user state); a key that two parts wrote within the window counts once."""
    import pyarrow.compute as pc

    rows = window_rows(path, timestamp_field, start, end, columns=[key])
    return len(pc.unique(rows.column(key)))


def window_rows(path: str | Path, timestamp_field: str, start: datetime, end: datetime,
                columns: Optional[Sequence[str]] = None) -> pa.Table:
    """The rows of the Parquet snapshot at ``path`` with start < timestamp <= end (``columns``
    only, all when None). Row groups whose timestamp statistics lie outside the window are not
    read (the export writes the rows oldest first: ``by_event_time``); a snapshot written in
    another order is read whole."""
    import pyarrow.dataset as ds

    data = ds.dataset(str(path), format="parquet")
    ts_type = data.schema.field(timestamp_field).type
    lo, hi = (pa.scalar(t, type=ts_type) for t in (start, end))
    column = ds.field(timestamp_field)
    return data.to_table(columns=None if columns is None else list(columns),
                         filter=(column > lo) & (column <= hi))


def newest_per_key(rows: pa.Table, keys: Sequence[str], timestamp_field: str) -> pd.DataFrame:
    """Each key's newest row of ``rows`` (a window of a snapshot folder holds one row per part
    that wrote the key: an online store keeps whichever row it is given last)."""
    frame = rows.to_pandas().sort_values(timestamp_field, kind="stable")
    return frame.drop_duplicates(list(keys), keep="last")


def materialize_window(store: Any, end: datetime,
                       start: Optional[datetime] = None) -> Dict[str, int]:
    """``feast materialize-incremental END`` for the Parquet snapshot sources, at the cost of
    the window's rows: each view's rows newer than its last materialization (or than
    ``start``, if earlier) go online with ``FeatureStore.write_to_online_store``, and the
    interval is recorded in the registry as a materialization, so a later
    ``feast materialize-incremental`` starts where this one ended. Returns the keys written
    per view.

    Why not ``store.materialize_incremental``: Feast's file (dask) offline store reads,
    normalises and sorts the whole snapshot for any window; on a lake of 1M users that was
    80 s for a day with nothing new (benchmarks/refresh.py), whatever the window held.
    Only for views already materialized once (the first fill stays ``materialize``).
    """
    counts = {}
    for view in store.list_feature_views():
        previous = view.most_recent_end_time
        if previous is None:
            raise ValueError(f"feature view {view.name} was never materialized: run a full "
                             f"materialize first")
        since = C.as_utc(previous) if start is None else min(C.as_utc(previous), start)
        source = view.batch_source
        rows = window_rows(source.path, source.timestamp_field, since, end)
        if rows.num_rows:
            keys = [column.name for column in view.entity_columns]
            newest = newest_per_key(rows, keys, source.timestamp_field)
            store.write_to_online_store(view.name, newest)
            counts[view.name] = len(newest)
        else:
            counts[view.name] = 0
        store.registry.apply_materialization(view, store.project, since, end)
    return counts


# --------------------------------------------------------------------------------------
# CLI: ctt-export-feature-tables / python -m pipelines.feast_ops --lake <root>
# --------------------------------------------------------------------------------------
def _lake_of_environment() -> str:
    """The export's default lake, read when the parser is built (not at import): the lake the
    Feast repo is pointed at (``CTT_LAKE``), else the demo's."""
    return os.environ.get(C.ENV_LAKE, str(DEFAULT_LAKE))


@dataclass(frozen=True)
class ExportConfig:
    """What ``ctt-export-feature-tables`` refreshes: which snapshots of which lake."""

    lake: str = lake_field(default_factory=_lake_of_environment,
                           note=f"default ${C.ENV_LAKE}, else the lake of `make demo`")
    only: Tuple[str, ...] = flag_field("snapshots to refresh", tuple(C.FEAST_SNAPSHOT_SOURCES),
                                       nargs="+", choices=C.FEAST_SNAPSHOT_SOURCES)


def export_parser() -> argparse.ArgumentParser:
    """The export's command line, read from ``ExportConfig``."""
    return dataclass_parser(
        "ctt-export-feature-tables",
        "Refresh the Parquet snapshots Feast materializes from (user_states, user profiles, item "
        "categories), each from one Delta version; unchanged -> no rewrite.", ExportConfig)


def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg = from_args(ExportConfig, export_parser().parse_args(argv))
    for result in export_feature_tables(cfg.lake, cfg.only):
        print(result.line())


# Command-line entry point: the process ends with the exit code main chose (ctt_contracts.process).
cli = entry_point(main)


if __name__ == "__main__":
    cli()
