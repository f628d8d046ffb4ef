"""Load test: the real resolver over HTTP, driven by `wrk`, one client then 32 connections.

What it measures (issue-16 bars, at 1M items):
- single client: one keep-alive connection in closed loop (`wrk -t1 -c1`): latency p50 / p99 /
  p99.9 (bar `http_p99_ms_1m` <= 3 ms);
- 32 connections: `wrk -t2 -c32` closed loop: throughput and latency (bar `http_rps_32conn`
  >= 600 req/s with p99 <= 25 ms and 0 errors);
- for both: errors by kind (connect / read / write / timeout / non-2xx with their statuses), the
  server's memory (RSS of the master + workers, sampled every second; PSS at the end, which
  shows how much of the bundle and index the workers share) and the server's own /metrics
  counters after the run (they must add up to what wrk sent).

Why wrk: a compiled load generator (Debian's `wrk`, installed by `.ci/services.sh` like
redis-server) keeps the client's own tail out of the figures; the earlier asyncio/httpx client
cost as much CPU per request as the server.

Set-up (all real code paths, as benchmarks/serving_latency.py builds them, whose helpers are
reused): an untrained seeded model with the default ModelConfig (dim 64) exported with
models.export over a synthetic catalog (item embeddings = the model's item tower), a ScaNN index
tuned with resolver queries, user states / profiles / subject-item categories in a Feast repo
with the SQLite online store, and `python jobs/serve.py --workers W` (gunicorn + uvicorn workers
forked after load) on 127.0.0.1. Requests: 80% with a subject item, 20% without context, 5%
unknown users (cold start), k=100 - the mix of benchmarks/serving_latency.py - sent round-robin
from a pool by a Lua script.

Client and server share the machine: on 2 cores the figures are a floor for a real deployment.
Nothing is hard-coded; everything printed is measured.

Usage: python benchmarks/load_test.py [--items 1000000] [--workers 2] [--seconds 30]
Writes benchmarks/results/load_test.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import json
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, List, Optional, Tuple

import httpx
import numpy as np
import torch

import benchlib  # sibling module: benchmarks/ is first on sys.path when run as a script
from models.export import export_bundle, load_bundle
from models.two_tower import ContextualTwoTower, ModelConfig
from serving.index import BACKEND_SCANN, build_index

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results" / "load_test.json"
BAR_ITEMS = 1_000_000
BAR_SINGLE_P99_MS = 3.0
BAR_RPS = 600.0
BAR_RPS_P99_MS = 25.0
WRK_TIMEOUT_S = 5
PHASES = (("single_client", 1, 1), ("conn32", 2, 32))  # (name, wrk threads, connections)

# Lua for wrk: POST bodies round-robin from a pool, statuses counted per thread, and a JSON
# summary (latency in microseconds, the percentiles of benchlib.PERCENTILES as a list in that
# order) printed by done() between markers.
WRK_LUA = r"""
local bodies = {
%(bodies)s
}
local headers = {["Content-Type"] = "application/json"}
local threads = {}
local counter = %(offset)d

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  statuses = {}
  counter = counter + id * 7919
end

