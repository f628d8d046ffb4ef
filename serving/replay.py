"""Shadow evaluation: re-score a structured request log with another bundle + index.

Why: before a new model goes live, the traffic it would get is already on disk (the sampled
request log of ``ctt-serve --request-log``). Replaying every logged request through a resolver
built on the candidate bundle, its index and a feature store that holds the candidate's user
states says, per request, how much the answer changes:

- ``overlap_at_k``: |logged top-k ∩ candidate top-k| / k, k = the request's k (capped by the
  number of logged items);
- ``score_shift``: mean over the logged items of (candidate score - logged score), the candidate
  score being the candidate query · the item's candidate embedding (an item the candidate
  catalog lacks is counted in ``logged_items_missing``, not scored). A positive shift means
  the candidate likes the served items more, a large spread means it scores on another scale.

Requests the candidate cannot answer (its states missing -> version skew, an unknown subject
item, the store down) are counted by error code, never dropped; unreadable log lines likewise.
The report (JSON) has the summary with mean and percentiles; ``--rows`` writes one line per
request.

Usage: python jobs/replay.py --log LOG_DIR --bundle B --index I --feature-repo R [--out report.json]
"""
from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np

import ctt_contracts as C
from ctt_contracts.flags import bundle_field, dataclass_parser, flag_field, from_args
from ctt_contracts.process import entry_point
from serving.cli import ResolverFlags, report_startup_error, startup_errors
from serving.errors import ServingError
from serving.request_log import read_records
from serving.resolver import Resolver

LOG = logging.getLogger(__name__)
PERCENTILES = (5, 25, 50, 75, 95)
MAX_LISTED_PROBLEMS = 50


def score_logged_items(resolver: Resolver, query: np.ndarray,
                       item_ids: List[int]) -> Tuple[np.ndarray, np.ndarray]:
    """The candidate's scores of the logged items: (scores (n,), present mask (n,))."""
    catalog = resolver.bundle.item_ids  # (N,) sorted
    ids = np.asarray(item_ids, dtype=np.int64)  # (n,)
    pos = np.clip(np.searchsorted(catalog, ids), 0, len(catalog) - 1)  # (n,)
    present = catalog[pos] == ids  # (n,)
    scores = resolver.bundle.item_embeddings[pos] @ query  # (n,)
    return scores, present


def replay_record(resolver: Resolver, rec: Dict[str, Any], exact: bool) -> Dict[str, Any]:
    """One logged request through the candidate -> its row of the report."""
    req = rec["request"]
    logged = rec["items"]
    row: Dict[str, Any] = {C.USER_ID: req[C.USER_ID], C.SUBJECT_ITEM_ID: req.get(C.SUBJECT_ITEM_ID),
                           "logged_model_version": rec["model_version"]}
    categories = req.get("categories")
    try:
        resp, query = resolver.recommend_with_query(
            req[C.USER_ID], subject_item_id=req.get(C.SUBJECT_ITEM_ID),
            categories=[tuple(c) for c in categories] if categories is not None else None,
            demographics=req.get("demographics"), k=req["k"], exact=exact)
    except ServingError as exc:
        row.update(error=exc.code, detail=str(exc))
        return row
    k = min(req["k"], len(logged))
    logged_ids = [int(i) for i, _ in logged]
    new_ids = [i for i, _ in resp.items]
    row["k"] = k
    row["overlap_at_k"] = len(set(logged_ids[:k]) & set(new_ids[:k])) / k if k else None
    scores, present = score_logged_items(resolver, query, logged_ids)
    shift = scores[present] - np.asarray([s for _, s in logged], dtype=np.float64)[present]
    row["score_shift"] = float(shift.mean()) if shift.size else None
    row["abs_score_shift_max"] = float(np.abs(shift).max()) if shift.size else None
    row["logged_items_missing"] = int((~present).sum())
    row["cold_start"] = resp.cold_start
    row["cold_start_reason"] = resp.cold_start_reason
    return row


