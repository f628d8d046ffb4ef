"""The one SparkSession builder of the project, with Delta Lake configured.

Why a single builder: every job must behave the same under `python jobs/x.py` (local[*]),
`spark-submit jobs/x.py` (whatever --master the user passes) and the test suite. The builder
therefore never overrides a master that spark-submit already set, binds the driver to loopback
only when it runs the default local master, and finds the Delta jars in one of two ways:

1. a local folder of jars resolved by `make setup` with Maven (`CTT_DELTA_JARS`, default
   ``~/.cache/ctt/jars/delta-<version>``), passed as ``spark.jars`` so Spark ships them to
   executors on any cluster; or
2. Ivy coordinates in ``spark.jars.packages`` when no such folder exists.

The JVMs run the parallel garbage collector (GC_JAVA_OPTIONS) through Spark's *default* Java
options: `make setup` writes them into the venv's spark-defaults.conf (which `spark-submit` and
PySpark's own launcher read before the driver JVM exists); the builder adds them only where
neither that file, the launcher nor the job chose (``jvm_default_options``).
"""
from __future__ import annotations

import glob
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional

DELTA_VERSION = "4.4.0"  # newest Delta jars on Maven Central built for Spark 4.2
SCALA_BINARY = "2.13"
DELTA_PACKAGES = (
    f"io.delta:delta-spark_{SCALA_BINARY}:{DELTA_VERSION},io.delta:delta-storage:{DELTA_VERSION}"
)
DEFAULT_MASTER = "local[*]"
DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"
DEFAULT_PROPERTY_CONF = "spark.databricks.delta.properties.defaults."  # + property without "delta."
ICT_PROPERTY = "delta.enableInCommitTimestamps"
ADAPTIVE_CONF = "spark.sql.adaptive.enabled"
SHUFFLE_PARTITIONS_CONF = "spark.sql.shuffle.partitions"
# The JVMs' garbage collector: HotSpot's parallel (throughput) collector instead of G1, since a
# batch job wants throughput, not short pauses (measured on the sequence build: README,
# "Sequence build"). Set through the *default* Java options, which Spark puts before
# `spark.{driver,executor}.extraJavaOptions` (see `jvm_default_options` for who wins).
GC_JAVA_OPTIONS = "-XX:+UseParallelGC"
ROLES = ("driver", "executor")
# A collector choice in a JVM option string (a second one makes the JVM refuse to start).
_GC_FLAG = re.compile(r"-XX:[+-]Use(?:Serial|Parallel|ParallelOld|G1|Z|Shenandoah|Epsilon|"
                      r"ConcMarkSweep)GC\b")
# Option strings every JVM started here reads from its environment (executors of a local-cluster
# master inherit it), and the one spark-submit's launcher adds to the driver's command line.
JVM_OPTION_ENV_VARS = ("JAVA_TOOL_OPTIONS", "JDK_JAVA_OPTIONS", "_JAVA_OPTIONS")
LAUNCHER_OPTION_ENV_VAR = "SPARK_SUBMIT_OPTS"
SPARK_DEFAULTS_FILE = "spark-defaults.conf"
_PROPERTY_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}
# key (up to the first unescaped blank, = or :), separator, value of a logical properties line
_PROPERTY_LINE = re.compile(r"((?:[^\\\s=:]|\\.)*)[ \t\f]*[=:]?[ \t\f]*(.*)$", re.S)

# small_input_settings: the largest input it applies to, and the rows per shuffle partition
# it sizes the partition count by (a sort or join of 1M event rows fits a task's memory).
SMALL_INPUT_MAX_ROWS = 8_000_000
ROWS_PER_SHUFFLE_PARTITION = 1_000_000


def default_java_options_key(role: str) -> str:
    return f"spark.{role}.defaultJavaOptions"


def extra_java_options_key(role: str) -> str:
    return f"spark.{role}.extraJavaOptions"


def delta_jars_dir() -> Path:
    """Folder holding the Delta jars that `make setup` resolved with Maven."""
    default = Path.home() / ".cache" / "ctt" / "jars" / f"delta-{DELTA_VERSION}"
    return Path(os.environ.get("CTT_DELTA_JARS", str(default)))


def delta_jar_conf() -> Dict[str, str]:
    """`spark.jars` from the local folder when it holds the jars, else Ivy `spark.jars.packages`."""
    jars = sorted(glob.glob(str(delta_jars_dir() / "*.jar")))
    if any("delta-spark" in Path(j).name for j in jars):
        return {"spark.jars": ",".join(jars)}
    return {"spark.jars.packages": DELTA_PACKAGES}


