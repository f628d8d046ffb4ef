"""The daily refresh end to end, while a resolver is serving: a day of new events for some users
-> `python jobs/refresh.py` (build_sequences -> batch inference -> Feast snapshots ->
materialize-incremental, a separate process, as a scheduler runs it) -> the SAME resolver object
(no restart) serves the new states.

What is proven, each part able to fail on its own:
- only the affected users were re-encoded (the job's counts, and by id: everyone else keeps the
  exact state and state_ts, in Delta and in the online store);
- the online store returns the new states (equal to Delta);
- the affected users' answers equal the FULL model forward (encoder + head, no cached state) on
  their new history rebuilt from the raw log alone (query within 1e-4, same top-k), and differ
  from their answers before the refresh; the unaffected users' answers are bit-identical.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import refresh_lake as RL

import ctt_contracts as C
from pipelines import feast_ops
from pipelines.refresh import run_refresh

pytestmark = [pytest.mark.spark, pytest.mark.integration, pytest.mark.slow]  # 160-270 s on 2 shared cores

REPO = Path(__file__).resolve().parents[2]
N_USERS = 40
AFFECTED = 8  # 20 % of the users get a new day of events
JOB_TIMEOUT_S = 900


def _env() -> dict:
    return {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
            "SPARK_LOCAL_IP": "127.0.0.1", "PYTHONPATH": str(REPO)}


def _answers(resolver, users):
    """user -> (query (D,), [(item, score)]) for the fixed explicit context."""
    out = {}
    for u in users:
        q = resolver.query_embedding(int(u), categories=RL.CONTEXT)
        r = resolver.recommend(int(u), categories=RL.CONTEXT, k=RL.K)
        assert not r.cold_start and r.state_model_version == resolver.model_version, r
        out[u] = (q, r.items)
    return out


def test_daily_refresh_touches_only_affected_users_and_the_live_resolver_serves_them(
        spark, tmp_path):
    with RL.local_delta(spark):
        _refresh_scenario(spark, tmp_path)


def _refresh_scenario(spark, tmp_path) -> None:
    from models.export import load_bundle
    from serving.index import build_index
    from serving.resolver import Resolver

    lake, data = str(tmp_path / "lake"), tmp_path / "feast"
    start = datetime.now(timezone.utc).replace(microsecond=0)
    users = [10 * u for u in range(1, N_USERS + 1)]
    profiles = RL.users_frame(users).set_index(C.USER_ID)
    base = RL.events(users, start - timedelta(days=30), start - timedelta(days=2), (2, 15), seed=1)
    RL.write_raw(spark, lake, base, profiles.reset_index())
    bundle_dir = RL.export_bundle(tmp_path, "refresh-model", seed=0)

    first = run_refresh(spark, lake, bundle_dir, data, apply=True)
    assert first.inference.encoded == N_USERS and first.materialized.full
    bundle = load_bundle(bundle_dir)
    index = build_index(bundle.item_ids, bundle.item_embeddings, bundle.model_version,
                        tmp_path / "index")
    resolver = Resolver(bundle, index, feast_ops.feature_store(lake, data))
    store = feast_ops.feature_store(lake, data)
    before = _answers(resolver, users)
    delta_before = RL.delta_states(lake)
    online_before = RL.online_states(store, users)
    assert sorted(online_before) == users

    # a day of new events for a subset of users, appended to the raw log
    rng = np.random.default_rng(7)
    affected = sorted(int(u) for u in rng.choice(users, size=AFFECTED, replace=False))
    day = RL.events(affected, start - timedelta(days=1), start - timedelta(hours=1), (1, 3), seed=9)
    RL.write_raw(spark, lake, day, mode="append")

    done = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "refresh.py"), "--lake", lake, "--bundle",
         str(bundle_dir), "--feast-data", str(data), "--master", "local[2]",
         "--shuffle-partitions", "4", "--batch-size", "16"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    out = done.stdout
    # what each step touched, as printed for the operator
    assert re.search(rf"user_sequences v\d+: \+0 ~{AFFECTED} -0 users", out), out
    assert f"encoded {AFFECTED} (new 0, changed {AFFECTED}, model 0), deleted 0" in out, out
    assert "; incremental: change feed of user_sequences" in out, out  # not a full join
    assert "materialize-incremental" in out and "first fill" not in out, out
    assert f"{AFFECTED} user states in the window" in out, out

    # Delta: exactly the affected users got a new state_ts; the others are untouched
    delta_after = RL.delta_states(lake)
    assert sorted(delta_after.index) == users
    moved = sorted(int(u) for u in users
                   if delta_after.loc[u, C.STATE_TS] != delta_before.loc[u, C.STATE_TS])
    assert moved == affected
    for u in users:
        same = np.array_equal(np.asarray(delta_after.loc[u, C.HIDDEN_STATE], np.float32),
                              np.asarray(delta_before.loc[u, C.HIDDEN_STATE], np.float32))
        assert same == (u not in affected), u

    # online store: new states for the affected users (equal to Delta), the others untouched
    online_after = RL.online_states(store, users)
    for u in users:
        vec, version, ts = online_after[u]
        assert version == bundle.model_version
        np.testing.assert_array_equal(vec, np.asarray(delta_after.loc[u, C.HIDDEN_STATE], np.float32))
        if u in affected:
            assert ts > online_before[u][2], u
        else:
            assert ts == online_before[u][2], u
            np.testing.assert_array_equal(vec, online_before[u][0])

    # the same resolver object, never restarted
    after = _answers(resolver, users)
    log = pd.concat([base, day], ignore_index=True)
    for u in users:
        q, items = after[u]
        if u in affected:
            q_ref, top_ref = RL.oracle(bundle_dir, RL.history(log, u), profiles.loc[u])
            np.testing.assert_allclose(q, q_ref, atol=1e-4, rtol=0)
            assert [i for i, _ in items] == top_ref, u
            assert not np.allclose(q, before[u][0], atol=1e-4), f"user {u}: answer did not change"
        else:
            np.testing.assert_array_equal(q, before[u][0])
            assert items == before[u][1], u
