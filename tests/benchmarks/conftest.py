"""Benchmark scripts import their siblings (benchmarks/ is first on sys.path when run as a
script); the tests import them the same way."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))


@pytest.fixture
def measurement(monkeypatch):
    """A started ``benchlib.Measurement`` whose CPU probe reads 0.5 s at once: the envelope's
    shape is under test, not the half second of loop the real probe spends each time."""
    import benchlib

    monkeypatch.setattr(benchlib, "cpu_probe_s", lambda: 0.5)
    return benchlib.Measurement("test")
