"""Version-skew rollout: a new model is deployed while the old states are still being served.

The procedure under test (docs/operations.md, "Model rollout"): re-materialize, then switch.
1. `jobs/refresh.py --bundle NEW --feast-data <fresh folder> --new-model --apply`: batch inference
   re-encodes every user with the new model (real Spark), the snapshot is exported and
   materialized into a NEW online store (real Feast, its own registry + SQLite file);
2. a resolver for the new version is started on the new store and traffic is switched to it.

Proven with real components: while step 1 runs, the old resolver keeps answering (from another
thread, continuously) exactly what it answered before, from its own version's states; after the
switch the new resolver answers what the new model's full forward gives on each user's history;
no answer, before, during or after, pairs a state with a head of another version. The guards
that keep operators on this path refuse, before any work, a rollout into the live store and an
unflagged refresh with a new bundle; a resolver pointed at the wrong store answers 409 over HTTP.
"""
from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import refresh_lake as RL

import ctt_contracts as C
from pipelines import feast_ops
from pipelines.refresh import (RolloutError, check_versions, mark_store, run_refresh,
                               store_is_fresh, store_version)

N_USERS = 30


# ------------------------------------------------------------------ the guards, pure (fast)
def test_guard_refuses_other_version_states_into_a_marked_store():
    with pytest.raises(RolloutError, match="serves model_version 'a-1'"):
        check_versions("b-2", {"a-1"}, "a-1", False, new_model=True)
    with pytest.raises(RolloutError, match="serves model_version 'a-1'"):
        check_versions("b-2", set(), "a-1", False, new_model=False)


def test_guard_requires_new_model_flag_and_a_fresh_folder_to_reencode_everyone():
    with pytest.raises(RolloutError, match="--new-model"):
        check_versions("b-2", {"a-1"}, None, True, new_model=False)
    with pytest.raises(RolloutError, match="fresh Feast data folder"):
        check_versions("b-2", {"a-1"}, None, False, new_model=True)
    check_versions("b-2", {"a-1"}, None, True, new_model=True)  # rollout into a fresh folder
    check_versions("b-2", {"a-1", "b-2"}, "b-2", False, new_model=True)  # retry / rollback
    check_versions("a-1", {"a-1"}, "a-1", False, new_model=False)  # the daily refresh
    check_versions("a-1", set(), None, True, new_model=False)  # the very first fill


def test_store_marker_round_trip_and_empty_marker_is_an_error(tmp_path):
    assert store_version(tmp_path) is None and store_is_fresh(tmp_path)
    mark_store(tmp_path / "f", "a-1")
    assert store_version(tmp_path / "f") == "a-1"
    (tmp_path / "f" / "ctt_model_version").write_text("\n")
    with pytest.raises(RolloutError, match="empty"):
        store_version(tmp_path / "f")


# ------------------------------------------------------------------ one Redis db, two versions
def _redis_yaml(path: Path, port: int, db: int) -> Path:
    """feature_repo/redis.yaml with the test server's port and a db number."""
    text = (feast_ops.FEATURE_REPO / "redis.yaml").read_text()
    assert '"127.0.0.1:6379"' in text
    path.write_text(text.replace('"127.0.0.1:6379"', f'"127.0.0.1:{port},db={db}"'))
    return path


