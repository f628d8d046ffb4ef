"""Shared fixtures: one real local SparkSession with Delta for the whole run."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def spark():
    """A real local[2] SparkSession with Delta, bound to loopback, few shuffle partitions."""
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pipelines.spark import get_spark

    session = get_spark("ctt-tests", master="local[2]", shuffle_partitions=4,
                        extra_conf={"spark.sql.adaptive.enabled": "false"})
    yield session
    session.stop()


@pytest.fixture(scope="session")
def tiny_demo_run(tmp_path_factory):
    """A tiny `make demo` output (tests/tiny_demo.py), built once for the report and notebook
    tests; treat it as read-only."""
    from tiny_demo import build_tiny_demo

    return build_tiny_demo(tmp_path_factory.mktemp("demo_run"))
