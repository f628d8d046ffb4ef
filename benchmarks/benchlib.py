"""What the plain-script benchmarks share: the machine record and the run -> table -> JSON report.

Imported by sibling scripts run as ``python benchmarks/NAME.py`` (their folder is first on
sys.path). Every results JSON is one envelope (``Measurement.envelope``, keys ``ENVELOPE_KEYS``):
the machine, the load and the CPU speed around the run, the ``bars`` and the script's own
``result``, so that the README's renderer and the tests read every file the same way.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from ctt_contracts.files import atomic_write


REPO = Path(__file__).resolve().parents[1]


def synthetic_lake_writer():
    """``write_lake, FixtureSpec`` of the test suite's pandas lake writer (tests/synthetic_lake.py):
    a seeded lake with the planted structure in seconds, without Spark. It lives with the tests
    (it is not part of the product); the benchmarks that train a small model reuse it."""
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.append(tests)
    from synthetic_lake import FixtureSpec, write_lake

    return write_lake, FixtureSpec


def package_version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "n/a"


def machine(packages: Sequence[str]) -> Dict[str, Any]:
    """CPU model, cores, platform, Python and the versions of ``packages``."""
    cpu = "unknown"
    if Path("/proc/cpuinfo").exists():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(),
            "packages": {p: package_version(p) for p in packages}}


def load_avg() -> List[float]:
    """The 1, 5 and 15-minute load averages, rounded: recorded before and after every run."""
    return [round(x, 2) for x in os.getloadavg()]


PROBE_ADDS = 10_000_000  # integer additions timed by cpu_probe_s


def cpu_probe_s() -> float:
    """Seconds one core takes for PROBE_ADDS additions in a Python loop, recorded before and
    after every run. Why: this machine is a shared VM whose speed varies from day to day (other
    tenants' steal, which the load average does not show); the same code and data took twice as
    long on one day as on another, so a run's figures are only comparable with a run of a
    similar probe (0.44-0.49 s in the project's virtualenv on a quiet day, 2026-12-04)."""
    import time

    t0, total = time.perf_counter(), 0
    for i in range(PROBE_ADDS):
        total += i
    return round(time.perf_counter() - t0, 3)


def cpu_times() -> Dict[str, int]:
    """The machine's cumulative CPU ticks from /proc/stat (empty elsewhere): ``steal_pct``
    compares two readings."""
    stat = Path("/proc/stat")
    if not stat.exists():
        return {}
    fields = stat.read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
    return {"total": sum(ticks), "steal": ticks[7] if len(ticks) > 7 else 0}


def steal_pct(before: Dict[str, int], after: Dict[str, int]) -> Optional[float]:
    """Share of CPU time the hypervisor gave to other guests between two ``cpu_times``."""
    if not before or not after or after["total"] <= before["total"]:
        return None
    return round(100.0 * (after["steal"] - before["steal"]) / (after["total"] - before["total"]), 1)


PERCENTILES = (50, 90, 99, 99.9)


def percentile_key(p: float) -> str:
    """``p50``, ``p999`` for 99.9: one spelling in every results JSON, whether the percentile
    was computed here or by a load generator (load_test's wrk)."""
    return f"p{p:g}".replace(".", "")


def percentiles(samples_ms: Sequence[float]) -> Dict[str, float]:
    """p50 / p90 / p99 / p99.9 / mean / n of latency samples (ms), the one summary every
    latency benchmark writes."""
    import numpy as np

    a = np.asarray(samples_ms, dtype=float)
    out = {percentile_key(p): round(float(np.percentile(a, p)), 4) for p in PERCENTILES}
    return {**out, "mean": round(float(a.mean()), 4), "n": int(a.size)}


def bar(name: str, value: Optional[float], target: float, at_most: bool = False,
        note: Optional[str] = None) -> Dict[str, Any]:
    """One entry of a results JSON's ``bars`` list; ``met`` is None while ``value`` is."""
    met = None if value is None else (value <= target if at_most else value >= target)
    out: Dict[str, Any] = {"name": name, "value": value, "target": target, "met": met}
    if note:
        out["note"] = note
    return out


def args_record(args: argparse.Namespace) -> Dict[str, Any]:
    """The parsed flags as JSON values (paths as text): the run's provenance in its result."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def print_bars(bars: Sequence[Dict[str, Any]]) -> None:
    """One line per bar after a run's table, so a run says at once which targets it met."""
    verdict = {True: "met", False: "NOT met", None: "not measured by this run"}
    for b in bars:
        print(f"bar {b['name']}: {b['value']} (target {b['target']}) {verdict[b['met']]}")


def write_json(path: Path, report: Dict[str, Any],
               default: Optional[Callable[[Any], Any]] = None) -> None:
    """Whole or not at all (``ctt_contracts.files.atomic_write``): a killed benchmark never
    leaves half a results file behind."""
    text = json.dumps(report, indent=2, default=default)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def stop_process(proc: subprocess.Popen, log: Any = None, timeout: float = 60) -> None:
    """SIGTERM (a server's graceful shutdown), then SIGKILL after ``timeout`` s; close its log."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if log is not None:
        log.close()


def quick_out(out: Path) -> Path:
    """Where a ``--quick`` run writes by default: beside nothing that is committed."""
    return Path(tempfile.gettempdir()) / f"ctt-{out.stem}-quick.json"


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]], out: Path,
               quick: Mapping[str, Any], quick_help: str,
               work_help: str = "scratch folder (default: system temp)") -> argparse.Namespace:
    """Add the flags every benchmark takes and parse: ``--out`` (the results JSON, default
    ``out``), ``--work-dir`` and ``--quick``, a smoke run that replaces the arguments named in
    ``quick`` by its values. Its figures are not the targets' figures, so it writes to
    ``quick_out(out)`` and refuses to overwrite ``out``."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results JSON (default {out}; with --quick {quick_out(out)})")
    parser.add_argument("--work-dir", type=Path, default=None, help=work_help)
    args = parser.parse_args(argv)
    if args.quick:
        if args.out is not None and args.out.resolve() == out.resolve():
            parser.error(f"--quick is a smoke run: write it elsewhere than {out}")
        for name, value in quick.items():
            setattr(args, name, value)
    if args.out is None:
        args.out = quick_out(out) if args.quick else out
    return args


ENVELOPE_KEYS = ("benchmark", "date", "machine", "load_avg_before", "load_avg_after",
                 "cpu_probe_s_before", "cpu_probe_s_after", "cpu_steal_pct", "bars", "result")


class Measurement:
    """The readings around one benchmark run: made when the run starts (load average, CPU probe,
    CPU ticks), made again by ``envelope`` when its report is written. A script that writes its
    file more than once (after each size, after each training run) calls ``envelope`` each
    time, so the file always says how loaded the machine was up to what it holds."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.load_before = load_avg()  # before the probe, which is load itself
        self.probe_before, self._ticks = cpu_probe_s(), cpu_times()
        self.started = datetime.now(timezone.utc)

    def envelope(self, machine_info: Dict[str, Any], bars: List[Dict[str, Any]],
                 result: Any) -> Dict[str, Any]:
        """{"benchmark", "date" (the start), "machine", "load_avg_before", "load_avg_after",
        "cpu_probe_s_before", "cpu_probe_s_after", "cpu_steal_pct", "bars", "result"}: the load,
        the probe and the steal say how far the figures can be trusted on a shared machine,
        ``bars`` lists {"name", "value", "target", "met"} per target and ``result`` is the
        script's own payload (its settings included)."""
        steal, load_after = steal_pct(self._ticks, cpu_times()), load_avg()
        return {"benchmark": self.name, "date": self.started.isoformat(timespec="seconds"),
                "machine": machine_info, "load_avg_before": self.load_before,
                "load_avg_after": load_after, "cpu_probe_s_before": self.probe_before,
                "cpu_probe_s_after": cpu_probe_s(), "cpu_steal_pct": steal, "bars": bars,
                "result": result}


def run_and_report(name: str, run: Callable[[], Dict[str, Any]], machine_info: Callable[[], Dict[str, Any]],
                   print_table: Callable[[Dict[str, Any]], None], out: Path,
                   bars: Optional[Callable[[Dict[str, Any]], List[Dict[str, Any]]]] = None) -> Dict[str, Any]:
    """Run the benchmark inside a ``Measurement``, print its table, write ``out`` as its envelope
    (``bars`` computed from the result) and return that envelope. ``machine_info`` is called
    after the run, so it can record settings the run made."""
    measurement = Measurement(name)
    result = run()
    report = measurement.envelope(machine_info(), bars(result) if bars else [], result)
    print_table(result)
    write_json(out, report)
    print(f"\nwrote {out}")
    return report
