"""Pipelines tests: the shared Spark session with Delta's local log-replay setting."""
from __future__ import annotations

import pytest

from pipelines.delta_io import SNAPSHOT_PARTITIONS_CONF, tune_local_delta


@pytest.fixture(autouse=True)
def _local_delta(request):
    """Spark-marked tests run with few Delta snapshot partitions (restored afterwards), the
    setting the jobs apply on local masters; pure tests do not start Spark."""
    if request.node.get_closest_marker("spark") is None:
        yield
        return
    spark = request.getfixturevalue("spark")
    before = spark.conf.get(SNAPSHOT_PARTITIONS_CONF, None)
    tune_local_delta(spark)
    yield
    if before is None:
        spark.conf.unset(SNAPSHOT_PARTITIONS_CONF)
    else:
        spark.conf.set(SNAPSHOT_PARTITIONS_CONF, before)
