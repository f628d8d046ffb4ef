"""Session settings a step changes for its own duration, and the JVMs' collector
(pipelines.spark)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.spark import (ADAPTIVE_CONF, GC_JAVA_OPTIONS, ROLES, ROWS_PER_SHUFFLE_PARTITION,
                             SHUFFLE_PARTITIONS_CONF, SMALL_INPUT_MAX_ROWS, SPARK_DEFAULTS_FILE,
                             default_java_options_key, env_java_options,
                             extra_java_options_key, jvm_default_options, parse_properties,
                             session_settings, small_input_settings, spark_defaults_file,
                             spark_defaults_lines)

REPO = Path(__file__).resolve().parents[2]
DRIVER_KEY, EXECUTOR_KEY = (default_java_options_key(r) for r in ROLES)
PARALLEL_GCS = {"PS Scavenge", "PS MarkSweep"}
SERIAL_GCS = {"Copy", "MarkSweepCompact"}
SERIAL = "-XX:+UseSerialGC"
# The driver's collectors and the session's default Java options. argv[1]: the session's extra
# conf as JSON.
_PROBE = """
import json, sys
from pipelines.spark import get_spark
s = get_spark("gc-probe", extra_conf=json.loads(sys.argv[1]))
mx = s.sparkContext._jvm.java.lang.management.ManagementFactory
print("PROBE " + json.dumps({"gcs": [g.getName() for g in mx.getGarbageCollectorMXBeans()],
      "conf": {k: s.conf.get(k, None) for k in %r}}))
s.stop()
"""


def _management(spark):
    """The driver JVM's java.lang.management.ManagementFactory."""
    return spark.sparkContext._jvm.java.lang.management.ManagementFactory


def _collectors(spark) -> set:
    return {g.getName() for g in _management(spark).getGarbageCollectorMXBeans()}


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


def test_jvm_defaults_where_nobody_chose_and_never_a_second_collector():
    both = {DRIVER_KEY: GC_JAVA_OPTIONS, EXECUTOR_KEY: GC_JAVA_OPTIONS}
    assert jvm_default_options({}, {}, {}, driver_running=False) == both
    # under spark-submit the driver runs already: only the executors' default is still open
    assert jvm_default_options({}, {}, {}, driver_running=True) == {EXECUTOR_KEY: GC_JAVA_OPTIONS}
    # a launcher's defaults win, an empty one too
    assert jvm_default_options({DRIVER_KEY: SERIAL, EXECUTOR_KEY: ""}, {}, {}, False) == {}
    # the job's own default options are its choice
    assert jvm_default_options({}, {DRIVER_KEY: "-Dx=1"}, {}, False) == {
        EXECUTOR_KEY: GC_JAVA_OPTIONS}
    # a collector in a role's extra options (the job's, else the launcher's) or environment: no
    # collector from the defaults, the launcher's other default options kept
    g1 = "-XX:+UseG1GC"
    assert jvm_default_options({}, {extra_java_options_key("executor"): g1}, {}, False) == {
        DRIVER_KEY: GC_JAVA_OPTIONS}
    assert jvm_default_options({extra_java_options_key("driver"): g1}, {}, {}, False) == {
        EXECUTOR_KEY: GC_JAVA_OPTIONS}
    assert jvm_default_options({}, {}, {"driver": f"-Xss4m {g1}"}, False) == {
        EXECUTOR_KEY: GC_JAVA_OPTIONS}
    launcher = {DRIVER_KEY: f"{GC_JAVA_OPTIONS} -Dadmin=1", EXECUTOR_KEY: GC_JAVA_OPTIONS}
    assert jvm_default_options(launcher, {extra_java_options_key("driver"): g1,
                                          extra_java_options_key("executor"): g1}, {}, False) == {
        DRIVER_KEY: "-Dadmin=1", EXECUTOR_KEY: ""}
    # the job's extra options replace the launcher's, collector and all
    assert jvm_default_options({extra_java_options_key("driver"): g1},
                               {extra_java_options_key("driver"): "-Dx=1"}, {}, False) == both
    # collector tuning flags are not a collector choice
    tuning = "-XX:+UseAdaptiveSizePolicyWithSystemGC -XX:+UseMaximumCompactionOnSystemGC"
    assert jvm_default_options({}, {extra_java_options_key("driver"): tuning}, {}, False) == both


def test_environment_options_reach_every_jvm_and_the_launchers_only_the_driver():
    env = {"JAVA_TOOL_OPTIONS": "-Da=1", "_JAVA_OPTIONS": "-XX:+UseG1GC",
           "SPARK_SUBMIT_OPTS": "-Db=2", "JDK_JAVA_OPTIONS": "-Dc=3"}
    got = env_java_options(env)
    assert set(got["driver"].split()) == {"-Da=1", "-XX:+UseG1GC", "-Db=2", "-Dc=3"}
    assert set(got["executor"].split()) == {"-Da=1", "-XX:+UseG1GC", "-Dc=3"}
    assert jvm_default_options({}, {}, got, False) == {}