def _dist(values: List[float]) -> Optional[Dict[str, float]]:
    if not values:
        return None
    a = np.asarray(values, dtype=np.float64)
    out = {"mean": float(a.mean()), "min": float(a.min()), "max": float(a.max())}
    out.update({f"p{p}": float(np.percentile(a, p)) for p in PERCENTILES})
    return {k: round(v, 6) for k, v in out.items()}


def summarize(rows: List[Dict[str, Any]], problems: List[Dict[str, Any]],
              resolver: Resolver) -> Dict[str, Any]:
    scored = [r for r in rows if "error" not in r]
    overlaps = [r["overlap_at_k"] for r in scored if r["overlap_at_k"] is not None]
    shifts = [r["score_shift"] for r in scored if r["score_shift"] is not None]
    return {
        "candidate_model_version": resolver.model_version,
        "candidate_index": {"backend": resolver.index.backend, "n_items": resolver.index.size,
                            "built_at": resolver.index.manifest.created_at},
        "logged_model_versions": dict(Counter(r["logged_model_version"] for r in rows)),
        "requests": len(rows), "replayed": len(scored),
        "errors": dict(Counter(r["error"] for r in rows if "error" in r)),
        "unreadable_lines": len(problems), "unreadable": problems[:MAX_LISTED_PROBLEMS],
        "cold_starts": dict(Counter(r["cold_start_reason"] for r in scored if r["cold_start"])),
        "logged_items_missing": int(sum(r["logged_items_missing"] for r in scored)),
        "overlap_at_k": _dist(overlaps),
        "score_shift": _dist(shifts),
        "abs_score_shift": _dist([abs(s) for s in shifts]),
    }


def replay(resolver: Resolver, records: Iterable[Tuple[Path, int, Optional[Dict[str, Any]], Optional[str]]],
           exact: bool = False, limit: Optional[int] = None) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """(summary, rows) for the readable records; unreadable lines are listed in the summary."""
    rows: List[Dict[str, Any]] = []
    problems: List[Dict[str, Any]] = []
    for path, line, rec, problem in records:
        if limit is not None and len(rows) >= limit:
            break
        if rec is None:
            problems.append({"file": str(path), "line": line, "reason": problem})
            continue
        row = replay_record(resolver, rec, exact)
        row.update(file=path.name, line=line)
        rows.append(row)
    return summarize(rows, problems, resolver), rows


@dataclass(frozen=True)
class ReplayConfig:
    """What is replayed, through which candidate bundle, and where the report goes (the
    candidate's index, feature repo and skew policy: ``serving.cli.ResolverFlags``)."""

    log: Tuple[Path, ...] = flag_field(
        "request log files or folders (requests-*.jsonl of ctt-serve --request-log)",
        nargs="+", parse=Path)
    bundle: Path = bundle_field(note="the candidate's")
    exact: bool = flag_field("candidate top-k by brute force", False)
    limit: Optional[int] = flag_field("replay at most this many requests", None)
    out: Optional[Path] = flag_field("write the summary JSON here", None)
    rows: Optional[Path] = flag_field("write one JSON line per request here", None)


def parser() -> argparse.ArgumentParser:
    return dataclass_parser(
        "ctt-replay", "Re-score a request log with a candidate bundle + index: overlap@k and score "
        "shift per request (shadow evaluation before a rollout).",
        (ReplayConfig, ("log", "bundle")), ResolverFlags, ReplayConfig)


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    cfg, candidate = from_args(ReplayConfig, args), from_args(ResolverFlags, args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        resolver = candidate.resolver(cfg.bundle)
        summary, rows = replay(resolver, read_records(list(cfg.log)), exact=cfg.exact,
                               limit=cfg.limit)
    except startup_errors() as exc:
        return report_startup_error("ctt-replay", exc)
    text = json.dumps(summary, indent=2)
    print(text)
    if cfg.out is not None:
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        cfg.out.write_text(text + "\n")
    if cfg.rows is not None:
        cfg.rows.parent.mkdir(parents=True, exist_ok=True)
        cfg.rows.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


# Command-line entry point: the process ends with the exit code main chose (ctt_contracts.process).
cli = entry_point(main)


if __name__ == "__main__":
    cli()
