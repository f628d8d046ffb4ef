"""Online store faults against a REAL Redis and a real SQLite file, through the production Feast
definitions (feature_repo/definitions.py) and the HTTP app.

Already covered in tests/serving/test_serving_app.py (not repeated here): a Redis address where
nothing ever listened -> 503, and a SQLite store locked by another process -> 503, then recovery.
Added here, because production meets them and nothing else proves them:
- Redis dies in the middle of traffic and comes back on the same port: every answer in between is
  either correct or an explicit 503 (never a 500, never a silent cold start), /health flips to
  degraded and back, and the same resolver object recovers without a restart.
- Redis comes back EMPTY (no persistence): a subject item it no longer knows is a 404 that names
  the item, a user without a state is flagged cold_start/no_state (never a stale or unflagged
  answer); after re-writing the features the answers equal the pre-outage ones exactly.
- The SQLite online-store file is missing (materialize never ran, wrong path): 503 + degraded
  health, never a 200 that serves every user as a cold start.
"""
from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Dict, Iterator, List

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient

import ctt_contracts as C
from pipelines import feast_ops

pytestmark = pytest.mark.integration

REDIS = shutil.which("redis-server")
N_USERS = 12
N_ITEMS = 300
SUBJECT = 100  # first catalog item
DOWN_REQUESTS = 3  # each one waits out redis-py's retry backoff (~4 s): keep the count small
FAIL_BOUND_S = 30.0


