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

from typing import Optional, Sequence, Tuple

import pyarrow as pa

_VIEW = "t"


def open_table(path: str, version: Optional[int] = None):
    """The table's snapshot at ``version`` (latest when None); raises deltalake's
    TableNotFoundError when ``path`` holds no Delta table."""
    from deltalake import DeltaTable

    return DeltaTable(path) if version is None else DeltaTable(path, version=version)


def snapshot_arrow(table, columns: Optional[Sequence[str]] = None) -> pa.Table:
    """Every live row of an opened table (``open_table``), ``columns`` in that order (all when
    None), typed as the table's schema declares."""
    from deltalake import QueryBuilder

    schema = pa.schema(table.schema().to_arrow())
    names = list(columns) if columns is not None else schema.names
    if not names:
        raise ValueError(f"{table.table_uri}: no columns to read")
    missing = [n for n in names if n not in schema.names]
    if missing:
        raise KeyError(f"{table.table_uri}: no column(s) {missing}; it has {schema.names}")
    select = ", ".join('"' + n.replace('"', '""') + '"' for n in names)
    reader = QueryBuilder().register(_VIEW, table).execute(f"SELECT {select} FROM {_VIEW}")
    data = pa.table(reader)
    return data.cast(pa.schema([schema.field(n) for n in names]))


def read_arrow(path: str, columns: Optional[Sequence[str]] = None,
               version: Optional[int] = None) -> Tuple[pa.Table, int]:
    """(rows, version read) of the Delta table at ``path``: one snapshot for both."""
    table = open_table(path, version)
    return snapshot_arrow(table, columns), int(table.version())
