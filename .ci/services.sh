#!/usr/bin/env bash
# Services the integration tests need beyond the Python venv; run by `make services` (and so by
# `make test` and `.ci/run`). Idempotent: installs only what is missing, starts nothing (tests
# start their own throwaway servers on 127.0.0.1 with ephemeral ports).
#
# redis-server: tests/reliability/test_reliability_online_store.py and the Redis rollout guard
#   (tests/reliability/test_reliability_rollout.py) run a real Redis.
# wrk: HTTP load generator of the serving load tests.
# A test that needs one of them skips (saying what to install) on a developer machine, but FAILS
# under CI=true (tests/conftest.py: require_service), so CI cannot pass without running it.
set -euo pipefail

PACKAGES=(redis-server wrk)   # Debian package = binary name for both
missing=()
for p in "${PACKAGES[@]}"; do
  command -v "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
    # The Debian redis package may start a system instance on 6379; the tests do not use it.
  else
    echo "services.sh: apt-get not found; install ${missing[*]} yourself (tests that need them" \
         "skip locally and fail under CI=true)" >&2
    exit 1
  fi
fi
redis-server --version
command -v wrk
