"""HTTP app: status codes for every hazard, online store down + recovery, a real uvicorn run."""
from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import NO_STATE_USER, STALE_USER, UNKNOWN_ITEM, write_repo_yaml
from fastapi.testclient import TestClient

import ctt_contracts as C
from serving.app import create_app
from serving.cli import build_index_main
from serving.index import SCANN_ASSETS, shard_dir
from serving.resolver import Resolver

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def client(resolver):
    with TestClient(create_app(resolver), raise_server_exceptions=False) as c:
        yield c


def test_recommend_ok(client, serving_env):
    item = int(serving_env.catalog[C.ITEM_ID].iloc[3])
    r = client.post("/recommend", json={C.USER_ID: 2, C.SUBJECT_ITEM_ID: item, "k": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["items"]) == 7 and all(len(pair) == 2 for pair in body["items"])
    scores = [s for _, s in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert body["model_version"] == serving_env.model_version
    assert body["context_source"] == "subject_item" and body["cold_start"] is False
    assert body["state_age_seconds"] > 0 and set(body["timings"]) >= {"feast", "head", "search"}


def test_recommend_matches_the_resolver(client, resolver):
    payload = {C.USER_ID: 6, "categories": [[3, 0.7], [11, 0.3]],
               "demographics": {C.COUNTRY: "FR", C.GENDER: "f"}, "k": 20, "exact": True}
    body = client.post("/recommend", json=payload).json()
    direct = resolver.recommend(6, categories=[(3, 0.7), (11, 0.3)],
                                demographics={C.COUNTRY: "FR", C.GENDER: "f"}, k=20, exact=True)
    assert [i for i, _ in body["items"]] == [i for i, _ in direct.items]
    np.testing.assert_allclose([s for _, s in body["items"]], [s for _, s in direct.items], atol=1e-6)


def test_cold_start_and_skew_over_http(client):
    cold = client.post("/recommend", json={C.USER_ID: NO_STATE_USER, "k": 3})
    assert cold.status_code == 200 and cold.json()["cold_start"] is True
    skew = client.post("/recommend", json={C.USER_ID: STALE_USER, "k": 3})
    assert skew.status_code == 409
    assert skew.json()["error"] == "version_skew" and "model_version" in skew.json()["detail"]


@pytest.mark.parametrize("payload, status", [
    ({}, 422),  # no user id
    ({C.USER_ID: "abc"}, 422),
    ({C.USER_ID: "12"}, 422),  # strict: no silent string -> int coercion
    ({C.USER_ID: -4}, 422),
    ({C.USER_ID: 1, "k": 0}, 422),
    ({C.USER_ID: 1, "k": 100000}, 422),
    ({C.USER_ID: 1, "nonsense": 1}, 422),
    ({C.USER_ID: 1, C.SUBJECT_ITEM_ID: 103, "categories": [[1, 1.0]]}, 422),
    ({C.USER_ID: 1, "categories": [[1]]}, 422),
    ({C.USER_ID: 1, "demographics": {C.GENDER: "robot"}}, 422),
    ({C.USER_ID: 1, "demographics": {C.AGE_BUCKET: 42}}, 422),
    ({C.USER_ID: 1, "categories": [[1, -1.0]]}, 400),  # semantic: negative confidence
    ({C.USER_ID: 1, "categories": [[1, 0.0], [2, 0.0]]}, 400),  # no confidence at all
    ({C.USER_ID: 1, C.SUBJECT_ITEM_ID: UNKNOWN_ITEM}, 404),
])
def test_bad_requests(client, payload, status):
    r = client.post("/recommend", json=payload)
    assert r.status_code == status, r.text
    assert r.json()["detail"]  # always a message, never a bare status or a trace
    assert "Traceback" not in r.text


def test_malformed_json_is_422(client):
    r = client.post("/recommend", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_health_and_version(client, serving_env):
    h = client.get("/health")
    assert h.status_code == 200 and h.json()["online_store"]["reachable"] is True
    v = client.get("/version").json()
    assert v["model_version"] == serving_env.model_version and v["index_backend"] == "scann"


def test_unreachable_redis_is_503_and_health_says_so(serving_env, resolver, tmp_path):
    """An online store that cannot be reached -> 503 with a message, /health 503 + reachable=false."""
    from feast import FeatureStore

    repo = tmp_path / "redis_repo"
    registry = serving_env.repo_dir.parent / "registry.db"
    write_repo_yaml(repo, registry, "  type: redis\n  connection_string: \"127.0.0.1:1\"\n")
    down = Resolver(resolver.bundle, resolver.index, FeatureStore(repo_path=str(repo)))
    with TestClient(create_app(down), raise_server_exceptions=False) as c:
        r = c.post("/recommend", json={C.USER_ID: 1, "k": 3})
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "online_store_unavailable" and "127.0.0.1:1" in r.json()["detail"]
        h = c.get("/health")
        assert h.status_code == 503
        assert h.json()["online_store"]["reachable"] is False and h.json()["status"] == "degraded"


def test_locked_sqlite_store_is_503_then_recovers_without_restart(client, serving_env):
    """Another process holding an exclusive lock on the SQLite online store = store unavailable;
    once the lock is gone the same app answers again (no restart, no stale error state)."""
    db = serving_env.repo_dir.parent / "online.db"
    locker = sqlite3.connect(db, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        r = client.post("/recommend", json={C.USER_ID: 1, "k": 3})
        assert r.status_code == 503 and "locked" in r.json()["detail"]
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert client.post("/recommend", json={C.USER_ID: 1, "k": 3}).status_code == 200
    assert client.get("/health").json()["online_store"]["reachable"] is True


def test_build_index_cli(serving_env, tmp_path, capsys):
    out = tmp_path / "cli_index"
    assert build_index_main(["--bundle", str(serving_env.bundle_dir), "--out", str(out),
                             "--n-queries", "100", "--shards", "2"]) == 0
    printed = capsys.readouterr().out
    assert serving_env.model_version in printed and '"shards": 2' in printed
    assert (out / C.INDEX_MANIFEST).is_file()
    assert all((out / shard_dir(i) / SCANN_ASSETS).is_file() for i in (0, 1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_uvicorn_on_loopback(serving_env):
    """`python jobs/serve.py` binds 127.0.0.1, serves /health and /recommend, stops on SIGINT."""
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "jobs" / "serve.py"), "--port", str(port),
         "--bundle", str(serving_env.bundle_dir), "--index", str(serving_env.index_dir),
         "--feature-repo", str(serving_env.repo_dir), "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not start: {proc.stdout.read().decode()[-3000:]}")
            time.sleep(0.3)
        r = httpx.post(f"{base}/recommend", json={C.USER_ID: 3, "k": 5}, timeout=10)
        assert r.status_code == 200 and len(r.json()["items"]) == 5
        with socket.socket() as s:  # bound to loopback only
            s.settimeout(1)
            listening = [line for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                         if line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A"]
            assert listening and all(line.split()[1].startswith("0100007F:") for line in listening)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
