"""Overlapping runs of the same job on one lake (a double trigger, a retry that starts before
the first attempt died), as real processes with real local Spark.

Before: two `build_sequences` started together after an `ingest --mode append` both blind-
appended the new events and examples (duplicates for ever), and two first-run batch inferences
both appended every user's state. Claim proven here: of two runs started at the same instant one
commits and the other stops before writing anything (exit code 75, one line naming the holder),
and every table equals, row for row and Delta version for Delta version, the lake a single run
produces from the same starting copy. Tables are read back with delta-rs (not Spark).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pandas as pd
import pytest
import refresh_lake as RL
from test_reliability_jobs import assert_same_lake, lake_frames

import ctt_contracts as C
from models.lake_read import open_table, read_arrow
from pipelines import feast_ops
from pipelines.build import run_build_sequences
from pipelines.build_config import BuildConfig
from pipelines.cli import ingest_main, run_generate
from pipelines.lease import EXIT_CONTENDED
from pipelines.synthetic import SyntheticConfig

pytestmark = [pytest.mark.spark, pytest.mark.slow]  # ~5-9 min on 2 shared cores

REPO = Path(__file__).resolve().parents[2]
NOW = datetime(2025, 1, 1, tzinfo=timezone.utc)
LATE = "2024-12-02 10:00:00"  # after every generated event, before NOW
GEN = SyntheticConfig(n_users=150, n_items=400, malformed_frac=0.02, seed=11)
BUILD_OUTPUTS = (C.T_ITEMS, C.T_USERS, C.T_EVENTS, C.T_QUARANTINE, C.T_SEQUENCES,
                 C.T_CONTEXT_ROWS, C.T_USER_SEQUENCES)
JOB_TIMEOUT_S = 1500


def _env() -> Dict[str, str]:
    return {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
            "SPARK_LOCAL_IP": "127.0.0.1", "PYTHONPATH": str(REPO)}


def build_cmd(lake: str) -> List[str]:
    return [sys.executable, str(REPO / "jobs" / "build_sequences.py"), "--lake", lake,
            "--max-len", "5", "--shuffle-partitions", "4", "--now", NOW.isoformat(),
            "--master", "local[2]"]


def inference_cmd(lake: str, bundle: Path) -> List[str]:
    return [sys.executable, str(REPO / "jobs" / "batch_inference.py"), "--lake", lake,
            "--bundle", str(bundle), "--master", "local[2]"]


def run_together(cmds: List[List[str]], logs: Path) -> List[Tuple[int, str]]:
    """Start every command at once (each in its own process group); (exit code, stderr) each."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, cmd in enumerate(cmds):
        with open(logs / f"{i}.out", "wb") as out, open(logs / f"{i}.err", "wb") as err:
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=out, stderr=err,
                                          start_new_session=True))
    done = []
    for i, proc in enumerate(procs):
        proc.wait(timeout=JOB_TIMEOUT_S)
        done.append((proc.returncode, (logs / f"{i}.err").read_text(errors="replace")))
    return done


def versions(lake: str, tables) -> Dict[str, int]:
    return {t: int(open_table(C.LakePaths(lake).table(t)).version()) for t in tables}


def copy(src: str, dst: Path) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def assert_one_won(outcomes: List[Tuple[int, str]], job: str) -> None:
    """One run exited 0, the other was refused by the lease with exit code 75 and one line."""
    codes = sorted(rc for rc, _ in outcomes)
    assert codes == [0, EXIT_CONTENDED], [(rc, err[-3000:]) for rc, err in outcomes]
    refused = next(err for rc, err in outcomes if rc == EXIT_CONTENDED)
    (line,) = [x for x in refused.splitlines() if x.startswith(f"{job}: ")]
    assert "stopped before writing anything" in line and "Traceback" not in refused


