# The two commands of the README: `make demo` (set-up + the whole system end to end) and
# `make test` (set-up + the test suite). Everything else is a step you can run alone.
SHELL := /bin/bash
VENV = $(shell readlink -f .venv)
PY = .venv/bin/python
export CTT_DELTA_JARS ?= $(HOME)/.cache/ctt/jars/delta-$(shell sed -n 's/^DELTA_VERSION = "\([^"]*\)".*/\1/p' pipelines/spark.py)
# Spark executors must run the venv's python (it has pandas/torch) and stay on loopback locally.
export PYSPARK_PYTHON = $(CURDIR)/.venv/bin/python
export PYSPARK_DRIVER_PYTHON = $(CURDIR)/.venv/bin/python
export SPARK_LOCAL_IP ?= 127.0.0.1
export PATH := $(CURDIR)/.venv/bin:$(PATH)
# The cached venv is shared by clones; this clone's code must win over its editable install.
export PYTHONPATH := $(CURDIR)
DEMO_DIR ?= demo_run

.PHONY: setup services test test-slow test-all demo clean

setup:
	@.ci/setup_env.sh >/dev/null

# redis-server and wrk for the integration tests (Debian packages). Without them those tests
# skip on a developer machine and FAIL under CI=true (tests/conftest.py: require_service).
services:
	@.ci/services.sh >/dev/null || echo "warning: .ci/services.sh failed; tests that need redis-server / wrk skip (fail under CI=true)" >&2

# The quick default run for developers (setup.cfg deselects the slow tests).
test: setup services
	$(PY) -m pytest -q

test-slow: setup services
	$(PY) -m pytest -q -m "slow"

# Every test, the slow ones included, in one session: what CI runs (.ci/run).
test-all: setup services
	$(PY) -m pytest -q -m "slow or not slow" --durations=25

demo: setup
	$(PY) jobs/demo.py --out $(DEMO_DIR)

# One benchmark script each: `make bench-NAME` runs benchmarks/$(BENCH_NAME).py. The calibration
# puts the realistic synthetic world's statistics beside the REES46 head's (and MovieLens's for
# long-term interests) -> benchmarks/results/calibration.json; pandas only, ~1 min.
BENCH_sequences = build_sequences
BENCH_training = training
BENCH_serving = serving_latency
BENCH_quality = quality
BENCH_movielens = movielens
BENCH_calibration = calibrate_synthetic
BENCHMARKS = $(addprefix bench-,sequences training serving quality movielens calibration)

.PHONY: $(BENCHMARKS)
$(BENCHMARKS): bench-%: setup
	$(PY) benchmarks/$(BENCH_$*).py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache build *.egg-info
