"""Observability: /metrics (single- and multi-process), the structured request log, replay.

The multi-worker tests run the real server (`python jobs/serve.py --workers 2`: gunicorn +
uvicorn workers) on 127.0.0.1 over a private copy of the Feast SQLite store, with
PROMETHEUS_MULTIPROC_DIR set, and count what every worker answered through one /metrics scrape.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import (NO_STATE_USER, STALE_USER, STATE_AGE, UNKNOWN_ITEM, sqlite_store_yaml,
                      tiny_config, write_repo_yaml)
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

import ctt_contracts as C
from serving.app import create_app
from serving.cli import serve_main
from serving.metrics import ServingMetrics
from serving.replay import main as replay_main
from serving.replay import replay, score_logged_items
from serving.request_log import RequestLog, read_records
from serving.resolver import Resolver

REPO_ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------- helpers
def samples(text: str) -> Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(scraped, name: str, **labels: str) -> float:
    return scraped.get((name, tuple(sorted(labels.items()))), 0.0)


def copy_repo(serving_env, dest: Path) -> Path:
    """A private Feast repo over copies of the session's registry and SQLite store."""
    src = serving_env.repo_dir.parent
    dest.mkdir(parents=True)
    shutil.copy(src / "registry.db", dest / "registry.db")
    shutil.copy(src / "online.db", dest / "online.db")
    write_repo_yaml(dest / "repo", dest / "registry.db", sqlite_store_yaml(dest / "online.db"))
    return dest / "repo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, proc: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"server did not start: {proc.stdout.read().decode()[-4000:]}")
        time.sleep(0.3)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclasses.dataclass
class Server:
    base: str
    repo: Path
    online_db: Path
    metrics_dir: Path
    log_dir: Path
    proc: subprocess.Popen
    dead_pid: int  # a finished process whose metrics file the server must remove at start-up


@pytest.fixture(scope="module")
def server(serving_env, tmp_path_factory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("observed")
    repo = copy_repo(serving_env, root / "store")
    metrics_dir = root / "prom"
    metrics_dir.mkdir()
    finished = subprocess.Popen(["true"])
    finished.wait()
    (metrics_dir / f"counter_{finished.pid}.db").write_bytes(b"left over by an earlier run")
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "jobs" / "serve.py"), "--port", str(port),
         "--bundle", str(serving_env.bundle_dir), "--index", str(serving_env.index_dir),
         "--feature-repo", str(repo), "--workers", "2", "--request-log", str(root / "log"),
         "--request-log-sample-rate", "1", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        yield Server(base, repo, root / "store" / "online.db", metrics_dir, root / "log", proc,
                     finished.pid)
    finally:
        stop(proc)


def post_fresh(base: str, body: dict) -> httpx.Response:
    """One request on a new connection (so the workers share the requests between them)."""
    with httpx.Client(base_url=base, timeout=10) as client:
        return client.post("/recommend", json=body)


@pytest.fixture(scope="module")
def traffic(server, serving_env) -> Dict[str, object]:
    """A fixed mix of answers sent to the 2-worker server; what the metrics must add up to."""
    items = serving_env.catalog[C.ITEM_ID].to_numpy()
    ok_bodies = [{C.USER_ID: u, C.SUBJECT_ITEM_ID: int(items[u * 11]), "k": 10} for u in range(1, 9)]
    ok_bodies += [{C.USER_ID: 9, "categories": [[3, 0.5], [7, 0.5]], "k": 5},
                  {C.USER_ID: NO_STATE_USER, "k": 5}]
    answers: List[Tuple[dict, httpx.Response]] = []
    for body in ok_bodies:
        answers.append((body, post_fresh(server.base, body)))
    for _ in range(3):
        answers.append(({}, post_fresh(server.base, {C.USER_ID: STALE_USER, "k": 3})))
    answers.append(({}, post_fresh(server.base, {C.USER_ID: 2, C.SUBJECT_ITEM_ID: UNKNOWN_ITEM})))
    for _ in range(2):
        answers.append(({}, post_fresh(server.base, {C.USER_ID: 2, "k": 0})))
    # The online store file disappears: every worker that reads answers 503, then recovers.
    moved = server.online_db.with_suffix(".away")
    server.online_db.rename(moved)
    try:
        for _ in range(4):
            answers.append(({}, post_fresh(server.base, {C.USER_ID: 3, "k": 3})))
    finally:
        moved.rename(server.online_db)
    answers.append(({C.USER_ID: 4, "k": 4}, post_fresh(server.base, {C.USER_ID: 4, "k": 4})))
    statuses = Counter(r.status_code for _, r in answers)
    assert statuses == {200: 11, 409: 3, 404: 1, 422: 2, 503: 4}, statuses
    return {"answers": answers, "ok": [(b, r.json()) for b, r in answers if r.status_code == 200]}