def test_properties_are_read_as_java_reads_them():
    text = ("# comment\n! comment\n\n   spark.a  x y\nspark.b=1\nspark.c : two words\n"
            "spark.d\n=v\nspark.e -Dfoo=1 \\\n    -XX:+UseG1GC\nspark.x\\ y 1\n"
            "spark.u \\u0041\\t\\\\\nspark.f a\\\\\\\n  b\n")
    assert parse_properties(text) == {
        "spark.a": "x y", "spark.b": "1", "spark.c": "two words", "spark.d": "", "": "v",
        "spark.e": "-Dfoo=1 -XX:+UseG1GC", "spark.x y": "1", "spark.u": "A\t\\",
        "spark.f": "a\\b"}


def test_spark_defaults_file_is_read_where_the_launcher_reads_it(tmp_path, monkeypatch):
    home, conf_dir = tmp_path / "home", tmp_path / "conf_dir"
    (home / "conf").mkdir(parents=True)
    conf_dir.mkdir()
    (home / "conf" / SPARK_DEFAULTS_FILE).write_text("spark.home 1\n", encoding="utf-8")
    monkeypatch.setenv("SPARK_HOME", str(home))
    monkeypatch.delenv("SPARK_CONF_DIR", raising=False)
    assert spark_defaults_file() == {"spark.home": "1"}
    monkeypatch.setenv("SPARK_CONF_DIR", str(conf_dir))  # wins over $SPARK_HOME/conf
    assert spark_defaults_file() == {}
    (conf_dir / SPARK_DEFAULTS_FILE).write_text("spark.conf.dir é\n", encoding="utf-8")
    assert spark_defaults_file() == {"spark.conf.dir": "é"}


@pytest.mark.spark
def test_sessions_run_the_parallel_collector_and_keep_their_own_java_options(spark):
    """The suite's session passes its own -D option in extraJavaOptions: both apply."""
    args = list(_management(spark).getRuntimeMXBean().getInputArguments())
    assert set(GC_JAVA_OPTIONS.split()) <= set(args)
    extra = spark.conf.get(extra_java_options_key("driver"))
    assert extra and set(extra.split()) <= set(args)
    assert _collectors(spark) == PARALLEL_GCS
    assert spark.conf.get(DRIVER_KEY) == spark.conf.get(EXECUTOR_KEY) == GC_JAVA_OPTIONS


def _probe(tmp_path: Path, extra_conf: dict, conf_lines, submit: bool = False) -> dict:
    """Run _PROBE by `python` (PySpark launches the driver) or by spark-submit, with a conf
    folder holding `conf_lines` as its spark-defaults.conf."""
    conf_dir = tmp_path / f"conf_{len(list(tmp_path.iterdir()))}"
    conf_dir.mkdir()
    (conf_dir / SPARK_DEFAULTS_FILE).write_text("".join(f"{x}\n" for x in conf_lines))
    script = tmp_path / "probe.py"
    script.write_text(_PROBE % ((DRIVER_KEY, EXECUTOR_KEY),))
    env = dict(os.environ, PYTHONPATH=str(REPO), PYSPARK_PYTHON=sys.executable,
               SPARK_LOCAL_IP="127.0.0.1", SPARK_CONF_DIR=str(conf_dir))
    launch = ([str(Path(sys.executable).parent / "spark-submit"), "--master", "local[1]"]
              if submit else [sys.executable])
    done = subprocess.run(launch + [str(script), json.dumps(extra_conf)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    line = next((x for x in done.stdout.splitlines() if x.startswith("PROBE ")), None)
    assert done.returncode == 0 and line, (done.stdout[-2000:], done.stderr[-3000:])
    return json.loads(line[len("PROBE "):])


@pytest.mark.slow
def test_who_chooses_the_collector_end_to_end(tmp_path):
    """Real driver JVMs: (1) `make setup`'s spark-defaults, a job naming its own collector -> it
    runs that one (no second collector: the JVM starts); (2) an administrator's spark-defaults
    choosing the serial collector -> the driver runs it, the session keeps the file's choice;
    (3) no defaults, the job's own collector -> it runs; (4) spark-submit without defaults ->
    the driver runs the JVM's default (G1: too late to change), the executors' key is set."""
    own = {extra_java_options_key("driver"): SERIAL}
    probe = _probe(tmp_path, own, spark_defaults_lines())
    assert set(probe["gcs"]) == SERIAL_GCS
    assert probe["conf"] == {DRIVER_KEY: "", EXECUTOR_KEY: GC_JAVA_OPTIONS}

    probe = _probe(tmp_path, {}, [f"{DRIVER_KEY} {SERIAL}", f"{EXECUTOR_KEY}={SERIAL}"])
    assert set(probe["gcs"]) == SERIAL_GCS
    assert probe["conf"] == {DRIVER_KEY: SERIAL, EXECUTOR_KEY: SERIAL}

    probe = _probe(tmp_path, own, [])
    assert set(probe["gcs"]) == SERIAL_GCS
    assert probe["conf"] == {DRIVER_KEY: None, EXECUTOR_KEY: GC_JAVA_OPTIONS}

    probe = _probe(tmp_path, {}, [], submit=True)
    assert "G1 Young Generation" in probe["gcs"]
    assert probe["conf"] == {DRIVER_KEY: None, EXECUTOR_KEY: GC_JAVA_OPTIONS}