def session_conf(app_name: str, shuffle_partitions: Optional[int] = None) -> Dict[str, str]:
    """All settings the builder applies (pure, so tests can check them without a JVM)."""
    conf = {
        "spark.app.name": app_name,
        "spark.sql.extensions": DELTA_EXTENSION,
        "spark.sql.catalog.spark_catalog": DELTA_CATALOG,
        # Timestamps are stored and compared in UTC whatever the machine's zone is.
        "spark.sql.session.timeZone": "UTC",
        # Arrow makes mapInPandas / toPandas cheap; batch inference depends on it.
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.databricks.delta.schema.autoMerge.enabled": "false",
        # Every table this session creates keeps its commit times in its log (in-commit
        # timestamps), not in the log files' modification times: a lake copied or restored
        # without them (cp -r, an object-store copy) keeps the commit times the incremental
        # build recorded (pipelines/build_progress.py) and is not rebuilt in full.
        DEFAULT_PROPERTY_CONF + ICT_PROPERTY.removeprefix("delta."): "true",
        "spark.ui.showConsoleProgress": "false",
    }
    if shuffle_partitions is not None:
        conf[SHUFFLE_PARTITIONS_CONF] = str(shuffle_partitions)
    conf.update(delta_jar_conf())
    return conf


def jvm_default_options(launcher: Dict[str, str], requested: Dict[str, str],
                        env_options: Dict[str, str], driver_running: bool) -> Dict[str, str]:
    """The `spark.<role>.defaultJavaOptions` the builder sets (pure): GC_JAVA_OPTIONS where
    nobody chose, and never a second collector.

    - A launcher's default options (spark-submit's conf, or the spark-defaults.conf PySpark's
      launcher will read: `make setup`'s or an administrator's) win; an empty value counts.
    - A role whose own extra options (`requested` = the job's extra_conf, else the launcher's)
      or environment options (`env_options` per role) name a collector gets none from the
      defaults: the launcher's defaults minus their collector flag, or nothing.
    - The driver's key is left alone once its JVM runs (under spark-submit): too late to apply,
      and the session's conf would then report a collector the driver does not run.
    """
    out: Dict[str, str] = {}
    for role in ROLES:
        key = default_java_options_key(role)
        if key in requested or (role == "driver" and driver_running):
            continue
        extra = requested.get(extra_java_options_key(role),
                              launcher.get(extra_java_options_key(role), ""))
        own_collector = _GC_FLAG.search(f"{extra} {env_options.get(role, '')}")
        base = launcher.get(key)
        if base is None:
            if not own_collector:
                out[key] = GC_JAVA_OPTIONS
        elif own_collector and _GC_FLAG.search(base):
            out[key] = " ".join(_GC_FLAG.sub("", base).split())
    return out


def spark_defaults_lines() -> List[str]:
    """The spark-defaults.conf lines `make setup` writes for the collector (see the module doc)."""
    return [f"{default_java_options_key(role)} {GC_JAVA_OPTIONS}" for role in ROLES]


def env_java_options(environ: Mapping[str, str]) -> Dict[str, str]:
    """Per role, the JVM options the environment adds (for `jvm_default_options`)."""
    jvm = " ".join(environ.get(v, "") for v in JVM_OPTION_ENV_VARS)
    return {"driver": f"{jvm} {environ.get(LAUNCHER_OPTION_ENV_VAR, '')}", "executor": jvm}


def _unescape_property(text: str) -> str:
    return re.sub(r"\\u([0-9a-fA-F]{4})|\\(.)",
                  lambda m: chr(int(m.group(1), 16)) if m.group(1)
                  else _PROPERTY_ESCAPES.get(m.group(2), m.group(2)), text)


def _logical_lines(text: str) -> Iterator[str]:
    """Lines of a properties text with comments and blank lines dropped and continuations joined
    (a line ending in an odd number of backslashes goes on, minus the next line's leading blanks)."""
    pending = None
    for raw in text.splitlines():
        line = raw.lstrip(" \t\f")
        if pending is None and (not line or line[0] in "#!"):
            continue
        line = line if pending is None else pending + line
        if (len(line) - len(line.rstrip("\\"))) % 2:
            pending = line[:-1]
            continue
        pending = None
        yield line
    if pending is not None:
        yield pending


def parse_properties(text: str) -> Dict[str, str]:
    """A Java properties text as Spark loads spark-defaults.conf (``java.util.Properties``):
    `#`/`!` comments, continuation lines, the key ends at the first unescaped blank, `=` or `:`,
    escapes (``\\t``, ``\\uXXXX``, ``\\=``, ...) are undone."""
    out: Dict[str, str] = {}
    for line in _logical_lines(text):
        key, value = _PROPERTY_LINE.match(line).groups()
        out[_unescape_property(key)] = _unescape_property(value)
    return out


