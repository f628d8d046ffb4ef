"""Keyed tables keep deletion vectors, and every reader outside Spark applies them.

Why it matters: a daily increment touches a few users in every file of the keyed tables; with
deletion vectors its MERGE writes the changed rows only, instead of rewriting each file whole.
That is only safe if the non-Spark readers (trainer, Feast export, refresh guards) honour the
vectors: deltalake's pyarrow scanner refuses such tables, ``models.lake_read`` does not.
"""
from __future__ import annotations

from datetime import datetime, timezone

import pytest
from delta.tables import DeltaTable as SparkDeltaTable
from deltalake.exceptions import DeltaProtocolError

import ctt_contracts as C
from models.lake_read import open_table, read_arrow, snapshot_arrow
from pipelines.delta_io import (KEYED_PROPERTIES, create_table, read_table, sync_table,
                                table_properties, table_version)

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


def _row(user: int, tag: str):  # one user_sequences row
    return (user, T0, [user, user + 1], [0, 1], tag)


def _frame(spark, rows):
    return spark.createDataFrame(rows, C.spark_schema(C.T_USER_SEQUENCES)).repartition(4)


def _last_metrics(spark, path: str) -> dict:
    return SparkDeltaTable.forPath(spark, path).history(1).first()["operationMetrics"]


def _sorted(table) -> list:
    return sorted(table.to_pylist(), key=lambda r: r[C.USER_ID])


def test_a_keyed_merge_writes_deletion_vectors_and_lake_read_applies_them(spark, tmp_path):
    path = str(tmp_path / C.T_USER_SEQUENCES)
    schema = C.spark_schema(C.T_USER_SEQUENCES)
    rows = [_row(u, "a") for u in range(200)]
    sync_table(spark, _frame(spark, rows), path, C.T_USER_SEQUENCES, schema, [C.USER_ID])
    assert table_properties(spark, path).items() >= KEYED_PROPERTIES.items()

    # one user per file changes, one vanishes: files keep their other rows, marked not rewritten
    new = [_row(u, "b") if u % 50 == 0 else r for u, r in enumerate(rows) if u != 7]
    result = sync_table(spark, _frame(spark, new), path, C.T_USER_SEQUENCES, schema, [C.USER_ID])
    assert (result.updated, result.deleted) == (4, 1)
    assert int(_last_metrics(spark, path)["numTargetDeletionVectorsAdded"]) > 0

    with pytest.raises(DeltaProtocolError, match="(?i)deletionvectors"):  # why lake_read exists
        open_table(path).to_pyarrow_table()
    got, version = read_arrow(path)
    assert version == table_version(spark, path)
    spark_rows = read_table(spark, path).toArrow()
    assert got.num_rows == 199 and _sorted(got) == _sorted(spark_rows)
    assert got.schema.field(C.SEQUENCE_HASH).type == "string"  # not DataFusion's string_view
    assert _sorted(read_arrow(path, [C.SEQUENCE_HASH, C.USER_ID])[0])[0] == {
        C.USER_ID: 0, C.SEQUENCE_HASH: "b"}


def test_lake_read_pins_the_version_and_refuses_unknown_or_no_columns(spark, tmp_path):
    path = str(tmp_path / "t")
    schema = C.spark_schema(C.T_USER_SEQUENCES)
    sync_table(spark, _frame(spark, [_row(1, "a")]), path, "t", schema, [C.USER_ID])
    first = table_version(spark, path)
    sync_table(spark, _frame(spark, [_row(1, "a"), _row(2, "a")]), path, "t", schema, [C.USER_ID])
    assert read_arrow(path, version=first)[0].num_rows == 1
    assert read_arrow(path)[0].num_rows == 2
    with pytest.raises(KeyError, match="no column"):
        snapshot_arrow(open_table(path), ["nope"])
    with pytest.raises(ValueError, match="no columns"):
        snapshot_arrow(open_table(path), [])


def test_a_table_of_an_older_release_gains_deletion_vectors_on_its_next_sync(spark, tmp_path):
    path = str(tmp_path / "t")
    schema = C.spark_schema(C.T_USER_SEQUENCES)
    create_table(spark, path, schema)  # as releases before deletion vectors created it
    assert not table_properties(spark, path).keys() & KEYED_PROPERTIES.keys()
    sync_table(spark, _frame(spark, [_row(1, "a")]), path, "t", schema, [C.USER_ID])
    assert table_properties(spark, path).items() >= KEYED_PROPERTIES.items()
