"""Shared fixtures: one real local SparkSession with Delta for the whole run, and the rule for
tests that need a service binary (redis-server, wrk)."""
from __future__ import annotations

import os
import shutil
from typing import Callable

import pytest

ENV_CI = "CI"


def in_ci() -> bool:
    return os.environ.get(ENV_CI, "").strip().lower() in ("1", "true", "yes")


def _require_service(binary: str, why: str) -> str:
    """Path of a service binary a test needs. Missing: skipped on a developer machine (saying
    what to install), but FAILED when CI=true: a CI run that cannot install a service must go
    red, not pass green without the tests that need it (.ci/services.sh installs them)."""
    path = shutil.which(binary)
    if path:
        return path
    message = f"{binary} is not installed ({why}); .ci/services.sh installs it"
    if in_ci():
        pytest.fail(f"{ENV_CI}=true and {message}: CI must run this test, not skip it",
                    pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def require_service() -> Callable[[str, str], str]:
    """``require_service("redis-server", "the Redis outage test")`` -> the binary's path."""
    return _require_service


# Delta logs (one per table path) the test JVM keeps cached; a test touches at most a lake's dozen.
DELTA_LOG_CACHE = 32


@pytest.fixture(scope="session")
def spark():
    """A real local[2] SparkSession with Delta, bound to loopback, few shuffle partitions.

    One JVM serves the whole suite, which creates thousands of small Delta tables, where each
    production job has a session of its own. Delta keeps every table's log and cached snapshot
    in the driver (up to 10,000 by default), so the suite bounds that cache as Delta's own test
    set-up does, and gives the driver a heap sized for a long-lived session rather than the 1 GB
    default a single job fits in.
    """
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pipelines.spark import get_spark

    session = get_spark("ctt-tests", master="local[2]", shuffle_partitions=4,
                        extra_conf={"spark.sql.adaptive.enabled": "false",
                                    "spark.driver.memory": "2g",
                                    "spark.driver.extraJavaOptions":
                                        f"-Ddelta.log.cacheSize={DELTA_LOG_CACHE}",
                                    "spark.databricks.delta.delta.log.cacheSize":
                                        str(DELTA_LOG_CACHE)})
    yield session
    session.stop()


@pytest.fixture(scope="session")
def tiny_demo_run(tmp_path_factory):
    """A tiny `make demo` output (tests/tiny_demo.py), built once for the report and notebook
    tests; treat it as read-only."""
    from tiny_demo import build_tiny_demo

    return build_tiny_demo(tmp_path_factory.mktemp("demo_run"))