@pytest.mark.spark
@pytest.mark.integration
def test_rollout_into_a_redis_db_another_version_uses_is_refused(spark, tmp_path, require_service):
    """Two Feast data folders whose yaml point at the same Redis db share one keyspace; the folder
    markers cannot see that. The first refresh claims the db for its version before any work;
    a rollout of another version into that db (from a fresh folder, with --new-model) is then
    refused before any work, the claim untouched; another db of the same Redis is fine."""
    from test_reliability_online_store import RedisServer

    from models.export import load_bundle
    from pipelines.refresh import claim_redis_store, redis_store_version

    require_service("redis-server", "a real Redis online store")
    server = RedisServer(tmp_path)
    server.start()
    try:
        lake = str(tmp_path / "lake")  # no tables: every refresh here stops before Spark work
        old_dir = RL.export_bundle(tmp_path, "model-old", seed=0)
        new_dir = RL.export_bundle(tmp_path, "model-new", seed=1)
        old_v, new_v = (load_bundle(d).model_version for d in (old_dir, new_dir))
        data_old, data_new = tmp_path / "feast" / "old", tmp_path / "feast" / "new"
        db0_old = _redis_yaml(tmp_path / "old.yaml", server.port, 0)
        db0_new = _redis_yaml(tmp_path / "new-db0.yaml", server.port, 0)
        db1_new = _redis_yaml(tmp_path / "new-db1.yaml", server.port, 1)

        # the old version's first refresh into Redis db 0 claims it, then needs raw tables
        with pytest.raises(FileNotFoundError, match=C.T_RAW_EVENTS):
            run_refresh(spark, lake, old_dir, data_old, apply=True, fs_yaml_file=db0_old)
        store_db0 = feast_ops.feature_store(lake, data_old, fs_yaml_file=db0_old)
        assert redis_store_version(store_db0) == {"model_version": old_v,
                                                  "feast_data": str(data_old.resolve())}

        # the rollout of the new version into a fresh folder that points at the same db: refused
        files = sorted((tmp_path / "lake").rglob("*"))
        with pytest.raises(RolloutError, match=f"already holds the states of model_version '{old_v}'"):
            run_refresh(spark, lake, new_dir, data_new, new_model=True, apply=True,
                        fs_yaml_file=db0_new)
        assert store_is_fresh(data_new) and store_version(data_new) is None
        assert redis_store_version(store_db0)["model_version"] == old_v
        assert sorted((tmp_path / "lake").rglob("*")) == files  # nothing ran: not even the lease

        # its own db is fine (claimed for the new version); the old version's retry still is
        store_db1 = feast_ops.feature_store(lake, data_new, fs_yaml_file=db1_new)
        claim_redis_store(store_db1, new_v, data_new)
        assert redis_store_version(store_db1)["model_version"] == new_v
        claim_redis_store(store_db0, old_v, data_old)
    finally:
        server.kill()


# ------------------------------------------------------------------ the whole sequence
class Traffic(threading.Thread):
    """Requests to one resolver in a loop until stopped; keeps every answer or error."""

    def __init__(self, resolver, users) -> None:
        super().__init__(daemon=True)
        self.resolver, self.users = resolver, users
        self.stop = threading.Event()
        self.answers: list = []
        self.errors: list = []

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            u = self.users[i % len(self.users)]
            try:
                self.answers.append((u, self.resolver.recommend(u, categories=RL.CONTEXT, k=RL.K)))
            except Exception as exc:  # noqa: BLE001 - recorded and asserted on, never swallowed
                self.errors.append((u, repr(exc)))
            i += 1
            self.stop.wait(0.02)


def _resolver(bundle_dir: Path, index_dir: Path, lake: str, data: Path):
    from models.export import load_bundle
    from serving.index import build_index
    from serving.resolver import Resolver

    bundle = load_bundle(bundle_dir)
    index = build_index(bundle.item_ids, bundle.item_embeddings, bundle.model_version, index_dir)
    return Resolver(bundle, index, feast_ops.feature_store(lake, data))


@pytest.mark.spark
@pytest.mark.integration
@pytest.mark.slow  # 105-195 s on 2 shared cores: two builds, two batch inferences, two stores
def test_rollout_rematerialize_then_switch_never_mixes_versions(spark, tmp_path):
    with RL.local_delta(spark):
        _rollout_scenario(spark, tmp_path)


