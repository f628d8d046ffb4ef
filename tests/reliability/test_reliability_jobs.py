"""The build job as a production scheduler runs it: as a separate process that can die at any
moment (node preemption, OOM killer, a deploy), and on more than one executor.

Why subprocesses and SIGKILL: an in-process exception runs `finally` blocks and Spark's shutdown
hooks; SIGKILL to the whole process group (driver JVM, Python, workers) runs nothing, which is
what a lost node does. The claim proven: after a kill at any commit boundary a plain rerun
converges to exactly the tables of an uninterrupted run, so operators never clean up by hand.
Every output is compared through `deltalake` (a second Delta reader, not Spark), as sorted pandas
frames.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import pytest

import ctt_contracts as C
from models.lake_read import read_arrow
from pipelines.cli import run_generate
from pipelines.sequences import split_cutoffs_path
from pipelines.synthetic import PLANTED, SyntheticConfig

pytestmark = [pytest.mark.spark, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NOW = datetime(2025, 1, 1, tzinfo=timezone.utc)
GEN = SyntheticConfig(preset=PLANTED, n_users=150, n_items=400, malformed_frac=0.02, seed=11)
OUTPUTS = (C.T_ITEMS, C.T_USERS, C.T_EVENTS, C.T_QUARANTINE, C.T_SEQUENCES, C.T_CONTEXT_ROWS,
           C.T_USER_SEQUENCES)
JOB_TIMEOUT_S = 1200
FIRST_COMMIT = "_delta_log/" + "0" * 20 + ".json"


def _env() -> Dict[str, str]:
    return {**os.environ, "PYSPARK_PYTHON": sys.executable,
            "PYSPARK_DRIVER_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1",
            "PYTHONPATH": str(REPO)}


def _job_args(lake: str) -> List[str]:
    return [str(REPO / "jobs" / "build_sequences.py"), "--lake", lake, "--max-len", "5",
            "--shuffle-partitions", "4", "--driver-memory", "1g", "--now", NOW.isoformat()]


def run_job(lake: str, master: str = "local[2]", submit: bool = False) -> str:
    """Run the build to completion; its stdout (fails with the stderr tail)."""
    cmd = ([str(BIN / "spark-submit"), "--master", master, *_job_args(lake)] if submit
           else [sys.executable, *_job_args(lake), "--master", master])
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=JOB_TIMEOUT_S)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stderr[-4000:]}"
    return done.stdout


def run_job_until(lake: str, marker: Path, poll_s: float = 0.05) -> None:
    """Start the build, SIGKILL its whole process group the moment `marker` exists.

    Fails if the job finishes before the marker appears (the kill point was never reached), so
    the test cannot pass by killing an already finished job.
    """
    proc = subprocess.Popen([sys.executable, *_job_args(lake), "--master", "local[2]"],
                            cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    try:
        while not marker.exists():
            assert proc.poll() is None, f"job exited ({proc.returncode}) before {marker} appeared"
            assert time.monotonic() < deadline, f"{marker} never appeared"
            time.sleep(poll_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def _hashable(value: object) -> object:
    """Array cells -> tuples so that frames can be sorted and compared by value."""
    if isinstance(value, (list, np.ndarray)):
        return tuple(_hashable(v) for v in value)
    return value


def table_frame(path: str) -> pd.DataFrame:
    """A Delta table as a sorted pandas frame, read by delta-rs (not Spark)."""
    df = read_arrow(path)[0].to_pandas()
    df = df.apply(lambda col: col.map(_hashable)) if len(df) else df
    cols = sorted(df.columns)
    return df[cols].sort_values(cols, kind="mergesort").reset_index(drop=True)


def lake_frames(lake: str, tables: Sequence[str] = OUTPUTS) -> Dict[str, pd.DataFrame]:
    frames = {t: table_frame(C.LakePaths(lake).table(t)) for t in tables}
    frames["split_cutoffs"] = table_frame(split_cutoffs_path(lake))
    return frames


def assert_same_lake(got: Dict[str, pd.DataFrame], want: Dict[str, pd.DataFrame]) -> None:
    assert set(got) == set(want)
    for name in want:
        assert len(want[name]) > 0, f"{name}: the reference is empty, the comparison is vacuous"
        pd.testing.assert_frame_equal(got[name], want[name], check_dtype=True, obj=name)


@pytest.fixture(scope="module")
def raw_lake(spark, tmp_path_factory) -> str:
    """A small generated lake (raw tables only, with malformed rows) to copy per scenario."""
    root = str(tmp_path_factory.mktemp("raw") / "lake")
    run_generate(spark, root, GEN, partitions=2)
    return root


@pytest.fixture(scope="module")
def reference(raw_lake, tmp_path_factory) -> Dict[str, pd.DataFrame]:
    """Outputs of one uninterrupted `python jobs/build_sequences.py` run on a copy."""
    lake = str(tmp_path_factory.mktemp("clean") / "lake")
    shutil.copytree(raw_lake, lake)
    run_job(lake)
    return lake_frames(lake)


def _copy(raw_lake: str, tmp_path: Path) -> str:
    lake = str(tmp_path / "lake")
    shutil.copytree(raw_lake, lake)
    return lake


@pytest.mark.parametrize("kill_after, not_yet", [
    (C.T_ITEMS, C.T_EVENTS),  # during validation: first clean table committed
    (C.T_SEQUENCES, C.T_USER_SEQUENCES),  # during the outputs: validated tables all done
])
def test_sigkill_mid_run_then_rerun_equals_a_clean_run(raw_lake, reference, tmp_path,
                                                       kill_after: str, not_yet: str):
    lake = _copy(raw_lake, tmp_path)
    run_job_until(lake, Path(C.LakePaths(lake).table(kill_after)) / FIRST_COMMIT)
    later: Optional[Path] = Path(C.LakePaths(lake).table(not_yet)) / FIRST_COMMIT
    assert not later.exists(), f"killed too late: {not_yet} was already committed"
    run_job(lake)
    assert_same_lake(lake_frames(lake), reference)


def test_local_cluster_gives_the_same_tables_as_local_mode(raw_lake, reference, tmp_path):
    """Two executor JVMs with their own Python workers: nothing may lean on driver-local state
    (files, globals, ordering of a single partition)."""
    lake = _copy(raw_lake, tmp_path)
    out = run_job(lake, master="local-cluster[2,1,1024]", submit=True)
    assert "summary:" in out
    assert_same_lake(lake_frames(lake), reference)
