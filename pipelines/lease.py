"""Lake-level writer lease: one run at a time writes a given set of a lake's tables.

Why a lease on top of the conflict-checked writes of ``pipelines.delta_io``: every single write
is a MERGE (or replaceWhere) that Delta conflict-checks, so two overlapping runs can never
duplicate rows. But a job writes several tables one after the other (build_sequences: seven),
and two overlapping runs that read different inputs (an ingest landed between their starts)
could each win some of the tables and leave a lake that no single run produced. The lease makes
the run the unit: the second run stops at its start, before any write, naming the holder.

Where: a Delta table ``<lake>/_meta/lease``, one row per *scope* (the set of tables a job
writes: ``build_sequences``, ``batch_inference``, ``raw``). Acquiring is one MERGE whose
condition is a compare-and-swap on the owner seen just before (absent, or a holder judged
dead); Delta's optimistic concurrency makes two acquirers serialize (the log entry of the next
version is written put-if-absent, and a MERGE conflicts with a concurrent MERGE on the same
table), so one inserts and the other either sees that row or fails with a commit conflict and
rereads it. The holder is visible to anyone who can read the lake.

Why delta-rs (``deltalake``) and not Spark for this one table: a lease operation is a few
milliseconds there against seconds of Spark jobs per MERGE, paid by every run (and by the
heartbeat while it runs); the lease needs no Spark session at all. The lake must be a location
delta-rs opens (a local folder or an object store URI), as for the Feast export.

Liveness: the holder renews ``expires_at`` every ``ttl / 3`` from a daemon thread. A lease is free
when it expired, or at once when its holder was a process of this machine (same kernel boot and
PID namespace) that no longer runs: a SIGKILLed or OOM-killed build is rerun immediately on
the same machine, after at most ``ttl`` elsewhere. ``python -m pipelines.lease --lake L --show``
prints the holders; ``--break SCOPE`` removes one by hand (only when its holder is known dead).
Fencing: writers call :meth:`Lease.check` before each commit, so a holder that stalled past its
ttl and lost the lease stops before it writes.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import ctt_contracts as C
from ctt_contracts.flags import add_exclusive_flags, dataclass_parser, flag_field, from_args, lake_field
from ctt_contracts.process import entry_point

log = logging.getLogger(__name__)

ENV_TTL = "CTT_LEASE_TTL_S"
DEFAULT_TTL_S = 300.0
ACQUIRE_ATTEMPTS = 4

SCOPE_BUILD = "build_sequences"  # items, users, events, quarantine, sequences, context_rows, user_sequences
SCOPE_INFERENCE = "batch_inference"  # user_states (+ its Feast snapshot)
SCOPE_RAW = "raw"  # raw_events, raw_items, raw_users (generate_data, ingest)
SCOPES = (SCOPE_BUILD, SCOPE_INFERENCE, SCOPE_RAW)

LEASE_COLUMNS = [C.LEASE_SCOPE, C.LEASE_OWNER, C.LEASE_JOB, C.LEASE_HOST, C.LEASE_NODE, C.LEASE_PID,
                 C.LEASE_PID_START, C.LEASE_ACQUIRED_AT, C.LEASE_RENEWED_AT, C.LEASE_EXPIRES_AT]


class LeaseHeldError(RuntimeError):
    """Another live run holds the lease: this run must not write (it wrote nothing yet)."""


class LeaseLostError(RuntimeError):
    """This run held the lease but lost it (stalled past its ttl and another run took over)."""


def lease_path(lake: str) -> str:
    return C.LakePaths(lake).meta(C.META_LEASE)


def default_ttl_s() -> float:
    value = os.environ.get(ENV_TTL)
    ttl = float(value) if value else DEFAULT_TTL_S
    if ttl <= 0:
        raise ValueError(f"{ENV_TTL} must be a positive number of seconds, got {value!r}")
    return ttl


def lease_schema():  # -> pyarrow.Schema
    import pyarrow as pa

    ts = pa.timestamp("us", tz="UTC")
    types = {C.LEASE_PID: pa.int64(), C.LEASE_PID_START: pa.int64(), C.LEASE_ACQUIRED_AT: ts,
             C.LEASE_RENEWED_AT: ts, C.LEASE_EXPIRES_AT: ts}
    return pa.schema([pa.field(c, types.get(c, pa.string()), c == C.LEASE_PID_START)
                      for c in LEASE_COLUMNS])


# --------------------------------------------------------------------------------------
# Who holds it, and is that process still alive (pure python, no Spark)
# --------------------------------------------------------------------------------------
def process_start(pid: int) -> Optional[int]:
    """Start time of a process in clock ticks since boot (Linux /proc), None if it does not exist
    or the system has no /proc. With the pid it identifies a process even across pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])  # field 22: after the ")" of comm


