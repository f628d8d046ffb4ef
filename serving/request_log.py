"""Structured request log: a sampled share of the answered recommendations as JSON lines.

Why: to replay real traffic against a candidate bundle + index before rolling it out
(``jobs/replay.py``: overlap@k and score shift per request), and to see what a user was served.
Each line holds the request as the resolver read it, the versions that answered (model, index),
the state that was used (its model version, its age, cold start), the returned items with their
scores and the stage timings.

Off by default (sample rate 0). Each worker process appends to its own file
``requests-<pid>.jsonl`` in the log folder, so several workers never interleave lines; a line is
written with one ``write`` and flushed at once, so a killed server loses at most the line being
written (``jobs/replay.py`` reports, never skips silently, a line it cannot read).
"""
from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List, Mapping, Optional, Tuple

import ctt_contracts as C

LOG_GLOB = "requests-*.jsonl"
RECORD_VERSION = 1


class RequestLog:
    """Writes a ``sample_rate`` share of the answers; ``sample_rate`` 0 writes nothing."""

    def __init__(self, folder: Path | str, sample_rate: float, seed: Optional[int] = None) -> None:
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"request log sample rate must be in [0, 1], got {sample_rate}")
        self.folder = Path(folder)
        self.sample_rate = sample_rate
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._file: Optional[IO[str]] = None
        self._pid: Optional[int] = None
        if sample_rate > 0:
            self.folder.mkdir(parents=True, exist_ok=True)

    def sampled(self) -> bool:
        return self.sample_rate > 0 and (self.sample_rate >= 1.0 or self._rng.random() < self.sample_rate)

    def write(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._lock:
            self._handle().write(line)
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def _handle(self) -> IO[str]:
        """This process's file (a forked worker opens its own, never its parent's)."""
        pid = os.getpid()
        if self._file is None or self._pid != pid:
            self._file = open(self.folder / f"requests-{pid}.jsonl", "a", encoding="utf-8")
            self._pid = pid
        return self._file


def make_record(request: Mapping[str, Any], response: Mapping[str, Any],
                index_manifest: Any) -> Dict[str, Any]:
    """One log line from the request (as the app passed it to the resolver) and the answer."""
    return {
        "record_version": RECORD_VERSION,
        "ts": round(time.time(), 3),
        "request": {C.USER_ID: request[C.USER_ID], C.SUBJECT_ITEM_ID: request.get(C.SUBJECT_ITEM_ID),
                    "categories": request.get("categories"), "demographics": request.get("demographics"),
                    "k": request["k"], "exact": request.get("exact", False)},
        "model_version": response["model_version"],
        "index": {"model_version": index_manifest.model_version, "backend": response["index_backend"],
                  "built_at": index_manifest.created_at, "n_items": index_manifest.n_items},
        "state_model_version": response["state_model_version"],
        "state_age_seconds": response["state_age_seconds"],
        "cold_start": response["cold_start"], "cold_start_reason": response["cold_start_reason"],
        "context_source": response["context_source"],
        "items": [[int(i), float(s)] for i, s in response["items"]],
        "timings": response["timings"],
    }


def log_files(paths: List[Path]) -> List[Path]:
    """Files to read: each path is a log file, or a folder whose requests-*.jsonl are taken."""
    out: List[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(p.glob(LOG_GLOB))
            if not found:
                raise ValueError(f"no {LOG_GLOB} files in {p}")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise ValueError(f"request log {p} does not exist")
    return out


def read_records(paths: List[Path]) -> Iterator[Tuple[Path, int, Optional[Dict[str, Any]], Optional[str]]]:
    """(file, line number, record or None, why unreadable or None) for every non-empty line."""
    for path in log_files(paths):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield path, n, None, f"not JSON: {exc}"
                    continue
                problem = _record_problem(rec)
                yield path, n, (None if problem else rec), problem


def _record_problem(rec: Any) -> Optional[str]:
    if not isinstance(rec, dict):
        return "not a JSON object"
    missing = [k for k in ("request", "items", "model_version") if k not in rec]
    if missing:
        return f"missing {missing}"
    req = rec["request"]
    if not isinstance(req, dict) or not isinstance(req.get(C.USER_ID), int) or \
            not isinstance(req.get("k"), int):
        return f"request needs integer {C.USER_ID} and k"
    if not isinstance(rec["items"], list) or not all(
            isinstance(p, list) and len(p) == 2 for p in rec["items"]):
        return "items must be [[item_id, score], ...]"
    return None
