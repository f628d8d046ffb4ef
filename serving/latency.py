"""The serving-latency harness of the evaluation report: real requests through a real resolver.

Why here and not in models/: the harness builds a ``Resolver`` (Feast, the item index, the
bundle) and times its ``recommend``; models/ must know nothing of serving. The report itself
(tables, plots, the latency section's Markdown) stays in models/evaluate.py and receives the
``LatencyReport`` built here. ``evaluate_main`` is the ``ctt-evaluate`` entry point: the
evaluation CLI of models/cli.py with this harness plugged in for ``--index`` /
``--feature-repo``.

Latency is MEASURED, never estimated: ``time_requests`` calls ``recommend`` in-process and keeps
the stage timings each answer carries (Feast read, head, index search) plus the caller's own
clock.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

import ctt_contracts as C
from ctt_contracts.process import entry_point
from models import evaluate as ev
from models import report as rp
from models.lake_read import read_arrow
from serving.resolver import Resolver

if TYPE_CHECKING:  # the CLI (Lightning) is imported by evaluate_main only
    from models.cli import EvaluateConfig

REQ_NO_CONTEXT, REQ_SUBJECT_ITEM = "no_context", "subject_item"


@dataclass(frozen=True)
class LatencyRequest:
    """One timed request: a user, with or without a subject item (the real-time context)."""

    user_id: int
    subject_item_id: Optional[int] = None

    @property
    def kind(self) -> str:
        return REQ_NO_CONTEXT if self.subject_item_id is None else REQ_SUBJECT_ITEM


@dataclass
class LatencySample:
    """What one real answer reported about itself, plus the caller's own clock."""

    kind: str
    timings: Dict[str, float]  # ms, as the resolver measured them (rp.LATENCY_STAGES)
    wall_ms: float
    cold_start: bool
    n_items: int
    index_backend: str
    model_version: str


def split_users(lake_root: str, split: str = C.SPLIT_TEST) -> np.ndarray:
    """Distinct user ids (sorted) of one split of the sequences table: the users to time."""
    frame = read_arrow(C.LakePaths(lake_root).table(C.T_SEQUENCES), [C.USER_ID, C.SPLIT])[0].to_pandas()
    users = np.unique(frame.loc[frame[C.SPLIT] == split, C.USER_ID].to_numpy(np.int64))
    if users.size == 0:
        raise ValueError(f"the {split} split of {lake_root} has no users to time requests for")
    return users


def latency_requests(user_ids: Sequence[int], item_ids: Sequence[int], n_per_kind: int,
                     seed: int = 0) -> List[LatencyRequest]:
    """``n_per_kind`` requests without context and as many with a subject item, interleaved.

    Interleaved, not one block per kind, so a load change on a shared machine hits both kinds
    alike. Users cycle through a seeded permutation (each user once before any repeats);
    subject items are drawn from ``item_ids`` (the served catalog).
    """
    if n_per_kind < 1:
        raise ValueError(f"n_per_kind must be >= 1, got {n_per_kind}")
    users, items = np.unique(np.asarray(user_ids, np.int64)), np.unique(np.asarray(item_ids, np.int64))
    if users.size == 0 or items.size == 0:
        raise ValueError(f"need users and subject items to time requests ({users.size} users, "
                         f"{items.size} items)")
    rng = np.random.default_rng(seed)
    users, subjects = rng.permutation(users), rng.choice(items, size=n_per_kind)
    out: List[LatencyRequest] = []
    for i in range(n_per_kind):
        user = int(users[i % users.size])
        out += [LatencyRequest(user), LatencyRequest(user, int(subjects[i]))]
    return out


def time_requests(recommend: Callable[..., Any], requests: Sequence[LatencyRequest],
                  k: int = rp.DEFAULT_LATENCY_K,
                  warmup: int = rp.DEFAULT_LATENCY_WARMUP) -> List[LatencySample]:
    """Call ``recommend(user_id=, subject_item_id=, k=)`` once per request, in this process.

    ``recommend`` is a resolver's method (serving.resolver.Resolver.recommend); each answer must
    carry ``timings`` (ms per stage), ``cold_start``, ``items``, ``index_backend`` and
    ``model_version``. The first ``warmup`` calls (cycling through ``requests``) are made and
    dropped: first calls pay one-off costs (SQLite connection, lazy imports, torch kernel
    selection) that are not the steady state. Errors propagate: a failing serving path must fail
    the report, not be timed.
    """
    if not requests:
        raise ValueError("no requests to time")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    for i in range(warmup):
        req = requests[i % len(requests)]
        recommend(user_id=req.user_id, subject_item_id=req.subject_item_id, k=k)
    samples: List[LatencySample] = []
    for req in requests:
        start = time.perf_counter()
        answer = recommend(user_id=req.user_id, subject_item_id=req.subject_item_id, k=k)
        wall_ms = (time.perf_counter() - start) * 1000.0
        missing = [s for s in rp.LATENCY_STAGES if s not in answer.timings]
        if missing:
            raise ValueError(f"the resolver's answer has no timings for {missing} (got "
                             f"{sorted(answer.timings)})")
        samples.append(LatencySample(req.kind, {s: float(answer.timings[s]) for s in rp.LATENCY_STAGES},
                                     wall_ms, bool(answer.cold_start), len(answer.items),
                                     str(answer.index_backend), str(answer.model_version)))
    return samples