def node_id() -> Optional[str]:
    """Kernel boot + PID namespace: two processes with the same node id see the same pids, so one
    can tell whether the other still runs. None (no /proc): only the ttl frees a lease."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{boot}/{pidns}"


@dataclass(frozen=True)
class Holder:
    """One lease row."""

    scope: str
    owner: str  # unique per acquisition
    job: str
    host: str
    node: str  # node_id() or "" when unknown
    pid: int
    pid_start: Optional[int]
    acquired_at: datetime
    renewed_at: datetime
    expires_at: datetime

    @classmethod
    def this_process(cls, scope: str, job: str, now: datetime, ttl_s: float) -> "Holder":
        pid = os.getpid()
        return cls(scope, uuid.uuid4().hex, job, socket.gethostname(), node_id() or "", pid,
                   process_start(pid), now, now, now + timedelta(seconds=ttl_s))

    @classmethod
    def from_row(cls, row) -> "Holder":
        return cls(row[C.LEASE_SCOPE], row[C.LEASE_OWNER], row[C.LEASE_JOB], row[C.LEASE_HOST],
                   row[C.LEASE_NODE], int(row[C.LEASE_PID]), row[C.LEASE_PID_START],
                   C.as_utc(row[C.LEASE_ACQUIRED_AT]), C.as_utc(row[C.LEASE_RENEWED_AT]),
                   C.as_utc(row[C.LEASE_EXPIRES_AT]))

    def row(self) -> tuple:
        return (self.scope, self.owner, self.job, self.host, self.node, self.pid, self.pid_start,
                self.acquired_at, self.renewed_at, self.expires_at)

    def dead_here(self) -> bool:
        """True only when the holder provably no longer runs: same node, pid gone or reused."""
        here = node_id()
        if not here or self.node != here:
            return False
        start = process_start(self.pid)
        return start is None or (self.pid_start is not None and start != self.pid_start)

    def free(self, now: datetime) -> bool:
        return self.expires_at <= now or self.dead_here()

    def describe(self) -> str:
        return (f"{self.job} (pid {self.pid} on {self.host}, since {self.acquired_at:%Y-%m-%d %H:%M:%S}Z, "
                f"lease valid until {self.expires_at:%H:%M:%S}Z unless renewed)")


# --------------------------------------------------------------------------------------
# Delta operations on the lease table (delta-rs)
# --------------------------------------------------------------------------------------
def _conflicts() -> tuple:
    """delta-rs raises CommitFailedError when a concurrent commit conflicts with this one."""
    from deltalake.exceptions import CommitFailedError

    return (CommitFailedError,)


def _table(path: str, create: bool = False):
    """The lease table (None if absent and not `create`); a concurrent creator may win."""
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError

    if DeltaTable.is_deltatable(path):
        return DeltaTable(path)
    if not create:
        return None
    try:
        return DeltaTable.create(path, lease_schema(), mode="ignore")
    except DeltaError:
        if DeltaTable.is_deltatable(path):
            return DeltaTable(path)
        raise


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _holders(path: str, scope: Optional[str] = None) -> List[Holder]:
    table = _table(path)
    if table is None:
        return []
    rows = table.to_pyarrow_table().to_pylist()
    return [Holder.from_row(r) for r in rows if scope is None or r[C.LEASE_SCOPE] == scope]


def _mine(holder: Holder) -> str:
    return (f"{C.LEASE_SCOPE} = {_sql_str(holder.scope)} AND "
            f"{C.LEASE_OWNER} = {_sql_str(holder.owner)}")


def _try_take(path: str, me: Holder, stale_owner: Optional[str]) -> None:
    """One MERGE: insert me if the scope has no row, or replace the row of ``stale_owner``."""
    import pyarrow as pa

    source = pa.Table.from_pylist([dict(zip(LEASE_COLUMNS, me.row()))], schema=lease_schema())
    merge = _table(path).merge(source, f"t.{C.LEASE_SCOPE} = s.{C.LEASE_SCOPE}",
                               source_alias="s", target_alias="t")
    if stale_owner is not None:
        merge = merge.when_matched_update_all(predicate=f"t.{C.LEASE_OWNER} = {_sql_str(stale_owner)}")
    merge.when_not_matched_insert_all().execute()


class Lease:
    """A held lease; renewed in the background until :meth:`release`."""

    def __init__(self, path: str, holder: Holder, ttl_s: float):
        self.path, self.holder, self.ttl_s = path, holder, ttl_s
        self._lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{holder.scope}",
                                        daemon=True)

    @property
    def scope(self) -> str:
        return self.holder.scope

    def check(self) -> None:
        """Raise LeaseLostError if the lease was lost (call before every commit)."""
        if self._lost:
            raise LeaseLostError(self._lost)

    def renew(self) -> None:
        """Push ``expires_at`` one ttl ahead; marks the lease lost if another run holds it now."""
        now = datetime.now(timezone.utc)
        expires = now + timedelta(seconds=self.ttl_s)
        _table(self.path).update(new_values={C.LEASE_RENEWED_AT: now, C.LEASE_EXPIRES_AT: expires},
                                 predicate=_mine(self.holder))
        rows = _holders(self.path, self.scope)
        if not any(r.owner == self.holder.owner for r in rows):
            taker = rows[0].describe() if rows else "nobody (removed by hand?)"
            self._lost = (f"the {self.scope} lease of this run is now held by {taker} (it was not "
                          f"renewed for {self.ttl_s:.0f}s); this run stops before its next write")
            return
        self.holder = Holder(**{**self.holder.__dict__, "renewed_at": now, "expires_at": expires})

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except _conflicts() as err:  # a concurrent acquirer's MERGE: retry at the next tick
                log.warning("lease %s: renewal conflicted (%s); retrying", self.scope, err)
            if self._lost:
                return
            if datetime.now(timezone.utc) >= self.holder.expires_at:
                self._lost = f"the {self.scope} lease expired before it could be renewed"
                return

    def start(self) -> "Lease":
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop renewing and delete this run's row (a run that cannot is freed by the ttl)."""
        self._stop.set()
        self._thread.join(timeout=60)
        for _ in range(ACQUIRE_ATTEMPTS):
            try:
                _table(self.path).delete(_mine(self.holder))
                return
            except _conflicts() as err:
                log.warning("lease %s: release conflicted (%s); retrying", self.scope, err)
        log.warning("lease %s: could not release; it expires at %s", self.scope,
                    self.holder.expires_at.isoformat())