def spark_defaults_file() -> Dict[str, str]:
    """The spark-defaults.conf PySpark's launcher will read ($SPARK_CONF_DIR, else the conf folder
    of the Spark home PySpark finds) as a dict; {} when there is none. Options passed in
    PYSPARK_SUBMIT_ARGS (e.g. ``--properties-file``) are not looked at."""
    from pyspark.find_spark_home import _find_spark_home

    conf_dir = os.environ.get("SPARK_CONF_DIR") or os.path.join(_find_spark_home(), "conf")
    path = Path(conf_dir) / SPARK_DEFAULTS_FILE
    return parse_properties(path.read_text(encoding="utf-8")) if path.is_file() else {}


def get_spark(app_name: str = "ctt", master: Optional[str] = None,
              shuffle_partitions: Optional[int] = None,
              extra_conf: Optional[Dict[str, str]] = None):  # -> SparkSession
    """Build (or reuse) the SparkSession.

    `master` wins if given; otherwise a master set by spark-submit (`spark.master` in the
    launcher's conf) is kept; otherwise `local[*]`. Only in local mode is the driver bound to
    127.0.0.1, so that on a cluster executors can still reach it. The JVMs get the parallel
    collector unless the launcher or the job chose one (`jvm_default_options`).
    """
    from pyspark import SparkConf, SparkContext
    from pyspark.sql import SparkSession

    if "PYSPARK_GATEWAY_PORT" in os.environ:
        # Under spark-submit the JVM already runs; connect to it so SparkConf sees --master etc.
        SparkContext._ensure_initialized()
    running = SparkContext._gateway is not None  # the driver JVM is up (spark-submit, or earlier)
    launched = SparkConf()  # holds spark-submit's settings when run under it
    chosen = master or launched.get("spark.master", None) or os.environ.get("CTT_SPARK_MASTER")
    chosen = chosen or DEFAULT_MASTER
    builder = SparkSession.builder.master(chosen)
    conf = session_conf(app_name, shuffle_partitions)
    if chosen.startswith("local"):
        conf.setdefault("spark.driver.host", "127.0.0.1")
        conf.setdefault("spark.driver.bindAddress", "127.0.0.1")
    launcher = dict(launched.getAll()) if running else spark_defaults_file()
    conf.update(jvm_default_options(launcher, extra_conf or {}, env_java_options(os.environ),
                                    running))
    for key, value in {**conf, **(extra_conf or {})}.items():
        if key in ("spark.jars", "spark.jars.packages") and launched.get(key, None):
            continue  # spark-submit already shipped jars (--jars / --packages / defaults)
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("CTT_SPARK_LOG_LEVEL", "WARN"))
    return spark


def small_input_settings(n_rows: int, parallelism: int) -> Dict[str, str]:
    """Session settings for a step whose shuffles carry about `n_rows` rows: none above
    SMALL_INPUT_MAX_ROWS; below it, adaptive query execution off and the shuffle partitions
    sized to the data: one per ROWS_PER_SHUFFLE_PARTITION rows, at least one per core
    (`parallelism`).

    Why: adaptive execution runs every exchange of a query as a Spark job of its own and
    plans again after each, and on small data that fixed cost is most of the cost. On the
    1M-user benchmark lake (2 cores) an incremental build's recomputation of the touched
    users' sequences, context rows and user_sequences ran 97 Spark jobs in 51 s with it and
    46 in 40 s without for a day of 16,927 events, and 80 in 41 s against 44 in 29 s for
    169,349 events (2.7M rows with the users' earlier events, 3 partitions). Its partition
    coalescing is what makes Spark's default of 200 shuffle partitions cheap on small data,
    so the partition count is set with it.
    """
    if n_rows > SMALL_INPUT_MAX_ROWS:
        return {}
    partitions = max(1, parallelism, -(-n_rows // ROWS_PER_SHUFFLE_PARTITION))
    return {ADAPTIVE_CONF: "false", SHUFFLE_PARTITIONS_CONF: str(partitions)}


@contextmanager
def session_settings(spark, settings: Dict[str, str]) -> Iterator[None]:
    """`settings` on the session's runtime conf while the block runs; afterwards each key is
    back to its previous value (or unset if it had none), also when the block raises."""
    before = {k: spark.conf.get(k, None) for k in settings}
    for key, value in settings.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)