# ---------------------------------------------------------------------- /metrics, 2 workers
def test_metrics_add_up_every_worker(server, traffic, serving_env):
    text = httpx.get(f"{server.base}/metrics", timeout=10).text
    got = samples(text)
    want = {("200", "ok"): 11, ("409", "version_skew"): 3, ("404", "unknown_subject_item"): 1,
            ("422", "invalid_request"): 2, ("503", "online_store_unavailable"): 4}
    for (status, outcome), n in want.items():
        assert value(got, "ctt_requests_total", endpoint="/recommend", status=status,
                     outcome=outcome) == n, (status, outcome)
    assert value(got, "ctt_request_duration_seconds_count", endpoint="/recommend") == 21
    for stage in ("feast", "head", "search", "total"):
        assert value(got, "ctt_stage_duration_seconds_count", stage=stage) == 11
        assert value(got, "ctt_stage_duration_seconds_sum", stage=stage) > 0
    assert value(got, "ctt_cold_starts_total", reason="no_state") == 1
    # 10 answers used a state written STATE_AGE (5 h) ago: all in the (2 h, 6 h] bucket.
    assert value(got, "ctt_state_age_seconds_count") == 10
    assert value(got, "ctt_state_age_seconds_bucket", le="7200.0") == 0
    assert value(got, "ctt_state_age_seconds_bucket", le="21600.0") == 10
    age_sum = value(got, "ctt_state_age_seconds_sum")
    assert STATE_AGE.total_seconds() * 10 <= age_sum <= (STATE_AGE.total_seconds() + 3600) * 10
    info = [labels for (name, labels), v in got.items() if name == "ctt_build_info" and v == 1]
    assert [dict(x) for x in info] == [{"model_version": serving_env.model_version,
                                        "index_model_version": serving_env.model_version,
                                        "index_backend": "scann",
                                        "index_built_at": dict(info[0])["index_built_at"],
                                        "head": "numpy"}]
    # The earlier run's file was removed at start-up, and both workers wrote their own files.
    names = {p.name for p in server.metrics_dir.iterdir()}
    assert f"counter_{server.dead_pid}.db" not in names
    assert len({n.rsplit("_", 1)[1] for n in names if n.startswith("counter_")}) >= 2


def test_request_log_holds_every_ok_answer(server, traffic, serving_env):
    files = sorted(server.log_dir.glob("requests-*.jsonl"))
    # one file per worker that answered (the kernel may hand every connection to one of them)
    assert 1 <= len(files) <= 2, files
    records = [rec for _, _, rec, problem in read_records([server.log_dir]) if problem is None]
    assert len(records) == 11
    by_request = {json.dumps(r["request"], sort_keys=True): r for r in records}
    for body, answer in traffic["ok"]:
        key = {C.USER_ID: body[C.USER_ID], C.SUBJECT_ITEM_ID: body.get(C.SUBJECT_ITEM_ID),
               "categories": body.get("categories"), "demographics": None, "k": body["k"],
               "exact": False}
        rec = by_request[json.dumps(key, sort_keys=True)]
        assert rec["items"] == [list(p) for p in answer["items"]]
        assert rec["model_version"] == rec["index"]["model_version"] == serving_env.model_version
        assert rec["state_model_version"] == answer["state_model_version"]
        assert rec["cold_start"] == answer["cold_start"]
        assert set(rec["timings"]) == {"feast", "head", "search", "total"}


