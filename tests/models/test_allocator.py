"""models.allocator: which environment a training command re-executes itself with, and a real
re-execution of a Python process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from models import allocator

REPO = Path(__file__).resolve().parents[2]


def test_the_thresholds_are_added_to_a_users_other_tunables():
    env = allocator.tunables_env({"PATH": "/bin", allocator.ENV: "glibc.malloc.arena_max=2"}, "glibc")
    assert env["PATH"] == "/bin"
    assert allocator.parse(env[allocator.ENV]) == {"glibc.malloc.arena_max": "2", **allocator.TUNABLES}


def test_nothing_to_add_when_set_chosen_by_the_user_opted_out_or_not_glibc():
    ours = ":".join(f"{k}={v}" for k, v in allocator.TUNABLES.items())
    users = "glibc.malloc.trim_threshold=65536"
    assert allocator.tunables_env({allocator.ENV: ours}, "glibc") is None  # after the re-execution
    assert allocator.tunables_env({allocator.ENV: users}, "glibc") is None  # the user's choice
    assert allocator.tunables_env({allocator.OPT_OUT: "0"}, "glibc") is None
    assert allocator.tunables_env({}, "") is None  # musl or another libc


def test_a_process_reexecutes_itself_once_with_the_thresholds():
    code = ("import os, sys; print('start', os.getpid(), flush=True); "
            "from models import allocator; allocator.reexec_with_tunables(); "
            "print('run', os.getpid(), os.environ.get(allocator.ENV))")
    env = {k: v for k, v in os.environ.items() if k not in (allocator.ENV, allocator.OPT_OUT)}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout.split("\n")
    starts = [line for line in out if line.startswith("start")]
    runs = [line.split() for line in out if line.startswith("run")]
    assert len(starts) == 2 and len(set(starts)) == 1  # the same PID, started twice
    assert len(runs) == 1 and allocator.parse(runs[0][2]) == allocator.TUNABLES
    opted_out = subprocess.run([sys.executable, "-c", code], env={**env, allocator.OPT_OUT: "0"},
                               capture_output=True, text=True, check=True, timeout=60).stdout
    assert opted_out.count("start") == 1 and "run" in opted_out and "None" in opted_out
