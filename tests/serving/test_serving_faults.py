"""Faults met while serving, over HTTP: store file replaced or deleted, registry corrupted, bad
numbers, oversized bodies, unexpected exceptions - each answered with the status it deserves, in
the one error shape, without a restart and without losing the keep-alive connection.

The store tests run on private copies of the session's Feast registry and SQLite online store, so
the files can be replaced, deleted and corrupted without touching the other tests' store.
"""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pandas as pd
import pytest
import uvicorn
from conftest import STALE_VERSION, UNKNOWN_ITEM
from fastapi.testclient import TestClient

import ctt_contracts as C
from serving.app import DEFAULT_MAX_BODY_BYTES, create_app
from serving.errors import BadRequestError
from serving.resolver import MAX_CATEGORY_ID, Resolver

ERROR_KEYS = {"error", "detail", "fields"}
USER = 1  # has a state of the loaded model version in the session store
BAD_PROFILE_USER = 977  # gets a stored gender outside the vocabulary: a 500 with a message
REGISTRY_TTL_S = 1


def assert_error(resp: httpx.Response, status: int, code: str) -> dict:
    """The one error shape: {"error": code, "detail": non-empty str, "fields": list}."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == ERROR_KEYS, body
    assert body["error"] == code, body
    assert isinstance(body["detail"], str) and body["detail"], body
    assert isinstance(body["fields"], list) and all(set(f) == {"loc", "msg"} for f in body["fields"])
    assert "Traceback" not in resp.text
    return body


# ---------------------------------------------------------------------- fixtures
@dataclass
class PrivateStore:
    repo: Path
    registry: Path
    online: Path


def _repo_yaml(repo: Path, registry: Path, online: Path) -> None:
    repo.mkdir(parents=True, exist_ok=True)
    (repo / "feature_store.yaml").write_text(
        f"project: ctt_serving_test\nprovider: local\n"
        f"registry:\n  path: {registry}\n  cache_ttl_seconds: {REGISTRY_TTL_S}\n"
        f"online_store:\n  type: sqlite\n  path: {online}\n"
        f"entity_key_serialization_version: 3\n")


@pytest.fixture
def private_store(serving_env, tmp_path) -> PrivateStore:
    """Copies of the session's registry.db and online.db behind their own feature_store.yaml
    (registry cache of 1 s so a changed registry is re-read within the test)."""
    src = serving_env.repo_dir.parent
    registry, online = tmp_path / "registry.db", tmp_path / "online.db"
    shutil.copy(src / "registry.db", registry)
    shutil.copy(src / "online.db", online)
    _repo_yaml(tmp_path / "repo", registry, online)
    return PrivateStore(tmp_path / "repo", registry, online)


def _resolver_on(resolver: Resolver, store: PrivateStore) -> Resolver:
    from feast import FeatureStore

    return Resolver(resolver.bundle, resolver.index, FeatureStore(repo_path=str(store.repo)))


@pytest.fixture(scope="module")
def client(resolver) -> Iterator[TestClient]:
    with TestClient(create_app(resolver), raise_server_exceptions=False) as c:
        yield c


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """The app under a real uvicorn on 127.0.0.1, in a thread of this process."""

    def __init__(self, app) -> None:
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                   log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


def _client_port(resp: httpx.Response) -> int:
    """Local port of the TCP connection that carried `resp` (same port = same connection)."""
    return resp.extensions["network_stream"].get_extra_info("client_addr")[1]


def _ask(http, user: int = USER, **extra) -> httpx.Response:
    return http.post("/recommend", json={C.USER_ID: user, "k": 5, **extra})


# ---------------------------------------------------------------------- store changes
def _write_state(repo: Path, online: Path, registry: Path, user: int, version: str,
                 state_dim: int) -> None:
    """What a rebuild writes: a state row for `user` into the SQLite file `online`."""
    from feast import FeatureStore

    writer_repo = online.parent / f"writer_{online.stem}"
    _repo_yaml(writer_repo, registry, online)
    rows = pd.DataFrame({C.USER_ID: np.asarray([user], dtype=np.int64),
                         C.HIDDEN_STATE: [np.zeros(state_dim, dtype=np.float32).tolist()],
                         C.MODEL_VERSION: [version], C.SEQUENCE_HASH: ["rebuilt"],
                         C.STATE_TS: [datetime.now(timezone.utc)]})
    FeatureStore(repo_path=str(writer_repo)).write_to_online_store(C.FV_USER_SEQUENCE_STATE, rows)


def test_replaced_store_file_is_reopened_and_a_deleted_one_is_503(resolver, private_store,
                                                                 tmp_path):
    """A rebuild renamed over the live file is served at once (the old handle would keep
    reading the old inode); a deleted file is 503 + degraded /health and is not recreated as an
    empty database; putting the file back serves again - one resolver, no restart."""
    served = _resolver_on(resolver, private_store)
    original = tmp_path / "online.backup.db"
    shutil.copy(private_store.online, original)
    with TestClient(create_app(served), raise_server_exceptions=False) as c:
        before = _ask(c)
        assert before.status_code == 200 and before.json()["cold_start"] is False
        assert c.get("/health").json()["online_store"]["reopened"] == 0

        rebuilt = tmp_path / "online.rebuilt.db"
        shutil.copy(private_store.online, rebuilt)
        _write_state(private_store.repo, rebuilt, private_store.registry, USER, STALE_VERSION,
                     served.model.state_dim)
        os.replace(rebuilt, private_store.online)  # atomic swap, as a rebuild does it
        swapped = _ask(c)
        assert_error(swapped, 409, "version_skew")  # the new file's row, not the old inode's
        assert STALE_VERSION in swapped.json()["detail"]
        assert c.get("/health").json()["online_store"]["reopened"] == 1

        private_store.online.unlink()
        gone = assert_error(_ask(c), 503, "online_store_unavailable")
        assert "missing" in gone["detail"] and str(private_store.online) in gone["detail"]
        health = c.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "degraded"
        assert health.json()["online_store"]["reachable"] is False
        assert not private_store.online.exists(), "a request recreated the deleted store file"

        shutil.copy(original, private_store.online)
        back = _ask(c)
        assert back.status_code == 200 and back.json()["cold_start"] is False
        assert [i for i, _ in back.json()["items"]] == [i for i, _ in before.json()["items"]]
        assert c.get("/health").status_code == 200


def test_store_written_in_place_is_seen(resolver, private_store):
    """Same inode, new rows (materialize into the live file): the next answer uses them."""
    served = _resolver_on(resolver, private_store)
    with TestClient(create_app(served), raise_server_exceptions=False) as c:
        assert _ask(c).status_code == 200
        _write_state(private_store.repo, private_store.online, private_store.registry, USER,
                     STALE_VERSION, served.model.state_dim)
        assert_error(_ask(c), 409, "version_skew")


def test_corrupt_registry_is_503_and_degraded_then_recovers(resolver, private_store):
    """registry.db corrupted under a running server: once the registry cache expires every
    request is a 503 online_store_unavailable (not a 500 DecodeError) and /health is degraded;
    the restored file is served again without a restart."""
    served = _resolver_on(resolver, private_store)
    good = private_store.registry.read_bytes()
    with TestClient(create_app(served), raise_server_exceptions=False) as c:
        assert _ask(c).status_code == 200
        for corrupt in (good[: len(good) // 2], b""):  # truncated (DecodeError), emptied
            private_store.registry.write_bytes(corrupt)
            time.sleep(REGISTRY_TTL_S + 0.3)
            assert_error(_ask(c), 503, "online_store_unavailable")
            health = c.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "degraded"
        private_store.registry.write_bytes(good)
        time.sleep(REGISTRY_TTL_S + 0.3)
        assert _ask(c).status_code == 200 and c.get("/health").status_code == 200


# ---------------------------------------------------------------------- numbers
@pytest.mark.parametrize("categories, says", [
    ([[2**63, 0.5]], "less than or equal to"),  # beyond int64: was a 500 OverflowError
    ([[2**64 + 5, 0.5]], "less than or equal to"),
    ([[MAX_CATEGORY_ID + 1, 0.5]], "less than or equal to"),  # beyond the lake's int32 ids
    ([[-3, 0.5]], "greater than or equal to"),
    ([[3, 1e308], [4, 1e308]], "overflow"),  # each finite, the sum is not: was silently no context
])
def test_bad_numbers_are_422(client, categories, says):
    body = assert_error(client.post("/recommend", json={C.USER_ID: USER, "categories": categories}),
                        422, "invalid_request")
    assert body["fields"] and says in body["detail"]
    if says != "overflow":
        assert body["fields"][0]["loc"] == ["body", "categories", "0", "0"]


@pytest.mark.parametrize("weight", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_non_finite_weights_are_422(client, weight):
    raw = b'{"user_id": 1, "categories": [[3, 0.5], [4, ' + weight + b']]}'
    body = assert_error(client.post("/recommend", content=raw,
                                    headers={"content-type": "application/json"}),
                        422, "invalid_request")
    assert "finite" in body["detail"]


def test_resolver_refuses_the_same_numbers(resolver):
    """Direct Python callers (notebooks, batch scripts) get a 400-class error, not a silent
    zero context or an OverflowError."""
    with pytest.raises(BadRequestError, match="category ids"):
        resolver.recommend(USER, categories=[(2**63, 0.5)])
    with pytest.raises(BadRequestError, match="finite"):
        resolver.recommend(USER, categories=[(3, 1e308), (4, 1e308)])
    with pytest.raises(BadRequestError, match="finite"):
        resolver.recommend(USER, categories=[(3, float("nan"))])


def test_large_but_valid_weights_keep_their_context(client):
    """Weights only matter relative to each other: 1e300 and 3e300 is the same context as 1:3."""
    big = client.post("/recommend", json={C.USER_ID: USER, "categories": [[3, 1e300], [4, 3e300]],
                                          "k": 10, "exact": True}).json()
    small = client.post("/recommend", json={C.USER_ID: USER, "categories": [[3, 0.25], [4, 0.75]],
                                            "k": 10, "exact": True}).json()
    none = client.post("/recommend", json={C.USER_ID: USER, "k": 10, "exact": True}).json()
    assert big["context_source"] == "explicit" and big["items"] == small["items"]
    assert big["items"] != none["items"]


# ---------------------------------------------------------------------- one error shape
@pytest.mark.parametrize("method, path, kwargs, status, code", [
    ("post", "/recommend", {"json": {C.USER_ID: "abc"}}, 422, "invalid_request"),
    ("post", "/recommend", {"json": {}}, 422, "invalid_request"),
    ("post", "/recommend", {"content": b"{not json"}, 422, "invalid_request"),
    ("post", "/recommend", {"content": b"\xff\xfe{\x00"}, 422, "invalid_request"),  # not text
    ("post", "/recommend", {"content": b""}, 422, "invalid_request"),
    ("post", "/recommend", {"content": b"[1, 2]"}, 422, "invalid_request"),
    ("post", "/recommend", {"json": {C.USER_ID: USER, "categories": [[1, -1.0]]}}, 400,
     "bad_request"),
    ("post", "/recommend", {"json": {C.USER_ID: USER, C.SUBJECT_ITEM_ID: UNKNOWN_ITEM}}, 404,
     "unknown_subject_item"),
    ("post", "/recommend", {"content": b" " * (DEFAULT_MAX_BODY_BYTES + 1)}, 413,
     "request_too_large"),
    ("get", "/recommend", {}, 405, "method_not_allowed"),
    ("get", "/no-such-route", {}, 404, "not_found"),
])
def test_every_error_has_one_shape(client, method, path, kwargs, status, code):
    headers = {"content-type": "application/json"} if "content" in kwargs else {}
    body = assert_error(getattr(client, method)(path, headers=headers, **kwargs), status, code)
    if status == 422:
        assert body["fields"] and body["fields"][0]["loc"][0] == "body"


# ---------------------------------------------------------------------- body limit, real socket
def test_body_limit_answers_413_before_parsing(resolver):
    """Over a real socket: a declared or chunked body above the limit is 413 - even when it is
    not JSON at all, so nothing parsed it -, a body under it is served, and the limit is a
    parameter (ctt-serve --max-body-bytes)."""
    limit = 2048
    valid = b'{"user_id": 1, "k": 3}'
    with LiveServer(create_app(resolver, max_body_bytes=limit)) as base:
        with httpx.Client(base_url=base, timeout=30,
                          headers={"content-type": "application/json"}) as http:
            assert http.post("/recommend", content=valid + b" " * (limit - len(valid))
                             ).status_code == 200
            assert_error(http.post("/recommend", content=valid + b" " * (limit + 1 - len(valid))),
                         413, "request_too_large")
        with httpx.Client(base_url=base, timeout=30,
                          headers={"content-type": "application/json"}) as http:
            big = assert_error(http.post("/recommend", content=b"\x00garbage" * 4096), 413,
                               "request_too_large")
            assert str(limit) in big["detail"]

        def chunks():
            for _ in range(8):
                yield b" " * 1024

        with httpx.Client(base_url=base, timeout=30,
                          headers={"content-type": "application/json"}) as http:
            resp = http.post("/recommend", content=chunks())
            assert resp.request.headers.get("transfer-encoding") == "chunked"
            assert_error(resp, 413, "request_too_large")


# ---------------------------------------------------------------------- 500 keeps the connection
def test_a_500_keeps_the_keep_alive_connection(resolver, private_store):
    """One httpx client, one TCP connection: a request failing with 500 (a bad stored feature,
    then an unexpected exception) is followed by succeeding requests on the same connection."""
    from feast import FeatureStore

    FeatureStore(repo_path=str(private_store.repo)).write_to_online_store(
        C.FV_USER_PROFILE, pd.DataFrame({
            C.USER_ID: np.asarray([BAD_PROFILE_USER], dtype=np.int64),
            C.AGE_BUCKET: np.asarray([1], dtype=np.int32), C.COUNTRY: ["US"],
            C.GENDER: ["robot"], C.FEATURE_TS: [datetime.now(timezone.utc)]}))
    app = create_app(_resolver_on(resolver, private_store))

    def explode() -> None:
        raise RuntimeError("a bug nobody anticipated")

    app.add_api_route("/explode", explode)  # the real middleware stack; only the route is extra
    with LiveServer(app) as base, httpx.Client(base_url=base, timeout=30) as http:
        first = _ask(http)
        assert first.status_code == 200
        port = _client_port(first)

        stored = assert_error(_ask(http, BAD_PROFILE_USER), 500, "bad_stored_feature")
        assert "robot" in stored["detail"]
        after_stored = _ask(http)
        assert after_stored.status_code == 200 and _client_port(after_stored) == port

        bug = assert_error(http.get("/explode"), 500, "internal_error")
        assert "RuntimeError" in bug["detail"]
        after_bug = _ask(http)
        assert after_bug.status_code == 200 and _client_port(after_bug) == port
        assert after_bug.json()["items"] == first.json()["items"]