# ---------------------------------------------------------------------- /metrics, in process
def test_in_process_metrics_count_every_error_kind(resolver):
    """Counted by difference: in multi-process mode (Feast turns it on at import) every app of
    this test process writes to the same files."""
    metrics = ServingMetrics()
    keys = [("/recommend", "200", "ok"), ("/recommend", "413", "request_too_large"),
            ("other", "404", "not_found"), ("/recommend", "404", "unknown_subject_item")]

    def counts():
        got = samples(metrics.exposition()[0].decode())
        return ([value(got, "ctt_requests_total", endpoint=e, status=st, outcome=o) for e, st, o in keys]
                + [value(got, "ctt_stage_duration_seconds_count", stage="head")])

    before = counts()
    with TestClient(create_app(resolver, max_body_bytes=200, metrics=metrics),
                    raise_server_exceptions=False) as client:
        assert client.post("/recommend", json={C.USER_ID: 1, "k": 3}).status_code == 200
        assert client.post("/recommend", content=b"x" * 500,
                           headers={"content-type": "application/json"}).status_code == 413
        assert client.get("/nowhere").status_code == 404
        assert client.post("/recommend", json={C.USER_ID: 2, C.SUBJECT_ITEM_ID: UNKNOWN_ITEM}
                           ).status_code == 404
        scraped = client.get("/metrics")
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    assert [a - b for a, b in zip(counts(), before)] == [1, 1, 1, 1, 1]


def test_workers_need_a_metrics_folder(serving_env, monkeypatch, capsys):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with pytest.raises(SystemExit) as exc:
        serve_main(["--bundle", str(serving_env.bundle_dir), "--feature-repo",
                    str(serving_env.repo_dir), "--workers", "2"])
    assert exc.value.code == 2 and "PROMETHEUS_MULTIPROC_DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        serve_main(["--bundle", str(serving_env.bundle_dir), "--feature-repo",
                    str(serving_env.repo_dir), "--request-log-sample-rate", "0.5"])
    assert "--request-log" in capsys.readouterr().err


# ---------------------------------------------------------------------- request log
def test_request_log_is_off_by_default_and_samples_its_rate(tmp_path):
    off = RequestLog(tmp_path / "off", 0.0)
    assert not any(off.sampled() for _ in range(1000)) and not (tmp_path / "off").exists()
    some = RequestLog(tmp_path / "some", 0.2, seed=0)
    share = sum(some.sampled() for _ in range(5000)) / 5000
    assert 0.17 < share < 0.23
    with pytest.raises(ValueError, match="sample rate"):
        RequestLog(tmp_path, 1.5)


def test_unreadable_lines_are_reported_not_skipped(tmp_path):
    good = {"request": {C.USER_ID: 1, "k": 2}, "items": [[5, 0.5]], "model_version": "m"}
    path = tmp_path / "requests-1.jsonl"
    path.write_text(json.dumps(good) + "\n{truncated\n\n" + json.dumps({"items": []}) + "\n")
    got = list(read_records([tmp_path]))
    assert [(n, rec is not None) for _, n, rec, _ in got] == [(1, True), (2, False), (4, False)]
    assert "not JSON" in got[1][3] and "missing" in got[2][3]
    with pytest.raises(ValueError, match="does not exist"):
        list(read_records([tmp_path / "nope"]))