def machine_facts() -> Dict[str, Any]:
    """CPU count, 1-minute load average and torch threads: latency on a shared machine means
    little without them."""
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    return {"cpu_count": os.cpu_count(), "load_avg_1m": load, "torch_threads": torch.get_num_threads()}


def _describe(values_ms: np.ndarray) -> Dict[str, float]:
    return {"p50": float(np.percentile(values_ms, 50)), "p99": float(np.percentile(values_ms, 99)),
            "mean": float(values_ms.mean()), "max": float(values_ms.max())}


def summarize_latency(samples: Sequence[LatencySample], k: int, warmup: int,
                      machine: Optional[Dict[str, Any]] = None) -> rp.LatencyReport:
    """Per kind and stage: p50/p99/mean/max (linear-interpolated percentiles of the samples)."""
    if not samples:
        raise ValueError("no latency samples")
    for what in ("index_backend", "model_version"):
        seen = sorted({getattr(s, what) for s in samples})
        if len(seen) != 1:
            raise ValueError(f"answers came from several {what}s {seen}: one report, one serving set-up")
    kinds = [kd for kd in (REQ_NO_CONTEXT, REQ_SUBJECT_ITEM) if any(s.kind == kd for s in samples)]
    stats: Dict[str, Dict[str, Dict[str, float]]] = {}
    for kind in kinds:
        group = [s for s in samples if s.kind == kind]
        columns = {stage: np.array([s.timings[stage] for s in group]) for stage in rp.LATENCY_STAGES}
        columns[rp.CALLER_WALL] = np.array([s.wall_ms for s in group])
        stats[kind] = {stage: _describe(v) for stage, v in columns.items()}
    return rp.LatencyReport(
        k=int(k), warmup=int(warmup), index_backend=samples[0].index_backend,
        model_version=samples[0].model_version,
        n_requests={kd: sum(s.kind == kd for s in samples) for kd in kinds},
        cold_starts={kd: sum(s.kind == kd and s.cold_start for s in samples) for kd in kinds},
        stats=stats, totals_ms={kd: [s.timings["total"] for s in samples if s.kind == kd] for kd in kinds},
        machine=dict(machine or {}))


def measure_serving_latency(cfg: EvaluateConfig) -> rp.LatencyReport:
    """Time ``cfg.latency_requests`` requests per kind through the real in-process resolver.

    The resolver serves the evaluated contextual bundle.
    """
    resolver = Resolver.from_paths(cfg.contextual_bundle, cfg.index, cfg.feature_repo)
    users = split_users(cfg.lake, cfg.split).tolist()
    requests = latency_requests(users, resolver.bundle.item_ids, cfg.latency_requests)
    # Time the head as the server runs it: on a busy 2-core machine two intra-op threads made a
    # one-row head ~40x slower (11 ms vs 0.25 ms p50) than one.
    previous = torch.get_num_threads()
    torch.set_num_threads(cfg.latency_torch_threads)
    try:
        machine = machine_facts()
        samples = time_requests(resolver.recommend, requests, cfg.latency_k, cfg.latency_warmup)
    finally:
        torch.set_num_threads(previous)
    return summarize_latency(samples, cfg.latency_k, cfg.latency_warmup, machine)


def evaluate_main(argv: Optional[List[str]] = None) -> ev.EvaluationResult:
    """``ctt-evaluate``: models/cli.py's evaluation, with serving latency measured by this
    harness when ``--index`` and ``--feature-repo`` are given."""
    from models.cli import evaluate_main as evaluate

    return evaluate(argv, measure_latency=measure_serving_latency)


# Command-line entry point: the process ends with the exit code main chose (ctt_contracts.process).
evaluate_cli = entry_point(evaluate_main)
