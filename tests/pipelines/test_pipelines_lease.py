"""The lake writer lease (pipelines/lease.py) on a real Delta table through delta-rs, with real
processes: exactly one of several simultaneous acquirers wins, a live holder is refused with its
identity, a SIGKILLed holder on this machine is taken over at once, an expired one after its ttl,
and a holder that lost its lease finds out before its next write."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import lease

REPO = Path(__file__).resolve().parents[2]


def _race(lake: str, barrier, results) -> None:
    """One acquirer of the race below (a spawned process)."""
    barrier.wait()
    try:
        held = lease.acquire(lake, lease.SCOPE_BUILD, "race", ttl_s=60)
        results.put(("won", held.holder.owner))
    except lease.LeaseHeldError:
        results.put(("held", None))


@pytest.mark.parametrize("table_exists", [False, True])
def test_simultaneous_acquirers_exactly_one_wins(tmp_path, table_exists):
    """Six processes released by one barrier: one lease row, one winner, five refusals (whether
    they race to create the lease table too, or only to take its row)."""
    lake = str(tmp_path / "lake")
    if table_exists:
        lease.acquire(lake, lease.SCOPE_INFERENCE, "other scope").release()
    ctx = mp.get_context("spawn")  # delta-rs' runtime threads do not survive a fork
    barrier, results = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(lake, barrier, results)) for _ in range(6)]
    for p in procs:
        p.start()
    outcome = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    winners = [owner for kind, owner in outcome if kind == "won"]
    assert len(winners) == 1, outcome
    rows = lease._holders(lease.lease_path(lake), lease.SCOPE_BUILD)
    assert [r.owner for r in rows] == winners


def test_live_holder_is_refused_with_its_identity_then_free_after_release(tmp_path):
    lake = str(tmp_path / "lake")
    first = lease.acquire(lake, lease.SCOPE_BUILD, "build_sequences", ttl_s=60)
    with pytest.raises(lease.LeaseHeldError) as err:
        lease.acquire(lake, lease.SCOPE_BUILD, "build_sequences", ttl_s=60)
    text = str(err.value)
    assert f"pid {os.getpid()}" in text and "stopped before writing anything" in text
    assert f"--break {lease.SCOPE_BUILD}" in text
    other = lease.acquire(lake, lease.SCOPE_INFERENCE, "batch_inference", ttl_s=60)  # other scope
    first.release()
    again = lease.acquire(lake, lease.SCOPE_BUILD, "build_sequences", ttl_s=60)
    assert again.holder.owner != first.holder.owner
    again.release()
    other.release()
    assert lease._holders(lease.lease_path(lake)) == []


HOLD = """
import sys, time
from pipelines import lease
lease.acquire(sys.argv[1], lease.SCOPE_BUILD, "victim", ttl_s=3600)
print("held", flush=True)
time.sleep(3600)
"""


def test_sigkilled_holder_on_this_machine_is_taken_over_at_once(tmp_path):
    """A holder killed by SIGKILL never releases; its lease (ttl one hour) is free anyway because
    its process is gone from this machine."""
    lake = str(tmp_path / "lake")
    proc = subprocess.Popen([sys.executable, "-c", HOLD, lake], cwd=REPO, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(lease.LeaseHeldError, match="victim"):
            lease.acquire(lake, lease.SCOPE_BUILD, "rerun", ttl_s=60)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    (victim,) = lease._holders(lease.lease_path(lake), lease.SCOPE_BUILD)
    assert victim.pid == proc.pid and victim.dead_here()
    rerun = lease.acquire(lake, lease.SCOPE_BUILD, "rerun", ttl_s=60)
    assert [h.job for h in lease._holders(lease.lease_path(lake))] == ["rerun"]
    rerun.release()


def test_heartbeat_keeps_a_short_lease_and_an_expired_one_is_taken_over_and_fenced(tmp_path):
    lake = str(tmp_path / "lake")
    ttl = 1.5
    kept = lease.acquire(lake, lease.SCOPE_BUILD, "renewing", ttl_s=ttl)
    first_expiry = kept.holder.expires_at
    time.sleep(2.5 * ttl)  # the heartbeat (every ttl/3) keeps it alive
    kept.check()
    assert kept.holder.expires_at > first_expiry
    with pytest.raises(lease.LeaseHeldError):
        lease.acquire(lake, lease.SCOPE_BUILD, "intruder", ttl_s=ttl)
    kept.release()

    stalled = lease.acquire(lake, lease.SCOPE_BUILD, "stalled", ttl_s=ttl)
    stalled._stop.set()  # a holder that stops renewing (a stalled driver)
    stalled._thread.join()
    time.sleep(ttl + 0.2)
    taker = lease.acquire(lake, lease.SCOPE_BUILD, "taker", ttl_s=60)
    stalled.check()  # it does not know yet ...
    stalled.renew()  # ... until it next talks to the lease table
    with pytest.raises(lease.LeaseLostError, match="now held by taker"):
        stalled.check()
    taker.release()


def test_cli_shows_and_breaks_a_lease(tmp_path, capsys):
    lake = str(tmp_path / "lake")
    held = lease.acquire(lake, lease.SCOPE_RAW, "ingest", ttl_s=60)
    held._stop.set()
    lease.main(["--lake", lake, "--show"])
    out = capsys.readouterr().out
    assert out.split()[:3] == ["raw", "held", "ingest"], out
    lease.main(["--lake", lake, "--break", lease.SCOPE_RAW])
    assert "removed: ingest" in capsys.readouterr().out
    assert lease._holders(lease.lease_path(lake)) == []
    lease.main(["--lake", lake, "--show"])
    assert "no leases held" in capsys.readouterr().out


def test_bad_scope_and_ttl_are_refused(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown lease scope"):
        lease.acquire(str(tmp_path), "everything", "job")
    monkeypatch.setenv(lease.ENV_TTL, "0")
    with pytest.raises(ValueError, match=lease.ENV_TTL):
        lease.default_ttl_s()
