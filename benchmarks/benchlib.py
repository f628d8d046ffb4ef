"""What the plain-script benchmarks share: the machine record and the run -> table -> JSON report.

Imported by sibling scripts run as ``python benchmarks/NAME.py`` (their folder is first on
sys.path). Every results JSON then records the machine and the load the same way.
"""
from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence


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


def run_and_report(name: str, run: Callable[[], Dict[str, Any]], machine_info: Callable[[], Dict[str, Any]],
                   print_table: Callable[[Dict[str, Any]], None], out: Path,
                   bars: Optional[Callable[[Dict[str, Any]], List[Dict[str, Any]]]] = None) -> None:
    """Run the benchmark with the load average recorded before and after, print its table and
    write ``out`` as {"benchmark", "date", "machine", "load_avg_before", "load_avg_after",
    "bars", "result"}: the load says how far the figures can be trusted on a shared machine, and
    ``bars`` (computed from the result) lists {"name", "value", "target", "met"} per target.
    ``machine_info`` is called after the run, so it can record settings the run made."""
    load_before = os.getloadavg()
    started = datetime.now(timezone.utc)
    result = run()
    report = {"benchmark": name, "date": started.isoformat(timespec="seconds"),
              "machine": machine_info(), "load_avg_before": [round(x, 2) for x in load_before],
              "load_avg_after": [round(x, 2) for x in os.getloadavg()],
              "bars": bars(result) if bars else [], "result": result}
    print_table(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")
