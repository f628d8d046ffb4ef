"""Prometheus metrics of the online resolver, served at GET /metrics (text exposition format).

What an on-call engineer reads from them:
- ``ctt_requests_total{endpoint, status, outcome}``: every answer, ``outcome`` = ``ok`` or the
  error code of the one error shape (``version_skew`` 409, ``online_store_unavailable`` 503,
  ``unknown_subject_item`` 404, ``invalid_request`` 422, ``request_too_large`` 413,
  ``bad_request`` 400, ``internal_error`` 500, ...);
- ``ctt_request_duration_seconds{endpoint}``: wall time of every answer, errors included;
- ``ctt_stage_duration_seconds{stage}``: feast / head / search / total of each recommendation;
- ``ctt_cold_starts_total{reason}``: no_state or version_skew (served as cold start);
- ``ctt_state_age_seconds``: age of the cached state used (refresh freshness);
- ``ctt_build_info{model_version, index_model_version, index_backend, index_built_at, head}`` = 1:
  the versions as labels (a gauge, the info pattern that also works across processes).

Several worker processes (``ctt-serve --workers N``): prometheus-client's multi-process mode.
With ``PROMETHEUS_MULTIPROC_DIR`` set before prometheus-client is first imported, every process
writes its values to memory-mapped files in that folder and /metrics (answered by any worker)
merges them, so counters are totals of the whole server. Feast sets that variable itself when it
is imported (to a fresh temporary folder, unless the operator set one), so a server process is
always in multi-process mode; the mode is read from prometheus-client's value store, never
assumed, so the exposition always reads where the values are written. An operator's folder is
cleared of an earlier run's files at start-up (``prepare_multiprocess_dir``) and a dead worker's
live files are marked (``mark_worker_dead``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
OUTCOME_OK = "ok"
OTHER_ENDPOINT = "other"  # unknown paths share one label value: no series per scanned URL
ENDPOINTS = ("/recommend", "/health", "/version", "/metrics")
STAGES = ("feast", "head", "search", "total")
# Stage latencies: 50 us .. 1 s (the head is ~0.05 ms, a Feast read ~0.3-1 ms, a bad tail ~100 ms).
STAGE_BUCKETS = (5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 7.5e-4, 1e-3, 1.5e-3, 2e-3, 3e-3, 5e-3, 7.5e-3,
                 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0)
# State age: a minute .. 30 days (hourly refresh, daily batch inference, the 30-day Feast TTL).
STATE_AGE_BUCKETS = (60, 300, 900, 1800, 3600, 2 * 3600, 6 * 3600, 12 * 3600, 86400, 2 * 86400,
                     7 * 86400, 14 * 86400, 30 * 86400)


def multiprocess_dir() -> Optional[str]:
    return os.environ.get(MULTIPROC_ENV) or None


def values_in_files() -> bool:
    """True when prometheus-client stores metric values in PROMETHEUS_MULTIPROC_DIR files (the
    choice it made at its import, from the environment of that moment)."""
    from prometheus_client import values

    return values.ValueClass.__name__ == "MmapedValue"


def prepare_multiprocess_dir(path: Path) -> int:
    """Delete the metric files that processes no longer alive left in the folder (an earlier
    server run: they would otherwise be merged into this run's totals); returns how many. Files
    of live processes stay: this process's own (libraries such as Feast create metrics at import
    and their memory maps must keep their files) and those of any other live process sharing the
    folder."""
    if not path.is_dir():
        raise ValueError(f"{MULTIPROC_ENV}={path} is not an existing folder")
    stale = [f for f in path.glob("*.db") if not _pid_alive(_file_pid(f))]
    for f in stale:
        f.unlink(missing_ok=True)
    return len(stale)


def _file_pid(path: Path) -> Optional[int]:
    """prometheus-client names its files <kind>_<pid>.db."""
    tail = path.stem.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _pid_alive(pid: Optional[int]) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def mark_worker_dead(pid: int) -> None:
    """A worker exited: its live-gauge files go, its counters stay in the totals."""
    from prometheus_client import multiprocess

    if multiprocess_dir():
        multiprocess.mark_process_dead(pid)


class ServingMetrics:
    """The resolver's metrics; one object per app, never in the global registry (several apps in
    one process, as in tests, do not collide on registration). Single-process value store: a
    private registry. Multi-process store: the values go to PROMETHEUS_MULTIPROC_DIR files and
    the exposition merges every process's files (in one process, every app's counts add up)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.multiprocess = values_in_files()
        if self.multiprocess and multiprocess_dir() is None:
            raise RuntimeError(f"prometheus-client stores values in files but {MULTIPROC_ENV} is "
                               f"not set: the exposition could not find them")
        self.registry = None if self.multiprocess else CollectorRegistry()
        reg = self.registry
        self.requests = Counter("ctt_requests", "Answers by endpoint, HTTP status and outcome "
                                "(ok or the error code)", ["endpoint", "status", "outcome"],
                                registry=reg)
        self.request_duration = Histogram("ctt_request_duration_seconds", "Wall time of each answer "
                                          "(errors included)", ["endpoint"],
                                          buckets=STAGE_BUCKETS, registry=reg)
        self.stage = Histogram("ctt_stage_duration_seconds", "Resolver stage durations of each "
                               "recommendation", ["stage"], buckets=STAGE_BUCKETS, registry=reg)
        self.cold_starts = Counter("ctt_cold_starts", "Recommendations served as cold start, by "
                                   "reason", ["reason"], registry=reg)
        self.state_age = Histogram("ctt_state_age_seconds", "Age of the cached user state used "
                                   "(now - its event timestamp)", buckets=STATE_AGE_BUCKETS,
                                   registry=reg)
        self.build_info = Gauge("ctt_build_info", "Model and index versions being served (value 1)",
                                ["model_version", "index_model_version", "index_backend",
                                 "index_built_at", "head"], multiprocess_mode="max", registry=reg)

    def set_build_info(self, labels: Mapping[str, str]) -> None:
        self.build_info.labels(**labels).set(1)

    def observe_request(self, path: str, status: int, outcome: str, seconds: float) -> None:
        endpoint = path if path in ENDPOINTS else OTHER_ENDPOINT
        self.requests.labels(endpoint, str(status), outcome).inc()
        self.request_duration.labels(endpoint).observe(seconds)

    def observe_recommendation(self, timings_ms: Mapping[str, float], cold_start_reason: Optional[str],
                               state_age_seconds: Optional[float]) -> None:
        for stage in STAGES:
            if stage in timings_ms:
                self.stage.labels(stage).observe(timings_ms[stage] / 1000.0)
        if cold_start_reason is not None:
            self.cold_starts.labels(cold_start_reason).inc()
        if state_age_seconds is not None:
            self.state_age.observe(state_age_seconds)

    def exposition(self) -> Tuple[bytes, str]:
        """(body, content type) of GET /metrics: this process's registry, or the merge of every
        worker's files in multi-process mode."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        if not self.multiprocess:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        merged = CollectorRegistry()
        MultiProcessCollector(merged)
        return generate_latest(merged), CONTENT_TYPE_LATEST


def build_labels(model_version: str, index_manifest, head: str) -> Dict[str, str]:
    """ctt_build_info's labels from the resolver's versions and the index manifest."""
    return {"model_version": model_version, "index_model_version": index_manifest.model_version,
            "index_backend": index_manifest.backend, "index_built_at": str(index_manifest.created_at),
            "head": head}