function request()
  counter = counter + 1
  return wrk.format("POST", "/recommend", headers, bodies[(counter %% #bodies) + 1])
end

function response(status, hdrs, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local codes = {}
  for _, t in ipairs(threads) do
    for code, n in pairs(t:get("statuses")) do
      codes[tostring(code)] = (codes[tostring(code)] or 0) + n
    end
  end
  local parts = {}
  for code, n in pairs(codes) do table.insert(parts, string.format('"%%s": %%d', code, n)) end
  local pcts = {}
  for _, p in ipairs({%(percentiles)s}) do
    table.insert(pcts, string.format("%%d", latency:percentile(p)))
  end
  local e = summary.errors
  io.write("WRK_JSON_BEGIN\n")
  io.write(string.format(
    '{"duration_us": %%d, "requests": %%d, "bytes": %%d, ' ..
    '"errors": {"connect": %%d, "read": %%d, "write": %%d, "status": %%d, "timeout": %%d}, ' ..
    '"latency_us": {"min": %%d, "mean": %%.1f, "stdev": %%.1f, "max": %%d}, ' ..
    '"percentiles_us": [%%s], "statuses": {%%s}}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.stdev, latency.max,
    table.concat(pcts, ", "), table.concat(parts, ", ")))
  io.write("WRK_JSON_END\n")
end
"""


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
                     n_requests: int, shards: int) -> Deployment:
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
                        query_source="resolver_queries", backend=BACKEND_SCANN, shards=shards)
    requests = [{k: v for k, v in r.items() if v is not None}
                for r in bench.request_stream(sc, n_requests, seed=3)]
    facts = {"n_items": n_items, "dim": config.dim, "state_dim": config.state_dim,
             "model_version": bundle.model_version, "users_with_state": n_users,
             "subject_items_online": int(len(sc.subject_items)),
             "bundle_export_seconds": round(t_bundle, 1),
             "index_build_seconds": index.manifest.build_seconds,
             "index_recall_at_100": round(index.manifest.recall_at_k, 4),
             "index_scann_params": index.manifest.scann,
             "index_search_ms_at_build": index.manifest.search_ms}
    return Deployment(bundle_dir, index_dir, repo, requests, facts)


# ---------------------------------------------------------------------- server
def _status_value(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} for pid {pid}")


def server_pids(root: int) -> List[int]:
    """The server's process and its children (gunicorn master + workers)."""
    pids = [root]
    children = Path(f"/proc/{root}/task/{root}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    return pids


def rss_mb(pids: List[int]) -> float:
    """Summed resident set size (VmRSS) of the processes, MB (shared pages counted per process)."""
    total = 0
    for pid in pids:
        try:
            total += _status_value(pid, "VmRSS")
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total / 1024.0


def pss_mb(pid: int) -> Optional[float]:
    """Proportional set size of one process (shared pages split between their users), MB."""
    rollup = Path(f"/proc/{pid}/smaps_rollup")
    if not rollup.exists():
        return None
    for line in rollup.read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024.0
    return None


def start_server(dep: Deployment, port: int, workers: int, search_threads: Optional[int],
                 work: Path) -> Tuple[subprocess.Popen, Any]:
    metrics_dir = work / f"prometheus-{port}"
    metrics_dir.mkdir(parents=True, exist_ok=True)
    log = open(work / f"server-{port}.log", "w+")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "jobs" / "serve.py"), "--host", "127.0.0.1", "--port",
         str(port), "--bundle", str(dep.bundle_dir), "--index", str(dep.index_dir),
         "--feature-repo", str(dep.repo), "--workers", str(workers), "--log-level", "warning",
         *([] if search_threads is None else ["--search-threads", str(search_threads)])],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
    return proc, log


def wait_healthy(base: str, proc: subprocess.Popen, log: Any, workers: int,
                 timeout_s: float = 900) -> float:
    """Seconds until /health answers 200 and every worker is forked."""
    t0 = time.monotonic()
    while True:
        try:
            up = httpx.get(f"{base}/health", timeout=5).status_code == 200
            if up and (workers == 1 or len(server_pids(proc.pid)) - 1 >= workers):
                return time.monotonic() - t0
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() - t0 > timeout_s:
            log.seek(0)
            raise RuntimeError(f"server failed to start:\n{log.read()[-3000:]}")
        time.sleep(0.5)



# ---------------------------------------------------------------------- wrk
def wrk_script(requests: List[Dict[str, Any]], path: Path, offset: int = 0) -> Path:
    """The Lua script with the request pool inlined (long brackets: no escaping of the JSON)."""
    bodies = ",\n".join(f"[==[{json.dumps(r, separators=(',', ':'))}]==]" for r in requests)
    percentiles = ", ".join(f"{p:g}" for p in benchlib.PERCENTILES)
    path.write_text(WRK_LUA % {"bodies": bodies, "offset": offset, "percentiles": percentiles})
    return path


def parse_wrk(stdout: str) -> Dict[str, Any]:
    """The JSON done() printed -> figures in ms (percentiles keyed as benchlib.percentiles keys
    them: p50 ... p999) and req/s."""
    try:
        raw = json.loads(stdout.split("WRK_JSON_BEGIN\n", 1)[1].split("WRK_JSON_END", 1)[0])
    except (IndexError, json.JSONDecodeError) as exc:
        raise RuntimeError(f"wrk printed no summary:\n{stdout[-2000:]}") from exc
    seconds = raw["duration_us"] / 1e6
    lat = {k: round(v / 1000.0, 3) for k, v in raw["latency_us"].items()}
    lat.update({benchlib.percentile_key(p): round(v / 1000.0, 3)
                for p, v in zip(benchlib.PERCENTILES, raw["percentiles_us"], strict=True)})
    n_errors = sum(raw["errors"].values())
    return {"requests": raw["requests"], "seconds": round(seconds, 2),
            "throughput_rps": round(raw["requests"] / seconds, 1), "latency_ms": lat,
            "errors": raw["errors"], "error_count": n_errors,
            "statuses": {k: raw["statuses"][k] for k in sorted(raw["statuses"])}}


def run_wrk(base: str, script: Path, threads: int, connections: int, seconds: float) -> Dict[str, Any]:
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s",
           f"--timeout={WRK_TIMEOUT_S}s", "-s", str(script), base]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-2000:]}")
    out = parse_wrk(done.stdout)
    out["command"] = " ".join(cmd[:-3] + ["-s", "<pool.lua>", base])
    return out


