"""Load test: 200 concurrent HTTP clients for 60 s against the real resolver with a 1M-item index.

What it proves (README reliability table, "Online serving"): under many concurrent
clients the server answers every request (zero errors: no 5xx, no timeouts, no dropped
connections), its latency is reported as p50/p90/p99/p99.9/max, and its memory stays flat (RSS of
the server process sampled every second; growth between the first and the last 10 s of the
measured window is reported), i.e. no leak per request.

Set-up (all real code paths, as benchmarks/serving_latency.py builds them, whose helpers are reused):
an untrained seeded model with the default ModelConfig is exported with models.export over a
synthetic 1M-item catalog (item embeddings = the model's item tower), a ScaNN index is built and
tuned with resolver queries, user states / profiles / subject-item categories are written to a
Feast repo with the SQLite online store, and `python jobs/serve.py` (uvicorn, one process) serves
on 127.0.0.1. The load generator is one asyncio process with `httpx.AsyncClient` (a pool of 200
keep-alive connections) running 200 client coroutines in closed loop: each sends its next request
as soon as the previous answer arrives. Requests: 80% with a subject item, 20% without context,
5% unknown users (cold start), k=100 - the mix of benchmarks/serving_latency.py.

Client and server share the machine (2 cores here): the figures are a floor for a real
deployment, not a capacity plan. Nothing is hard-coded; everything printed is measured.

Usage: python benchmarks/load_test.py [--items 1000000] [--clients 200] [--seconds 60] [--quick]
Writes benchmarks/results/load_test.json.
"""
from __future__ import annotations

import os
import sys

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402
from typing import Any, Dict, List, Optional, Tuple  # noqa: E402

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.export import export_bundle, load_bundle  # noqa: E402
from models.two_tower import ContextualTwoTower, ModelConfig  # noqa: E402
from serving.index import BACKEND_SCANN, build_index  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results" / "load_test.json"
STEADY_WINDOW_S = 10.0  # RSS growth = mean of the last window - mean of the first window
REQUEST_TIMEOUT_S = 30.0


def _serving_bench() -> ModuleType:
    """benchmarks/serving_latency.py (a sibling: this folder is first on sys.path as a script)."""
    import serving_latency

    return serving_latency


# ---------------------------------------------------------------------- set-up
@dataclass
class Deployment:
    bundle_dir: Path
    index_dir: Path
    repo: Path
    requests: List[Dict[str, Any]]
    facts: Dict[str, Any]