def _rollout_scenario(spark, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.errors import VersionSkewError

    lake = str(tmp_path / "lake")
    data_old, data_new = tmp_path / "feast" / "old", tmp_path / "feast" / "new"
    start = datetime.now(timezone.utc).replace(microsecond=0)
    users = [10 * u for u in range(1, N_USERS + 1)]
    profiles = RL.users_frame(users).set_index(C.USER_ID)
    log = RL.events(users, start - timedelta(days=30), start - timedelta(days=2), (2, 15), seed=3)
    RL.write_raw(spark, lake, log, profiles.reset_index())
    old_dir = RL.export_bundle(tmp_path, "model-old", seed=0)
    new_dir = RL.export_bundle(tmp_path, "model-new", seed=1)

    # in production: the old model's states, materialized, served
    run_refresh(spark, lake, old_dir, data_old, apply=True)
    old = _resolver(old_dir, tmp_path / "index-old", lake, data_old)
    before = {u: old.recommend(u, categories=RL.CONTEXT, k=RL.K).items for u in users}
    states_version = RL.delta_states(lake)
    assert set(states_version[C.MODEL_VERSION]) == {old.model_version}

    # the guards refuse the two wrong paths before touching anything
    with pytest.raises(RolloutError, match="serves model_version"):
        run_refresh(spark, lake, new_dir, data_old, new_model=True, apply=True)
    with pytest.raises(RolloutError, match="--new-model"):
        run_refresh(spark, lake, new_dir, data_new, apply=True)
    assert RL.delta_states(lake)[C.STATE_TS].equals(states_version[C.STATE_TS])
    assert store_is_fresh(data_new)

    # step 1 (re-materialize) while the old resolver keeps serving from another thread
    traffic = Traffic(old, users)
    traffic.start()
    try:
        result = run_refresh(spark, lake, new_dir, data_new, new_model=True, apply=True)
    finally:
        traffic.stop.set()
        traffic.join(timeout=60)
    assert not traffic.errors, traffic.errors[:3]
    assert len(traffic.answers) >= len(users), len(traffic.answers)  # it really served meanwhile
    for u, r in traffic.answers:
        assert r.model_version == r.state_model_version == old.model_version and not r.cold_start
        assert r.items == before[u], u  # exactly the old model's answer, never a mix
    assert result.inference.encoded == result.inference.model_changed == N_USERS
    assert result.materialized.full and result.materialized.states_in_window == N_USERS
    assert set(RL.delta_states(lake)[C.MODEL_VERSION]) == {result.model_version}
    assert store_version(data_old) != store_version(data_new) == result.model_version

    # the old resolver still answers as before (its store was never touched)
    for u in users:
        r = old.recommend(u, categories=RL.CONTEXT, k=RL.K)
        assert r.state_model_version == old.model_version and r.items == before[u]

    # a new-version resolver wired to the OLD store: refused, never mixed (409 over HTTP)
    from models.export import load_bundle

    miswired = _resolver(new_dir, tmp_path / "index-miswired", lake, data_old)
    with pytest.raises(VersionSkewError):
        miswired.recommend(users[0], categories=RL.CONTEXT, k=RL.K)
    http = TestClient(create_app(miswired))
    resp = http.post("/recommend", json={C.USER_ID: users[0], "categories": [list(c) for c in RL.CONTEXT],
                                         "k": RL.K})
    assert resp.status_code == 409, resp.text

    # step 2 (switch): the new resolver on the new store equals the new model's full forward
    new = _resolver(new_dir, tmp_path / "index-new", lake, data_new)
    assert new.model_version == result.model_version == load_bundle(new_dir).model_version
    changed = 0
    for u in users:
        r = new.recommend(u, categories=RL.CONTEXT, k=RL.K)
        assert r.model_version == r.state_model_version == new.model_version and not r.cold_start
        q_ref, top_ref = RL.oracle(new_dir, RL.history(log, u), profiles.loc[u])
        np.testing.assert_allclose(new.query_embedding(u, categories=RL.CONTEXT), q_ref,
                                   atol=1e-4, rtol=0)
        assert [i for i, _ in r.items] == top_ref, u
        changed += [i for i, _ in r.items] != [i for i, _ in before[u]]
    assert changed > 0  # the new model really answers differently from the old one

    # after the switch the old schedule is refused: the lake now holds the new version
    with pytest.raises(RolloutError, match="--new-model"):
        run_refresh(spark, lake, old_dir, data_old)