class RssSampler:
    """RSS of the server tree every second while a phase runs."""

    def __init__(self, root_pid: int) -> None:
        self.root = root_pid
        self.samples: List[Tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.monotonic()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((round(time.monotonic() - self._t0, 2),
                                 round(rss_mb(server_pids(self.root)), 1)))
            self._stop.wait(1.0)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def rss_summary(samples: List[Tuple[float, float]]) -> Dict[str, Any]:
    ms = np.array([m for _, m in samples])
    n = max(1, len(ms) // 4)
    return {"start_mb": float(ms[0]), "end_mb": float(ms[-1]), "max_mb": float(ms.max()),
            "first_quarter_mean_mb": round(float(ms[:n].mean()), 1),
            "last_quarter_mean_mb": round(float(ms[-n:].mean()), 1),
            "growth_mb": round(float(ms[-n:].mean() - ms[:n].mean()), 1), "samples": samples}


def server_counts(base: str) -> Dict[str, float]:
    """ctt_requests_total of /recommend by status/outcome, from the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", timeout=10).text
    out: Dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "ctt_requests_total" and s.labels.get("endpoint") == "/recommend":
                key = f"{s.labels['status']}:{s.labels['outcome']}"
                out[key] = out.get(key, 0) + s.value
    return out


# ---------------------------------------------------------------------- report
def bars(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The issue's HTTP bars; measured only at BAR_ITEMS (value None otherwise)."""
    at_scale = result["setup"]["n_items"] == BAR_ITEMS
    single = result["phases"].get("single_client")
    conc = result["phases"].get("conn32")
    note = None if at_scale else f"run at {result['setup']['n_items']:,} items; the bar is for {BAR_ITEMS:,}"
    p99 = single["latency_ms"]["p99"] if single and at_scale else None
    rps = conc["throughput_rps"] if conc and at_scale else None
    rps_met = (rps is not None and rps >= BAR_RPS and conc["latency_ms"]["p99"] <= BAR_RPS_P99_MS
               and conc["error_count"] == 0 and set(conc["statuses"]) <= {"200"})
    out = [{"name": "http_p99_ms_1m", "value": p99, "target": BAR_SINGLE_P99_MS,
            "met": p99 is not None and p99 <= BAR_SINGLE_P99_MS and single["error_count"] == 0},
           {"name": "http_rps_32conn", "value": rps, "target": BAR_RPS, "met": bool(rps_met),
            "condition": f"p99 <= {BAR_RPS_P99_MS} ms and 0 errors at 32 connections"}]
    if note:
        for b in out:
            b["note"] = note
    return out


def report(measurement: benchlib.Measurement, args: argparse.Namespace,
           result: Dict[str, Any]) -> Dict[str, Any]:
    """The results JSON: the bars, and under ``result`` the run's figures and its flags."""
    return measurement.envelope(_serving_bench().machine(), bars(result),
                                {**result, "args": benchlib.args_record(args)})


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=BAR_ITEMS)
    p.add_argument("--workers", type=int, default=2, help="server worker processes")
    p.add_argument("--shards", type=int, default=1,
                   help="index shards (ctt-build-index --shards); 1: the workers fill the cores, "
                        "where one searcher per request costs the least CPU")
    p.add_argument("--search-threads", type=int, default=None,
                   help="ctt-serve --search-threads (default: the server's)")
    p.add_argument("--seconds", type=float, default=30.0, help="measured seconds per phase")
    p.add_argument("--warmup", type=float, default=5.0, help="wrk run before each phase (s)")
    p.add_argument("--users", type=int, default=5000)
    p.add_argument("--subject-items", type=int, default=20000)
    p.add_argument("--pool", type=int, default=20000, help="distinct requests sent round-robin")
    args = benchlib.parse_args(
        p, argv, RESULTS, {"items": 20_000, "seconds": 10.0, "users": 500, "subject_items": 2000,
                           "pool": 5000},
        "20k items, 500 users, 10 s (smoke run)", "folder for the run's files (default: temp)")
    if shutil.which("wrk") is None:
        p.error("wrk is not installed (.ci/services.sh installs it: apt-get install wrk)")
    bench = _serving_bench()
    torch.set_num_threads(1)
    measurement = benchlib.Measurement("load_test")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="ctt-load-test-"))
    try:
        t0 = time.perf_counter()
        dep = build_deployment(work, args.items, args.users, args.subject_items, args.pool,
                               args.shards)
        print(f"deployment ready in {time.perf_counter() - t0:.0f}s: {dep.facts}", flush=True)
        script = wrk_script(dep.requests, work / "pool.lua")
        port = bench._free_port()
        base = f"http://127.0.0.1:{port}"
        proc, log = start_server(dep, port, args.workers, args.search_threads, work)
        phases: Dict[str, Any] = {}
        try:
            startup_s = wait_healthy(base, proc, log, args.workers)
            served = httpx.get(f"{base}/version", timeout=10).json()
            pids = server_pids(proc.pid)
            rss_idle = rss_mb(pids)
            print(f"server up in {startup_s:.0f}s ({len(pids)} processes), RSS {rss_idle:.0f} MB",
                  flush=True)
            for name, threads, conns in PHASES:
                run_wrk(base, script, threads, conns, args.warmup)
                before = server_counts(base)
                with RssSampler(proc.pid) as sampler:
                    phase = run_wrk(base, script, threads, conns, args.seconds)
                after = server_counts(base)
                phase["server_rss"] = rss_summary(sampler.samples)
                # What the server's own /metrics counted in the phase (answers wrk cut off at the
                # end are counted by the server, not by wrk).
                phase["server_counted"] = {k: int(v - before.get(k, 0)) for k, v in after.items()
                                           if v - before.get(k, 0) > 0}
                phases[name] = phase
                print(f"{name}: {phase['throughput_rps']} req/s, latency ms {phase['latency_ms']}, "
                      f"errors {phase['errors']}, statuses {phase['statuses']}", flush=True)
            pids = server_pids(proc.pid)
            memory = {"rss_idle_mb": round(rss_idle, 1), "rss_end_mb": round(rss_mb(pids), 1),
                      "pss_end_mb": {str(pid): pss_mb(pid) for pid in pids}}
            alive = proc.poll() is None
        finally:
            benchlib.stop_process(proc, log)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "setup": {**dep.facts, "server": f"python jobs/serve.py --workers {args.workers} (gunicorn "
                  f"+ uvicorn workers) on 127.0.0.1", "online_store": "Feast SQLite",
                  "search_threads": served["search_threads"],
                  "client": "wrk (compiled, closed loop, keep-alive), request pool round-robin",
                  "server_startup_s": round(startup_s, 1), "workers": args.workers},
        "phases": phases, "server_memory": memory,
        "server_alive_after": alive,
    }
    out = report(measurement, args, result)
    benchlib.print_bars(out["bars"])
    benchlib.write_json(args.out, out)
    print(f"wrote {args.out}")
    errors = sum(ph["error_count"] for ph in phases.values())
    return 0 if (errors == 0 and alive) else 1


if __name__ == "__main__":
    sys.exit(main())
