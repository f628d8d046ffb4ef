"""CI runs every proof: the slow tests too, and a test whose service is missing fails under
CI=true instead of passing green by skipping (the Redis outage test used to skip silently)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_missing_service_skips_locally_but_fails_under_ci(monkeypatch, require_service):
    missing = "ctt-no-such-service-binary"
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"{missing} is not installed"):
        require_service(missing, "a test double")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run this test, not skip it"):
        require_service(missing, "a test double")
    present = shutil.which("sh")
    assert require_service("sh", "always there") == present


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_ci_entry_point_runs_default_and_slow_tests_with_ci_set():
    run = (REPO / ".ci" / "run").read_text()
    assert 'export CI="${CI:-true}"' in run and "make test-all" in run
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    dry = subprocess.run(["make", "-n", "test-all"], cwd=REPO, env=env, capture_output=True,
                         text=True, check=True).stdout
    pytest_line = next(line for line in dry.splitlines() if "-m pytest" in line)
    assert '-m "slow or not slow"' in pytest_line  # overrides setup.cfg's -m "not slow"
    assert ".ci/services.sh" in dry