# ---------------------------------------------------------------------- replay
@pytest.fixture(scope="module")
def candidate(serving_env, tmp_path_factory):
    """Another bundle (other weights, same catalog), its ScaNN index and a Feast store holding its
    own user states, as batch inference + materialize would leave them before a rollout."""
    from feast import FeatureStore

    from models.export import export_bundle, load_bundle
    from models.features import pad_history
    from models.two_tower import ContextualTwoTower
    from serving.index import build_index

    root = tmp_path_factory.mktemp("candidate")
    torch.manual_seed(7)
    config = tiny_config()
    model = ContextualTwoTower(config).eval()
    bundle = load_bundle(export_bundle(model, config, serving_env.catalog, root / "bundle", "cand"))
    build_index(bundle.item_ids, bundle.item_embeddings, bundle.model_version, root / "index",
                backend="scann", n_queries=200)
    repo = copy_repo(serving_env, root / "store")
    users = sorted(u for u in serving_env.histories if u != STALE_USER)
    padded = [pad_history(*serving_env.histories[u], config.max_len) for u in users]
    with torch.no_grad():
        states = model.encode_user_state(torch.as_tensor(np.stack([p[0] for p in padded])),
                                         torch.as_tensor(np.stack([p[1] for p in padded])))
    FeatureStore(repo_path=str(repo)).write_to_online_store(C.FV_USER_SEQUENCE_STATE, pd.DataFrame({
        C.USER_ID: np.asarray(users, dtype=np.int64),
        C.HIDDEN_STATE: [s.tolist() for s in states.numpy()],
        C.MODEL_VERSION: bundle.model_version, C.SEQUENCE_HASH: [f"h{u}" for u in users],
        C.STATE_TS: pd.Timestamp.now(tz="UTC")}))
    return {"bundle_dir": root / "bundle", "index_dir": root / "index", "repo": repo,
            "model_version": bundle.model_version}


def test_replay_with_the_served_bundle_changes_nothing(server, traffic, serving_env):
    resolver = Resolver.from_paths(serving_env.bundle_dir, serving_env.index_dir, server.repo)
    summary, rows = replay(resolver, read_records([server.log_dir]))
    assert summary["requests"] == summary["replayed"] == 11 and not summary["errors"]
    assert summary["overlap_at_k"]["min"] == 1.0
    assert summary["abs_score_shift"]["max"] < 1e-5
    assert summary["cold_starts"] == {"no_state": 1}


def test_replay_with_a_candidate_reports_overlap_and_shift(server, traffic, candidate, tmp_path):
    out, rows_path = tmp_path / "report.json", tmp_path / "rows.jsonl"
    assert replay_main(["--log", str(server.log_dir), "--bundle", str(candidate["bundle_dir"]),
                        "--index", str(candidate["index_dir"]), "--feature-repo",
                        str(candidate["repo"]), "--out", str(out), "--rows", str(rows_path)]) == 0
    summary = json.loads(out.read_text())
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    assert summary["candidate_model_version"] == candidate["model_version"]
    assert summary["requests"] == summary["replayed"] == len(rows) == 11
    assert summary["overlap_at_k"]["mean"] < 0.9  # other weights: other answers
    # Each row's figures, recomputed independently from the candidate's own query and catalog.
    resolver = Resolver.from_paths(candidate["bundle_dir"], candidate["index_dir"], candidate["repo"])
    logged = {(r["request"][C.USER_ID], r["request"][C.SUBJECT_ITEM_ID]): r
              for _, _, r, p in read_records([server.log_dir]) if p is None}
    for row in rows:
        rec = logged[(row[C.USER_ID], row[C.SUBJECT_ITEM_ID])]
        req = rec["request"]
        q = resolver.query_embedding(req[C.USER_ID], subject_item_id=req[C.SUBJECT_ITEM_ID],
                                     categories=req["categories"])
        ids = [i for i, _ in rec["items"]]
        scores, present = score_logged_items(resolver, q, ids)
        assert present.all()
        want_shift = float(np.mean(scores - np.array([s for _, s in rec["items"]])))
        assert row["score_shift"] == pytest.approx(want_shift, abs=1e-5)
        new = resolver.recommend(req[C.USER_ID], subject_item_id=req[C.SUBJECT_ITEM_ID],
                                 categories=req["categories"], k=req["k"])
        k = req["k"]
        assert row["overlap_at_k"] == len(set(ids[:k]) & {i for i, _ in new.items[:k]}) / k
    shifts = [r["score_shift"] for r in rows]
    assert summary["score_shift"]["mean"] == pytest.approx(float(np.mean(shifts)), abs=1e-6)