@pytest.fixture(scope="module")
def appended_lake(spark, tmp_path_factory) -> str:
    """Generated, built once, then a CSV of new conversions ingested with --mode append."""
    root = tmp_path_factory.mktemp("overlap")
    lake = str(root / "lake")
    run_generate(spark, lake, GEN, partitions=2)
    run_build_sequences(spark, lake, BuildConfig(max_len=5), now=NOW)
    items = read_arrow(C.LakePaths(lake).table(C.T_ITEMS))[0].to_pandas()[C.ITEM_ID].to_numpy()
    rng = np.random.default_rng(4)
    users = rng.choice(np.arange(GEN.n_users), size=25, replace=False)
    csv = root / "day.csv"
    pd.DataFrame({"user": users, "item": rng.choice(items, size=len(users)), "action": "conversion",
                  "ts": LATE}).to_csv(csv, index=False)
    ingest_main(["--lake", lake, "--events", str(csv), "--user-col", "user", "--item-col", "item",
                 "--ts-col", "ts", "--ts-format", "yyyy-MM-dd HH:mm:ss", "--event-type-col",
                 "action", "--mode", "append"])
    return lake


def test_two_builds_started_together_equal_one_build(appended_lake, tmp_path):
    single = copy(appended_lake, tmp_path / "single")
    both = copy(appended_lake, tmp_path / "both")
    # the reference runs alongside (another lake, another lease): same machine load for all
    (ref, *pair) = run_together([build_cmd(single), build_cmd(both), build_cmd(both)],
                                tmp_path / "logs")
    assert ref[0] == 0, ref[1][-3000:]
    assert_one_won(pair, "build_sequences")
    assert_same_lake(lake_frames(both, BUILD_OUTPUTS), lake_frames(single, BUILD_OUTPUTS))
    assert versions(both, BUILD_OUTPUTS) == versions(single, BUILD_OUTPUTS)  # the loser: no commit
    new = read_arrow(C.LakePaths(both).table(C.T_EVENTS))[0].to_pandas()
    assert (new[C.EVENT_TS] == pd.Timestamp(LATE, tz="UTC")).sum() == 25  # once, not twice


def _states(lake: str) -> pd.DataFrame:
    df = read_arrow(C.LakePaths(lake).table(C.T_USER_STATES))[0].to_pandas()
    return df.sort_values(C.USER_ID).reset_index(drop=True)


def test_two_first_batch_inferences_started_together_equal_one(spark, appended_lake, tmp_path):
    built = str(tmp_path / "built")
    shutil.copytree(appended_lake, built)
    run_build_sequences(spark, built, BuildConfig(max_len=5), now=NOW)
    bundle = RL.export_bundle(tmp_path, "overlap-bundle", seed=0)
    single = copy(built, tmp_path / "single")
    both = copy(built, tmp_path / "both")
    (ref, *pair) = run_together([inference_cmd(single, bundle), inference_cmd(both, bundle),
                                 inference_cmd(both, bundle)], tmp_path / "logs")
    assert ref[0] == 0, ref[1][-3000:]
    assert_one_won(pair, "batch_inference")

    got, want = _states(both), _states(single)
    n_users = read_arrow(C.LakePaths(built).table(C.T_USER_SEQUENCES))[0].to_pandas()[C.USER_ID].nunique()
    assert len(want) == n_users > 0 and got[C.USER_ID].is_unique
    for col in (C.USER_ID, C.MODEL_VERSION, C.SEQUENCE_HASH):
        assert got[col].tolist() == want[col].tolist(), col
    # state_ts differs between the runs (wall clock); the states are the same computation
    np.testing.assert_allclose(np.stack(got[C.HIDDEN_STATE]), np.stack(want[C.HIDDEN_STATE]),
                               atol=1e-6, rtol=0)
    assert versions(both, [C.T_USER_STATES]) == versions(single, [C.T_USER_STATES])
    snapshot = pd.read_parquet(C.feast_snapshot_path(both, C.T_USER_STATES))
    assert len(snapshot) == n_users and snapshot[C.USER_ID].is_unique  # the Feast export accepts it