def build_deployment(work: Path, n_items: int, n_users: int, n_subject: int,
                     n_requests: int) -> Deployment:
    """Bundle + tuned ScaNN index + populated Feast repo + a request pool, as serving.py does."""
    bench = _serving_bench()
    torch.manual_seed(0)
    config = ModelConfig()
    model = ContextualTwoTower(config).eval()
    t0 = time.perf_counter()
    catalog = bench.synthetic_catalog(n_items, seed=n_items)
    bundle_dir = export_bundle(model, config, catalog, work / "bundle", f"load{n_items}")
    bundle = load_bundle(bundle_dir)
    t_bundle = time.perf_counter() - t0
    repo = work / "feast"
    store, sc = bench.populate_feast(repo, bundle, catalog, n_users, n_subject, seed=1)
    del store
    index_dir = work / "index"
    index = build_index(bundle.item_ids, bundle.item_embeddings, bundle.model_version, index_dir,
                        queries=sc.queries[: len(sc.queries) // 2],
                        query_source="resolver_queries", backend=BACKEND_SCANN)
    requests = [{k: v for k, v in r.items() if v is not None}
                for r in bench.request_stream(sc, n_requests, seed=3)]
    facts = {"n_items": n_items, "dim": config.dim, "state_dim": config.state_dim,
             "model_version": bundle.model_version, "users_with_state": n_users,
             "subject_items_online": int(len(sc.subject_items)),
             "bundle_export_seconds": round(t_bundle, 1),
             "index_build_seconds": index.manifest.build_seconds,
             "index_recall_at_100": round(index.manifest.recall_at_k, 4),
             "index_scann_params": index.manifest.scann}
    return Deployment(bundle_dir, index_dir, repo, requests, facts)


# ---------------------------------------------------------------------- server
def rss_mb(pid: int) -> float:
    """Resident set size of one process (VmRSS), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


def start_server(dep: Deployment, port: int, log_path: Path) -> Tuple[subprocess.Popen, Any]:
    log = open(log_path, "w+")
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "jobs" / "serve.py"), "--host", "127.0.0.1", "--port",
         str(port), "--bundle", str(dep.bundle_dir), "--index", str(dep.index_dir),
         "--feature-repo", str(dep.repo), "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    return proc, log


def wait_healthy(base: str, proc: subprocess.Popen, log: Any, timeout_s: float = 900) -> float:
    t0 = time.monotonic()
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return time.monotonic() - t0
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() - t0 > timeout_s:
            log.seek(0)
            raise RuntimeError(f"server failed to start:\n{log.read()[-3000:]}")
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen, log: Any) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


# ---------------------------------------------------------------------- load
@dataclass
class Tally:
    """What the clients saw; latencies only for the measured window."""

    latencies_ms: List[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # transport errors / non-200 by kind
    cold_starts: int = 0


async def client_loop(client: httpx.AsyncClient, requests: List[Dict[str, Any]], start: int,
                      measure_from: float, stop_at: float, tally: Tally) -> None:
    """One closed-loop client: next request as soon as the previous answer arrives."""
    i = start
    while time.monotonic() < stop_at:
        body = requests[i % len(requests)]
        i += 1
        t0 = time.monotonic()
        try:
            resp = await client.post("/recommend", json=body)
        except httpx.HTTPError as exc:
            if t0 >= measure_from:
                tally.errors[type(exc).__name__] += 1
            continue
        if t0 < measure_from:
            continue
        tally.latencies_ms.append((time.monotonic() - t0) * 1e3)
        tally.statuses[resp.status_code] += 1
        if resp.status_code != 200:
            tally.errors[f"http_{resp.status_code}"] += 1
        elif resp.json()["cold_start"]:
            tally.cold_starts += 1


async def sample_rss(pid: int, stop_at: float, t_origin: float,
                     samples: List[Tuple[float, float]], every_s: float = 1.0) -> None:
    while time.monotonic() < stop_at:
        samples.append((round(time.monotonic() - t_origin, 2), round(rss_mb(pid), 1)))
        await asyncio.sleep(every_s)


async def run_load(base: str, pid: int, requests: List[Dict[str, Any]], clients: int,
                   warmup_s: float, seconds: float) -> Tuple[Tally, List[Tuple[float, float]]]:
    tally, samples = Tally(), []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits,
                                 timeout=REQUEST_TIMEOUT_S) as client:
        t_origin = time.monotonic()
        measure_from = t_origin + warmup_s
        stop_at = measure_from + seconds
        stride = max(1, len(requests) // clients)
        await asyncio.gather(
            sample_rss(pid, stop_at, measure_from, samples),
            *[client_loop(client, requests, c * stride, measure_from, stop_at, tally)
              for c in range(clients)])
    return tally, [(t, m) for t, m in samples if t >= 0]


# ---------------------------------------------------------------------- report
def pct(samples_ms: List[float]) -> Dict[str, float]:
    a = np.asarray(samples_ms, dtype=np.float64)
    out = {f"p{p:g}".replace(".", ""): round(float(np.percentile(a, p)), 2)
           for p in (50, 90, 99, 99.9)}
    out.update(mean=round(float(a.mean()), 2), max=round(float(a.max()), 2), n=int(a.size))
    return out


def rss_summary(samples: List[Tuple[float, float]], seconds: float) -> Dict[str, Any]:
    first = [m for t, m in samples if t < STEADY_WINDOW_S]
    last = [m for t, m in samples if t >= seconds - STEADY_WINDOW_S]
    ts, ms = np.array([t for t, _ in samples]), np.array([m for _, m in samples])
    slope = float(np.polyfit(ts, ms, 1)[0]) * 60.0 if len(samples) > 2 else float("nan")
    return {"start_mb": ms[0], "end_mb": ms[-1], "max_mb": float(ms.max()),
            "first_10s_mean_mb": round(float(np.mean(first)), 1),
            "last_10s_mean_mb": round(float(np.mean(last)), 1),
            "growth_mb": round(float(np.mean(last) - np.mean(first)), 1),
            "linear_slope_mb_per_min": round(slope, 2), "samples": samples}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--seconds", type=float, default=60.0, help="measured window")
    p.add_argument("--warmup", type=float, default=5.0, help="load before measuring (s)")
    p.add_argument("--users", type=int, default=5000)
    p.add_argument("--subject-items", type=int, default=20000)
    p.add_argument("--quick", action="store_true", help="20k items, 20 clients, 10 s (smoke run)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--work-dir", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.items, args.clients, args.seconds, args.users, args.subject_items = \
            20_000, 20, 10.0, 500, 2000
    bench = _serving_bench()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="ctt-load-test-"))
    try:
        t0 = time.perf_counter()
        dep = build_deployment(work, args.items, args.users, args.subject_items, 20_000)
        print(f"deployment ready in {time.perf_counter() - t0:.0f}s: {dep.facts}", flush=True)
        port = bench._free_port()
        base = f"http://127.0.0.1:{port}"
        proc, log = start_server(dep, port, work / "server.log")
        try:
            startup_s = wait_healthy(base, proc, log)
            rss_idle = rss_mb(proc.pid)
            print(f"server up in {startup_s:.0f}s, RSS {rss_idle:.0f} MB; "
                  f"{args.clients} clients x {args.seconds:.0f}s", flush=True)
            tally, samples = asyncio.run(run_load(base, proc.pid, dep.requests, args.clients,
                                                  args.warmup, args.seconds))
            alive = proc.poll() is None
        finally:
            stop_server(proc, log)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    n_ok = tally.statuses.get(200, 0)
    n_total = sum(tally.statuses.values()) + sum(v for k, v in tally.errors.items()
                                                 if not k.startswith("http_"))
    report = {
        "benchmark": "load_test", "date": datetime.now(timezone.utc).isoformat(),
        "machine": bench.machine(), "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "setup": {**dep.facts, "server": "python jobs/serve.py (uvicorn, 1 process) on 127.0.0.1",
                  "online_store": "Feast SQLite", "client": "httpx.AsyncClient, 1 asyncio process,"
                  " closed loop, keep-alive pool = clients", "server_startup_s": round(startup_s, 1),
                  "server_rss_idle_mb": round(rss_idle, 1)},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": {
            "requests": n_total, "ok": n_ok, "errors": dict(tally.errors),
            "error_rate": round(1 - n_ok / n_total, 6) if n_total else None,
            "statuses": {str(k): v for k, v in tally.statuses.items()},
            "cold_start_answers": tally.cold_starts,
            "throughput_rps": round(n_total / args.seconds, 1),
            "latency_ms": pct(tally.latencies_ms) if tally.latencies_ms else None,
            "server_alive_after": alive,
            "server_rss": rss_summary(samples, args.seconds),
        },
    }
    res = report["results"]
    print(json.dumps({k: v for k, v in res.items() if k != "server_rss"}, indent=1))
    print("rss:", json.dumps({k: v for k, v in res["server_rss"].items() if k != "samples"}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0 if (not tally.errors and alive) else 1


if __name__ == "__main__":
    sys.exit(main())