def test_replay_counts_version_skew_instead_of_dropping(server, traffic, candidate):
    """The candidate against the served store (states of the old version): every request with a
    state is a version_skew error in the report, the no-state user still replays."""
    resolver = Resolver.from_paths(candidate["bundle_dir"], candidate["index_dir"], server.repo)
    summary, _ = replay(resolver, read_records([server.log_dir]))
    assert summary["requests"] == 11
    assert summary["errors"] == {"version_skew": 10} and summary["replayed"] == 1


# ---------------------------------------------------------------------- wrk against 2 workers
def _load_test_module():
    """benchmarks/load_test.py, imported as the benchmark runs it (its folder on sys.path)."""
    import importlib.util

    folder = str(REPO_ROOT / "benchmarks")
    if folder not in sys.path:  # its sibling benchlib, found when run as a script
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location("ctt_load_test", REPO_ROOT / "benchmarks" / "load_test.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_wrk_load_on_two_workers_has_no_errors_and_the_server_counts_it(serving_env, tmp_path,
                                                                        require_service):
    """The load test's wrk driver (Lua pool, parsed summary) against `--workers 2`: every answer
    a 200, and the server's /metrics counted what wrk received (plus at most the requests in
    flight when wrk stopped)."""
    require_service("wrk", "the serving load test")
    load_test = _load_test_module()
    items = serving_env.catalog[C.ITEM_ID].to_numpy()
    pool = [{C.USER_ID: u, C.SUBJECT_ITEM_ID: int(items[u * 7]), "k": 20} for u in range(1, 30)]
    pool += [{C.USER_ID: NO_STATE_USER, "k": 20}]
    script = load_test.wrk_script(pool, tmp_path / "pool.lua")
    repo = copy_repo(serving_env, tmp_path / "store")
    metrics_dir = tmp_path / "prom"
    metrics_dir.mkdir()
    port = free_port()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "jobs" / "serve.py"), "--port", str(port),
         "--bundle", str(serving_env.bundle_dir), "--index", str(serving_env.index_dir),
         "--feature-repo", str(repo), "--workers", "2", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        before = load_test.server_counts(base)
        got = load_test.run_wrk(base, script, threads=2, connections=8, seconds=3)
        after = load_test.server_counts(base)
        assert len(load_test.server_pids(proc.pid)) == 3  # master + 2 workers
    finally:
        stop(proc)
    assert got["requests"] > 50 and got["error_count"] == 0
    assert got["statuses"] == {"200": got["requests"]}
    assert got["latency_ms"]["p50"] <= got["latency_ms"]["p99"] <= got["latency_ms"]["max"]
    served = after.get("200:ok", 0) - before.get("200:ok", 0)
    assert got["requests"] <= served <= got["requests"] + 8
    assert set(after) == {"200:ok"}


def test_one_process_server_without_a_metrics_folder_counts_its_answers(serving_env):
    """The default deployment: `jobs/serve.py` (uvicorn, one process), PROMETHEUS_MULTIPROC_DIR
    unset in its environment; /metrics still counts every answer."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PROMETHEUS_MULTIPROC_DIR", "PROMETHEUS_MULTIPROCESS_DIR",
                        "prometheus_multiproc_dir")}
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "jobs" / "serve.py"), "--port", str(port),
         "--bundle", str(serving_env.bundle_dir), "--index", str(serving_env.index_dir),
         "--feature-repo", str(serving_env.repo_dir), "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        with httpx.Client(base_url=base, timeout=10) as client:
            for user in (1, 2, STALE_USER):
                client.post("/recommend", json={C.USER_ID: user, "k": 3})
            got = samples(client.get("/metrics").text)
    finally:
        stop(proc)
    assert value(got, "ctt_requests_total", endpoint="/recommend", status="200", outcome="ok") == 2
    assert value(got, "ctt_requests_total", endpoint="/recommend", status="409",
                 outcome="version_skew") == 1
    assert value(got, "ctt_stage_duration_seconds_count", stage="search") == 2
