"""The documented command line, end to end, once: spark-submit on a real multi-process cluster
(local-cluster: separate executor JVMs and Python workers, so nothing can lean on driver state)
-> user_states + Feast snapshots -> `feast apply` / `feast materialize` /
`feast materialize-incremental` run as subprocesses in feature_repo/ -> online vectors.
"""
from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from offline_lake import histories, read_states, reference_states, write_user_sequences, write_users_items

import ctt_contracts as C
from pipelines import feast_ops

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(argv, env, cwd=REPO):
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=1500)
    shown = " ".join(map(str, argv))
    assert done.returncode == 0, f"{shown} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout


def _iso(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S")


@pytest.mark.spark
@pytest.mark.integration
def test_spark_submit_local_cluster_then_feast_cli(spark, tmp_path, bundles):
    lake, data = tmp_path / "lake", tmp_path / "feast"
    hist = histories(30)
    write_user_sequences(spark, str(lake), hist)
    write_users_items(str(lake), sorted(hist))
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
           "SPARK_LOCAL_IP": "127.0.0.1", C.ENV_LAKE: str(lake),
           C.ENV_FEAST_DATA: str(data)}
    started = datetime.now(timezone.utc)

    out = _run([BIN / "spark-submit", "--master", "local-cluster[2,1,2048]", "jobs/batch_inference.py",
                "--lake", lake, "--bundle", bundles.first,
                "--batch-size", "8"], env)
    assert f"encoded {len(hist)} (new {len(hist)}" in out and "committed" in out
    exported = [ln.split() for ln in out.splitlines() if ln.strip().startswith(C.T_USER_STATES + " ")]
    assert exported and exported[-1][-1] == feast_ops.MODE_FULL  # a first export of the snapshot
    states = read_states(str(lake)).set_index(C.USER_ID)
    expected = reference_states(bundles.first, hist)
    for user, state in expected.items():
        np.testing.assert_allclose(np.asarray(states.loc[user, C.HIDDEN_STATE], np.float32), state,
                                   atol=1e-5, rtol=0)

    repo = feast_ops.FEATURE_REPO
    _run([BIN / "feast", "apply"], env, cwd=repo)
    assert (data / "registry.db").is_file()
    # a window that ends before the run: no state goes online
    _run([BIN / "feast", "materialize", _iso(started - timedelta(days=3)), _iso(started - timedelta(days=1))],
         env, cwd=repo)
    store = feast_ops.feature_store(lake, data)
    refs = [C.feature_ref(C.FV_USER_SEQUENCE_STATE, C.HIDDEN_STATE),
            C.feature_ref(C.FV_USER_SEQUENCE_STATE, C.MODEL_VERSION)]
    rows = [{C.USER_ID: u} for u in sorted(hist)]
    assert store.get_online_features(refs, rows).to_dict()[C.HIDDEN_STATE] == [None] * len(hist)

    _run([BIN / "feast", "materialize-incremental", _iso(datetime.now(timezone.utc) + timedelta(seconds=1))],
         env, cwd=repo)
    got = store.get_online_features(refs, rows).to_dict()
    for user, vec, version in zip(got[C.USER_ID], got[C.HIDDEN_STATE], got[C.MODEL_VERSION]):
        np.testing.assert_allclose(np.asarray(vec, np.float32),
                                   np.asarray(states.loc[user, C.HIDDEN_STATE], np.float32),
                                   atol=1e-6, rtol=0)
        assert version == states.loc[user, C.MODEL_VERSION]