def acquire(lake: str, scope: str, job: str, ttl_s: Optional[float] = None) -> Lease:
    """Take the lake's ``scope`` lease for this process or raise LeaseHeldError (no waiting)."""
    if scope not in SCOPES:
        raise ValueError(f"unknown lease scope {scope!r}; known: {', '.join(SCOPES)}")
    ttl_s = default_ttl_s() if ttl_s is None else ttl_s
    path = lease_path(lake)
    _table(path, create=True)
    for _ in range(ACQUIRE_ATTEMPTS):
        now = datetime.now(timezone.utc)
        current = _holders(path, scope)
        if current and not current[0].free(now):
            raise LeaseHeldError(
                f"lake {lake}: {current[0].describe()} is writing the {scope} tables; this run "
                f"stopped before writing anything. Rerun when it has finished (if that process "
                f"is dead on another machine, its lease frees itself at the time above, or "
                f"remove it by hand: python -m pipelines.lease --lake {lake} --break {scope})")
        me = Holder.this_process(scope, job, now, ttl_s)
        try:
            _try_take(path, me, current[0].owner if current else None)
        except _conflicts() as err:  # another acquirer committed first: look again
            log.info("lease %s: concurrent acquisition (%s); rereading", scope, type(err).__name__)
            continue
        if any(h.owner == me.owner for h in _holders(path, scope)):
            if current:
                log.warning("lease %s: took over from %s (expired or dead)", scope, current[0].describe())
            return Lease(path, me, ttl_s).start()
    raise LeaseHeldError(f"lake {lake}: the {scope} lease changed hands {ACQUIRE_ATTEMPTS} times "
                         f"while this run tried to take it; stopped before writing anything")


