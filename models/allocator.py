"""glibc malloc settings for CPU training with a full-catalog softmax: keep freed memory.

Why: the all-positions objective scores every position of a batch against the whole catalog,
so each step allocates (positions x catalog) float tensors of hundreds of MB (128 MovieLens
users x up to 200 positions x 3,613 items = 370 MB for the logits alone, again for their
softmax and gradient). glibc serves a block that large with a fresh ``mmap`` and hands it back
with ``munmap`` on free, so every step pays the kernel to map and zero the same memory again:
on ml-1m-u2999 (2 torch threads) a third of an epoch's CPU time was system time. Raising
glibc's mmap and trim thresholds keeps those blocks in the heap for the next step; one epoch
went from 39 s to 26 s wall (``benchmarks/movielens.py``, README "MovieLens").

Ours' own full-catalog loss no longer builds those tensors (``models.softmax``: 128 positions at
a time); the thresholds stay for everything else a step allocates, for RecTools' SASRec, whose
loss does build them, and so that both sides of the MovieLens benchmark run under the same
allocator.

The thresholds are read once, when the process starts (``GLIBC_TUNABLES``), so a command that
wants them re-executes itself with them added (:func:`reexec_with_tunables`: same PID, same
arguments). A user's own ``glibc.malloc.*`` thresholds in ``GLIBC_TUNABLES`` are left alone, and
``CTT_MALLOC_TUNABLES=0`` turns the re-execution off. The price is resident memory: the heap
keeps its peak instead of returning it between steps.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Dict, Mapping, Optional

ENV = "GLIBC_TUNABLES"
OPT_OUT = "CTT_MALLOC_TUNABLES"  # "0": run with the allocator as the environment has it
KEEP = str(4 << 30)  # bytes: blocks up to 4 GiB come from the heap, which is never trimmed below it
TUNABLES: Dict[str, str] = {"glibc.malloc.mmap_threshold": KEEP, "glibc.malloc.trim_threshold": KEEP}


def parse(value: str) -> Dict[str, str]:
    """``GLIBC_TUNABLES`` text (``name=value:name=value``) -> {name: value}, in order."""
    pairs = (item.partition("=") for item in value.split(":") if item)
    return {name: val for name, _, val in pairs}


def tunables_env(env: Mapping[str, str], libc: str) -> Optional[Dict[str, str]]:
    """The environment to re-run the process with, or None when there is nothing to add: not
    glibc, opted out, or ``GLIBC_TUNABLES`` already names either threshold (ours after the
    re-execution, or the user's choice)."""
    if libc != "glibc" or env.get(OPT_OUT) == "0":
        return None
    current = parse(env.get(ENV, ""))
    if any(name in current for name in TUNABLES):
        return None
    merged = {**current, **TUNABLES}
    return {**env, ENV: ":".join(f"{name}={val}" for name, val in merged.items())}


def reexec_with_tunables() -> None:
    """Replace this process by the same command with :data:`TUNABLES` in its environment (no
    return), unless :func:`tunables_env` finds nothing to add. Only for a command's entry point:
    everything the process did before is lost."""
    env = tunables_env(os.environ, platform.libc_ver()[0])
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
