"""The one delta-rs read of a lake table outside Spark (trainer, Feast export, refresh guards,
serving harness, demo, benchmarks): Arrow at one pinned version, deletion vectors honoured.

Why not ``DeltaTable.to_pyarrow_table``: its pyarrow-dataset scanner refuses tables whose
protocol carries deletion vectors, and the lake's keyed tables carry them (a MERGE that touches
a few users in every file marks rows deleted instead of rewriting each file; see
``pipelines.delta_io.KEYED_PROPERTIES``). deltalake's ``QueryBuilder`` scans through
delta-kernel, which applies the deletion vectors. Its Arrow comes with view types
(``string_view``) and is cast back to the table's own Arrow schema, so callers see the same
types a plain Parquet read gives.

Imports deltalake and pyarrow only (no torch): the refresh and the Feast export use it on their
hot path.
"""
from __future__ import annotations

from datetime import datetime
from typing import Optional, Sequence, Tuple

import pyarrow as pa

import ctt_contracts as C

_VIEW = "t"


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def at_least(column: str, ts: datetime) -> str:
    """The predicate ``column >= ts`` on a UTC timestamp column, for :func:`snapshot_arrow`."""
    literal = C.as_utc(ts).isoformat()
    return f"""{_quoted(column)} >= arrow_cast('{literal}', 'Timestamp(Microsecond, Some("UTC"))')"""


def open_table(path: str, version: Optional[int] = None):
    """The table's snapshot at ``version`` (latest when None); raises deltalake's
    TableNotFoundError when ``path`` holds no Delta table."""
    from deltalake import DeltaTable

    return DeltaTable(path) if version is None else DeltaTable(path, version=version)


def snapshot_arrow(table, columns: Optional[Sequence[str]] = None,
                   where: Optional[str] = None) -> pa.Table:
    """Every live row of an opened table (``open_table``), ``columns`` in that order (all when
    None), typed as the table's schema declares; ``where``: only the rows this SQL predicate
    holds for (e.g. :func:`at_least`), files and row groups whose statistics rule it out
    unread."""
    from deltalake import QueryBuilder

    schema = pa.schema(table.schema().to_arrow())
    names = list(columns) if columns is not None else schema.names
    if not names:
        raise ValueError(f"{table.table_uri}: no columns to read")
    missing = [n for n in names if n not in schema.names]
    if missing:
        raise KeyError(f"{table.table_uri}: no column(s) {missing}; it has {schema.names}")
    select = ", ".join(map(_quoted, names))
    query = f"SELECT {select} FROM {_VIEW}" + (f" WHERE {where}" if where else "")
    reader = QueryBuilder().register(_VIEW, table).execute(query)
    data = pa.table(reader)
    return data.cast(pa.schema([schema.field(n) for n in names]))


def read_arrow(path: str, columns: Optional[Sequence[str]] = None,
               version: Optional[int] = None) -> Tuple[pa.Table, int]:
    """(rows, version read) of the Delta table at ``path``: one snapshot for both."""
    table = open_table(path, version)
    return snapshot_arrow(table, columns), int(table.version())


def change_feed_arrow(table, start: int, end: int, columns: Sequence[str],
                      meta: Sequence[Tuple[str, pa.DataType]]) -> pa.Table:
    """The change data feed of an opened table, versions ``start..end`` inclusive: ``columns``
    typed as the table's schema declares, then the feed's own ``meta`` columns (name, type),
    e.g. the change type and commit version. Raises deltalake's errors (or Arrow's, when the
    feed's files are gone) when the feed cannot be read for those versions."""
    schema = pa.schema(table.schema().to_arrow())
    feed = pa.table(table.load_cdf(starting_version=start, ending_version=end,
                                   columns=[*columns, *(name for name, _ in meta)]))
    return feed.cast(pa.schema([*(schema.field(n) for n in columns),
                                *(pa.field(name, kind) for name, kind in meta)]))