@contextmanager
def held(lake: str, scope: str, job: str, ttl_s: Optional[float] = None) -> Iterator[Lease]:
    """``with held(lake, SCOPE_BUILD, "build_sequences") as lease: ...`` - released on exit,
    exceptions included (a SIGKILL skips this; see the module docstring)."""
    lease = acquire(lake, scope, job, ttl_s)
    try:
        yield lease
    finally:
        lease.release()


# --------------------------------------------------------------------------------------
# What a job does when it is refused a write
# --------------------------------------------------------------------------------------
# Exit codes a scheduler can tell apart (sysexits.h):
EXIT_CONTENDED = 75  # EX_TEMPFAIL: another run holds the lake or kept writing; retry later
EXIT_DUPLICATES = 65  # EX_DATAERR: an output table holds duplicate keys; repair (see message)


def exit_on_refusal(job: str, err: BaseException) -> None:
    """For the expected refusals (lease held or lost, a contested table, duplicate keys): one
    line on stderr and the exit code above instead of a traceback. Returns for anything else."""
    from pipelines.delta_io import ConcurrentWriteError, DuplicateKeyError

    if isinstance(err, (LeaseHeldError, LeaseLostError, ConcurrentWriteError)):
        code = EXIT_CONTENDED
    elif isinstance(err, DuplicateKeyError):
        code = EXIT_DUPLICATES
    else:
        return
    print(f"{job}: {err}", file=sys.stderr, flush=True)
    raise SystemExit(code) from err


# --------------------------------------------------------------------------------------
# CLI: show / break
# --------------------------------------------------------------------------------------
def break_lease(lake: str, scope: str) -> Optional[Holder]:
    """Remove the ``scope`` row whoever holds it; returns the removed holder (None: was free)."""
    path = lease_path(lake)
    current = _holders(path, scope)
    if not current:
        return None
    _table(path).delete(_mine(current[0]))
    return current[0]


@dataclass(frozen=True)
class LeaseCommand:
    """What ``python -m pipelines.lease`` does on which lake: show the leases, or break one
    (exactly one of the two; the parser puts them in a required, mutually exclusive group)."""

    lake: str = lake_field()
    show: bool = flag_field("list the lake's writer leases and whether each is held", False)
    scope: Optional[str] = flag_field(
        f"remove the lease of SCOPE ({', '.join(SCOPES)}) whoever holds it (its holder known to "
        "be dead)", None, flag="--break", choices=SCOPES, metavar="SCOPE")


def lease_parser() -> argparse.ArgumentParser:
    """``--show`` or ``--break SCOPE`` (exactly one), read from ``LeaseCommand``."""
    p = dataclass_parser("python -m pipelines.lease", "Show the writer leases of a lake, or break "
                         "one whose holder is known to be dead.", (LeaseCommand, ("lake",)))
    add_exclusive_flags(p, (LeaseCommand, ("show", "scope")), required=True)
    return p


def main(argv: Optional[Sequence[str]] = None) -> None:
    cmd = from_args(LeaseCommand, lease_parser().parse_args(argv))
    if cmd.show:
        now = datetime.now(timezone.utc)
        holders = _holders(lease_path(cmd.lake))
        for h in holders:
            state = "free (expired or dead)" if h.free(now) else "held"
            print(f"{h.scope:<16} {state:<22} {h.describe()}")
        if not holders:
            print("no leases held")
    else:
        gone = break_lease(cmd.lake, cmd.scope)
        print(f"removed: {gone.describe()}" if gone else f"{cmd.scope}: no lease held")


# Command-line entry point: the process ends with the exit code main chose (ctt_contracts.process).
cli = entry_point(main)


if __name__ == "__main__":
    cli()
