"""Session settings a step changes for its own duration (pipelines.spark), on a real session."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.spark import (ADAPTIVE_CONF, DEFAULT_JAVA_OPTIONS_CONFS, GC_JAVA_OPTIONS,
                             ROWS_PER_SHUFFLE_PARTITION, SHUFFLE_PARTITIONS_CONF,
                             SMALL_INPUT_MAX_ROWS, session_settings, small_input_settings)

REPO = Path(__file__).resolve().parents[2]
# Prints the driver JVM's collectors and the session's default Java options (run by spark-submit).
_PROBE = """
import json
from pipelines.spark import get_spark
s = get_spark("gc-probe")
mx = s.sparkContext._jvm.java.lang.management.ManagementFactory
print("PROBE " + json.dumps({"gcs": [g.getName() for g in mx.getGarbageCollectorMXBeans()],
      "conf": {k: s.conf.get(k, None) for k in %r}}))
s.stop()
"""


def _jvm(spark):
    return spark.sparkContext._jvm.java.lang.management.ManagementFactory

UNSET_KEY = "spark.ctt.test.unset"


def test_small_input_turns_adaptive_execution_off_with_partitions_sized_to_the_rows():
    assert small_input_settings(10, 2) == {ADAPTIVE_CONF: "false", SHUFFLE_PARTITIONS_CONF: "2"}
    assert small_input_settings(0, 0)[SHUFFLE_PARTITIONS_CONF] == "1"
    assert small_input_settings(2 * ROWS_PER_SHUFFLE_PARTITION + 1, 2)[
        SHUFFLE_PARTITIONS_CONF] == "3"
    assert small_input_settings(SMALL_INPUT_MAX_ROWS, 64)[SHUFFLE_PARTITIONS_CONF] == "64"
    assert small_input_settings(SMALL_INPUT_MAX_ROWS, 2)[SHUFFLE_PARTITIONS_CONF] == str(
        SMALL_INPUT_MAX_ROWS // ROWS_PER_SHUFFLE_PARTITION)
    assert small_input_settings(SMALL_INPUT_MAX_ROWS + 1, 2) == {}


@pytest.mark.spark
def test_session_settings_are_restored_or_unset_after_the_block_even_when_it_raises(spark):
    before = spark.conf.get(SHUFFLE_PARTITIONS_CONF)
    assert spark.conf.get(UNSET_KEY, None) is None
    with pytest.raises(RuntimeError, match="boom"):
        with session_settings(spark, {SHUFFLE_PARTITIONS_CONF: "7", UNSET_KEY: "x"}):
            assert spark.conf.get(SHUFFLE_PARTITIONS_CONF) == "7"
            assert spark.conf.get(UNSET_KEY) == "x"
            assert spark.range(20).repartition(3).groupBy("id").count().rdd.getNumPartitions() == 7
            raise RuntimeError("boom")
    assert spark.conf.get(SHUFFLE_PARTITIONS_CONF) == before
    assert spark.conf.get(UNSET_KEY, None) is None
    with session_settings(spark, {}):
        assert spark.conf.get(SHUFFLE_PARTITIONS_CONF) == before


@pytest.mark.spark
def test_sessions_run_the_parallel_collector_and_keep_their_own_java_options(spark):
    """The suite's session passes its own -D option in extraJavaOptions: both apply."""
    args = list(_jvm(spark).getRuntimeMXBean().getInputArguments())
    assert GC_JAVA_OPTIONS in args
    assert any(a.startswith("-Ddelta.log.cacheSize=") for a in args)
    assert {g.getName() for g in _jvm(spark).getGarbageCollectorMXBeans()} == {
        "PS Scavenge", "PS MarkSweep"}


@pytest.mark.slow
def test_a_launchers_default_java_options_win(tmp_path):
    """spark-submit with its own default Java options (an administrator's collector): the
    driver runs that collector and the session does not overwrite the executors' setting."""
    script = tmp_path / "probe.py"
    script.write_text(_PROBE % (DEFAULT_JAVA_OPTIONS_CONFS,))
    serial = "-XX:+UseSerialGC"
    env = dict(os.environ, PYTHONPATH=str(REPO), PYSPARK_PYTHON=sys.executable,
               SPARK_LOCAL_IP="127.0.0.1")
    argv = [str(Path(sys.executable).parent / "spark-submit"), "--master", "local[1]"]
    for key in DEFAULT_JAVA_OPTIONS_CONFS:
        argv += ["--conf", f"{key}={serial}"]
    done = subprocess.run(argv + [str(script)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    probe = json.loads(next(line for line in done.stdout.splitlines()
                            if line.startswith("PROBE "))[len("PROBE "):])
    assert set(probe["gcs"]) == {"Copy", "MarkSweepCompact"}
    assert probe["conf"] == {key: serial for key in DEFAULT_JAVA_OPTIONS_CONFS}
