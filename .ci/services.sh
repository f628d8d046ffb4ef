#!/usr/bin/env bash
# Services the integration tests need beyond the Python venv; sourced or run by .ci/run before
# `make test`. Idempotent: installs only what is missing, starts nothing (tests start their own
# throwaway servers on 127.0.0.1 with ephemeral ports).
#
# redis-server: tests/reliability/test_reliability_online_store.py runs a real Redis to prove the
# resolver's behaviour when the online store dies and comes back (skipped, with that reason, when
# the binary is missing).
set -euo pipefail

if ! command -v redis-server >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends redis-server
    # The Debian package may start a system instance on 6379; the tests do not use it.
  else
    echo "services.sh: apt-get not found; install redis-server yourself or the Redis tests skip" >&2
  fi
fi
redis-server --version
