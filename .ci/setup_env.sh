#!/usr/bin/env bash
# Builds (once) the project's virtualenv and the Delta jars folder, both cached outside the clone.
#
# The virtualenv is keyed by the hash of requirements.lock: a clone with the same lock reuses it
# (torch from PyPI is ~2.6 GB with its CUDA wheels; nobody wants that download per CI run), a
# changed lock builds a new one from nothing. The project itself is installed editable into it on
# every run (seconds), so the venv always points at the current clone.
# Prints the venv path on its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${CTT_CACHE:-$HOME/.cache/ctt}
python=${PYTHON:-python3}
delta_version=$(sed -n 's/^DELTA_VERSION = "\([^"]*\)".*/\1/p' "$here/pipelines/spark.py")
key=$(cat "$here/requirements.lock" | sha256sum | cut -c1-16)
venv="$cache/venv-$key"
jars="${CTT_DELTA_JARS:-$cache/jars/delta-$delta_version}"

mkdir -p "$cache"
if [ ! -f "$venv/.complete" ]; then
  echo "[setup] building virtualenv $venv (first run on this machine: several minutes)" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip wheel setuptools >&2
  "$venv/bin/pip" install -q -r "$here/requirements.lock" >&2
  touch "$venv/.complete"
fi
"$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$here" >&2

if ! ls "$jars"/delta-spark_*.jar >/dev/null 2>&1; then
  echo "[setup] resolving Delta $delta_version jars from Maven Central into $jars" >&2
  mkdir -p "$jars"
  for artifact in "delta-spark_2.13" "delta-storage"; do
    mvn -q -U dependency:copy -Dartifact="io.delta:$artifact:$delta_version" \
      -DoutputDirectory="$jars" >&2
  done
fi

# Make plain `spark-submit` from the venv Delta-ready: the pip pyspark reads
# $SPARK_HOME/conf/spark-defaults.conf. Rewritten each run (the jars folder may have moved).
spark_home=$("$venv/bin/python" -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')
mkdir -p "$spark_home/conf"
{
  echo "spark.jars $(ls "$jars"/*.jar | paste -sd, -)"
  # The JVMs' collector (pipelines.spark.GC_JAVA_OPTIONS): spark-submit's driver JVM starts
  # before any job code, so it is set here.
  "$venv/bin/python" -c 'from pipelines.spark import spark_defaults_lines as l; print(*l(), sep="\n")'
  echo "spark.sql.extensions io.delta.sql.DeltaSparkSessionExtension"
  echo "spark.sql.catalog.spark_catalog org.apache.spark.sql.delta.catalog.DeltaCatalog"
  echo "spark.sql.session.timeZone UTC"
} > "$spark_home/conf/spark-defaults.conf"
# spark-submit's default log level is INFO: hundreds of start-up lines would bury the jobs' own
# output (validation counts, Delta versions). WARN keeps warnings and errors.
cat > "$spark_home/conf/log4j2.properties" <<'LOG4J'
rootLogger.level = warn
rootLogger.appenderRef.stdout.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n%ex
logger.jetty.name = org.sparkproject.jetty
logger.jetty.level = warn
LOG4J

ln -sfn "$venv" "$here/.venv"
echo "$venv"