@dataclass
class Model:
    bundle: object
    index: object
    catalog: pd.DataFrame
    states: pd.DataFrame
    profiles: pd.DataFrame
    items: pd.DataFrame


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throwaway redis-server on 127.0.0.1, no persistence, restartable on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.port = _free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 20.0) -> None:
        self.proc = subprocess.Popen(
            [REDIS, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while not self._pong():
            assert self.proc.poll() is None, "redis-server exited at start-up"
            assert time.monotonic() < deadline, "redis-server did not answer PING"
            time.sleep(0.05)

    def _pong(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5).ping())
        except redis.exceptions.ConnectionError:
            return False

    def kill(self) -> None:
        """SIGKILL: the abrupt death (OOM killer, node loss), no graceful client disconnects."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Model:
    """A tiny exported bundle + exact index + the online rows (untrained: the path is tested)."""
    from models.export import export_bundle, load_bundle
    from models.two_tower import ContextualTwoTower, ModelConfig
    from serving.index import build_index

    root = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    config = ModelConfig(dim=16, n_layers=1, n_heads=2, max_len=8, item_buckets=512,
                         category_buckets=64, n_hashes=2, country_buckets=8, max_ctx=4,
                         max_item_categories=5, mlp_hidden=32, dropout=0.0)
    net = ContextualTwoTower(config).eval()
    rng = np.random.default_rng(0)
    cats = [rng.choice(40, size=int(rng.integers(1, 5)), replace=False).tolist()
            for _ in range(N_ITEMS)]
    catalog = pd.DataFrame({
        C.ITEM_ID: np.arange(N_ITEMS, dtype=np.int64) + SUBJECT,
        C.CATEGORY_IDS: cats,
        C.CATEGORY_WEIGHTS: [sorted(rng.uniform(0.1, 1.0, len(c)).tolist(), reverse=True)
                             for c in cats],
        C.ADVERTISER_ID: np.zeros(N_ITEMS, dtype=np.int64)})
    bundle = load_bundle(export_bundle(net, config, catalog, root / "bundle", "reliability"))
    index = build_index(bundle.item_ids, bundle.item_embeddings, bundle.model_version,
                        root / "index")
    now = datetime.now(timezone.utc)
    users = np.arange(1, N_USERS + 1, dtype=np.int64)
    states = pd.DataFrame({
        C.USER_ID: users,
        C.HIDDEN_STATE: [rng.normal(size=net.state_dim).astype(np.float32).tolist()
                         for _ in users],
        C.MODEL_VERSION: bundle.model_version, C.SEQUENCE_HASH: "h",
        C.STATE_TS: now - timedelta(hours=1)})
    profiles = pd.DataFrame({C.USER_ID: users, C.AGE_BUCKET: (users % C.AGE_BUCKETS),
                             C.COUNTRY: "DE", C.GENDER: "f", C.FEATURE_TS: now})
    items = catalog[[C.ITEM_ID, C.CATEGORY_IDS, C.CATEGORY_WEIGHTS]].assign(
        **{C.FEATURE_TS: now})
    return Model(bundle, index, catalog, states, profiles, items)


def write_online(store, m: Model) -> None:
    """What `feast materialize` does, minus the offline read: the rows go to the online store."""
    store.write_to_online_store(C.FV_USER_SEQUENCE_STATE, m.states)
    store.write_to_online_store(C.FV_USER_PROFILE, m.profiles)
    store.write_to_online_store(C.FV_ITEM_CATEGORIES, m.items)


def feast_store(tmp: Path, online_yaml: str):
    """The production feature_repo definitions applied to a registry in `tmp`, with the given
    online store section (the project's redis.yaml hard-codes port 6379)."""
    data = tmp / "feast_data"
    data.mkdir(parents=True, exist_ok=True)
    yaml = tmp / "feature_store.yaml"
    yaml.write_text(f"project: ctt\nprovider: local\nregistry: {data}/registry.db\n"
                    f"offline_store:\n  type: file\nonline_store:\n{online_yaml}"
                    "entity_key_serialization_version: 3\n")
    lake = tmp / "lake"
    store = feast_ops.feature_store(lake, data, fs_yaml_file=yaml)
    with feast_ops.feast_env(lake, data):
        store.apply(feast_ops.repo_objects())
    return store


def _client(m: Model, store) -> TestClient:
    from serving.app import create_app
    from serving.resolver import Resolver

    return TestClient(create_app(Resolver(m.bundle, m.index, store)),
                      raise_server_exceptions=False)


def _ask(client: TestClient, user: int) -> Dict:
    r = client.post("/recommend", json={C.USER_ID: user, C.SUBJECT_ITEM_ID: SUBJECT, "k": 10})
    return {"status": r.status_code, **r.json()}


@pytest.fixture
def redis_server(tmp_path, require_service) -> Iterator[RedisServer]:
    require_service("redis-server", "a real Redis online store")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


def test_redis_dies_mid_traffic_and_comes_back_on_the_same_port(model, redis_server, tmp_path):
    store = feast_store(tmp_path, "  type: redis\n  redis_type: redis\n"
                                  f"  connection_string: \"127.0.0.1:{redis_server.port}\"\n")
    write_online(store, model)
    statuses: List[int] = []
    with _client(model, store) as client:
        before = {u: _ask(client, u) for u in range(1, N_USERS + 1)}
        assert all(a["status"] == 200 and not a["cold_start"] for a in before.values())
        assert client.get("/health").json()["online_store"]["reachable"] is True

        failing_s: List[float] = []
        for step in range(N_USERS + DOWN_REQUESTS):  # traffic; the store dies on the way
            if step == N_USERS:
                redis_server.kill()
            t0 = time.perf_counter()
            answer = _ask(client, 1 + step % N_USERS)
            if step >= N_USERS:
                failing_s.append(time.perf_counter() - t0)
            statuses.append(answer["status"])
            if answer["status"] == 200:
                assert answer["items"] == before[1 + step % N_USERS]["items"]
            else:
                assert answer["error"] == "online_store_unavailable", answer
                assert str(redis_server.port) in answer["detail"]
        assert statuses[:N_USERS] == [200] * N_USERS and set(statuses[N_USERS:]) == {503}
        # redis-py's default retries (3, exponential backoff) make each failing call wait a few
        # seconds before the 503; bounded, not a hang (printed for the README reliability table)
        print(f"503 latency while Redis is down: {[round(x, 2) for x in failing_s]} s")
        assert max(failing_s) < FAIL_BOUND_S
        health = client.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "degraded"
        assert health.json()["online_store"]["reachable"] is False

        redis_server.start()  # same port, empty: no persistence
        assert client.get("/health").status_code == 200  # same resolver, no restart
        no_item = _ask(client, 1)  # the subject item's categories are gone too: said so
        assert no_item["status"] == 404 and str(SUBJECT) in no_item["detail"], no_item
        empty = client.post("/recommend", json={C.USER_ID: 1, "k": 10}).json()
        assert (empty["cold_start"], empty["cold_start_reason"]) == (True, "no_state")
        assert empty["state_model_version"] is None  # visibly not the user's state

        write_online(store, model)  # re-materialize
        after = {u: _ask(client, u) for u in range(1, N_USERS + 1)}
    for u in before:
        assert after[u]["status"] == 200 and not after[u]["cold_start"]
        assert after[u]["items"] == before[u]["items"]


def test_missing_sqlite_online_store_is_503_not_a_cold_start(model, tmp_path):
    db = tmp_path / "feast_data" / "online_store.db"
    store = feast_store(tmp_path, f"  type: sqlite\n  path: {db}\n")
    write_online(store, model)
    with _client(model, store) as client:
        assert _ask(client, 1)["status"] == 200
    db.unlink()  # deleted by a clean-up job, or the path points at a fresh volume
    restarted = feast_ops.feature_store(tmp_path / "lake", tmp_path / "feast_data",
                                        fs_yaml_file=tmp_path / "feature_store.yaml")
    with _client(model, restarted) as client:
        answer = _ask(client, 1)
        assert answer["status"] == 503, answer
        assert answer["error"] == "online_store_unavailable"
        assert "missing" in answer["detail"] and str(db) in answer["detail"]
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["online_store"]["reachable"] is False
    assert not db.exists(), "serving recreated the missing store as an empty database"
