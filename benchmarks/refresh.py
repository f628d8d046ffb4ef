"""Daily refresh at scale: does a refresh cost what the day's events cost, on a 1M-user lake?

Measured with the production code path (``pipelines.refresh.run_refresh``: incremental
build_sequences -> batch inference of the users in ``user_sequences``' change feed -> Feast
snapshot export -> materialize-incremental into a real SQLite online store), on one Spark
``local[2]`` session, per step, with the peak RSS of the whole process tree (driver, JVM, Python
workers) sampled during each refresh.

Lakes: one per ``--users`` size (default 100k and 1M), generated ONCE with the realistic preset
(calibrated to the REES46 log, ``pipelines.synthetic``) and the same item count at every size,
then filled by a first refresh (every user encoded, full materialize). Generation and first fill
are timed and kept in ``<work-dir>/users_<n>/fill.json``; a rerun reuses the filled lakes (the
days appended by earlier runs stay: each run is a further day).

Each run first refreshes every lake once (it finishes what an interrupted earlier run left),
then gives each a warm-up day of 1,000 events: the first increment of a session pays for the
JIT, the Python workers and their torch import (about 25 s on the first lake measured, which
made lake sizes incomparable). These rows are reported, with no bar. Then, warm:
- every lake: a refresh with nothing new (the fixed cost of a day without events);
- every lake: a day of X new events, X = 1 % of the SMALLEST lake's events (the same absolute
  increment everywhere: if the refresh scaled with the lake, the 10x lake would cost ~10x);
- the largest lake: a day of 1 % of its own events.
The last two are repeated (``--repeats``, default 3; the lakes interleaved) and the bars take
the median: on this shared machine one day's batch inference of the same 770 users took 13 s on
one lake and 30 s on the other, and 24 s for 10x the users an hour later.
New events: the lake's own mix (its share of conversions; the rest views), on existing items, one
day after the lake's newest event; 2 conversions per converting user (distinct random users with
history; REES46's head has 1.57 carts + purchases per user with any in its 3 hours). The model is untrained with the default ModelConfig (the architecture
sets the cost, not the weights). Every figure is measured and written with the machine, the date
and the load average.

Usage: PYSPARK_PYTHON=.venv/bin/python python benchmarks/refresh.py [--users 100000 1000000]
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import psutil
import torch

import benchlib  # sibling module: benchmarks/ is first on sys.path when run as a script

import ctt_contracts as C
from models.lake_read import read_arrow

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results" / "refresh.json"
WORK = REPO_ROOT / "benchmarks" / "work" / "refresh"
EVENTS_PER_USER = 2  # conversions appended per touched user
DAY_FRACTION = 0.01  # a day of new events = 1 % of a lake's events
WARM_UP_EVENTS = 1_000  # the warm-up day: every code path of an increment runs once
STEPS = ("build_sequences", "batch_inference", "feast_export", "materialize")
FILL_RECORD = "fill.json"
BIG = 1_000_000  # the lake size the bars are stated for


def machine() -> Dict[str, Any]:
    return benchlib.machine(("torch", "pyspark", "delta-spark", "deltalake", "feast"))


def export_model(lake: str, out: Path) -> Path:
    """An untrained default-config bundle whose catalog is the lake's raw items (no malformed
    rows are generated, so raw items = clean items)."""
    from models.export import export_bundle
    from models.two_tower import ContextualTwoTower, ModelConfig

    items = read_arrow(C.LakePaths(lake).table(C.T_RAW_ITEMS), C.ITEMS_COLUMNS)[0].to_pandas()
    torch.manual_seed(0)
    config = ModelConfig()
    return export_bundle(ContextualTwoTower(config).eval(), config, items, out, "bench-refresh")


class PeakRss:
    """Peak resident memory (MB) of this process and all its descendants, sampled every
    ``interval`` s in a thread while the ``with`` block runs: Spark's JVM and Python workers
    are children of this process, so the tree is what the machine has to hold."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak_mb = interval, 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:  # a worker exited between listing and reading
                    pass
            self.peak_mb = max(self.peak_mb, total / 2**20)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRss":
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def append_events(spark, lake: str, n_events: int, seed: int) -> Dict[str, int]:
    """Append a day of ``n_events`` events one day after the lake's newest clean event, with the
    lake's own share of conversions: EVENTS_PER_USER conversions per touched user (distinct
    random users), the rest views by random users. Returns what was appended."""
    import pyarrow.compute as pc

    from pipelines.delta_io import write_raw

    paths = C.LakePaths(lake)
    ev = read_arrow(paths.table(C.T_EVENTS), [C.USER_ID, C.EVENT_TS, C.EVENT_TYPE])[0]
    users = np.unique(ev.column(C.USER_ID).to_numpy())
    last = pc.max(ev.column(C.EVENT_TS)).as_py()
    last = C.as_utc(last)
    conv_share = pc.sum(pc.equal(ev.column(C.EVENT_TYPE), C.EVENT_CONVERSION)).as_py() / ev.num_rows
    items = read_arrow(paths.table(C.T_ITEMS), [C.ITEM_ID])[0]
    items = items.column(C.ITEM_ID).to_numpy()
    rng = np.random.default_rng(seed)
    n_users = max(1, int(round(n_events * conv_share / EVENTS_PER_USER)))
    if n_users > len(users):
        raise ValueError(f"{n_events} new events need {n_users} users, the lake has {len(users)}")
    n_views = max(0, n_events - n_users * EVENTS_PER_USER)
    who = np.concatenate([np.repeat(rng.choice(users, size=n_users, replace=False),
                                    EVENTS_PER_USER), rng.choice(users, size=n_views)])
    kinds = [C.EVENT_CONVERSION] * (n_users * EVENTS_PER_USER) + [C.EVENT_VIEW] * n_views
    what = rng.choice(items, size=len(who))
    day = last + timedelta(days=1)
    rows = [(int(u), int(i), k, day + timedelta(seconds=j), "home", int(i), None)
            for j, (u, i, k) in enumerate(zip(who, what, kinds))]
    write_raw(spark, spark.createDataFrame(rows, C.spark_schema(C.T_RAW_EVENTS)), lake,
              C.T_RAW_EVENTS, mode="append")
    return {"events": len(rows), "conversions": n_users * EVENTS_PER_USER, "views": n_views,
            "users_converting": n_users}


def lake_size(lake: str) -> Dict[str, int]:
    ev = read_arrow(C.LakePaths(lake).table(C.T_EVENTS), [C.USER_ID])[0]
    us = read_arrow(C.LakePaths(lake).table(C.T_USER_SEQUENCES), [C.USER_ID])[0]
    return {"clean_events": ev.num_rows, "users_with_history": us.num_rows}


def one_refresh(spark, lake: Path, label: str, appended: Optional[Dict[str, int]],
                first: bool = False) -> Dict[str, Any]:
    """One ``run_refresh`` of ``lake`` (its bundle and Feast folder beside it), timed per step."""
    from pipelines.refresh import run_refresh

    with PeakRss() as rss:
        t0 = time.perf_counter()
        res = run_refresh(spark, str(lake / "lake"), lake / "bundle", lake / "feast", apply=first)
        total = time.perf_counter() - t0
    row = {"label": label, "appended": appended, "build_mode": res.build.mode,
           "seconds": {k: round(res.seconds[k], 2) for k in STEPS}, "total_s": round(total, 2),
           "peak_rss_mb": round(rss.peak_mb), "users_recomputed": res.build.users_recomputed,
           "users_reencoded": res.inference.encoded,
           "states_materialized": res.materialized.states_in_window,
           "full_materialize": res.materialized.full, **lake_size(str(lake / "lake"))}
    print(f"  {label:<44} total {total:7.1f}s  " + "  ".join(
        f"{k} {res.seconds[k]:.1f}s" for k in STEPS)
        + f"  re-encoded {res.inference.encoded}  peak {rss.peak_mb:,.0f} MB", flush=True)
    return row


def fill(spark, n_users: int, items: int, seed: int, work: Path) -> Dict[str, Any]:
    """Generate and first-fill the ``n_users`` lake once; later runs read the stored record."""
    from pipelines.cli import run_generate
    from pipelines.synthetic import REALISTIC, SyntheticConfig

    root = work / f"users_{n_users}"
    record = root / FILL_RECORD
    if record.is_file():
        return json.loads(record.read_text())
    if root.exists():
        raise FileExistsError(f"{root} exists without {FILL_RECORD} (an interrupted fill): "
                              f"delete it and rerun")
    cfg = SyntheticConfig(preset=REALISTIC, n_users=n_users, n_items=items, malformed_frac=0.0,
                          seed=seed)
    print(f"users_{n_users}: generating", flush=True)
    load_before, t0 = benchlib.load_avg(), time.perf_counter()
    run_generate(spark, str(root / "lake"), cfg, partitions=None)
    generate_s = time.perf_counter() - t0
    export_model(str(root / "lake"), root / "bundle")
    first = one_refresh(spark, root, f"{n_users:,} users: first fill", None, first=True)
    out = {"users": n_users, "items": items, "preset": REALISTIC, "seed": seed,
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "generate_s": round(generate_s, 1), "first_fill": first,
           "load_avg_before": load_before, "load_avg_after": benchlib.load_avg()}
    benchlib.write_json(record, out)
    return out


def day(spark, root: Path, n_events: int, label: str, seed: int) -> Dict[str, Any]:
    """Append a day of ``n_events`` conversions to the lake under ``root`` and refresh it."""
    appended = append_events(spark, str(root / "lake"), n_events, seed)
    return one_refresh(spark, root, label, appended)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    from pipelines.delta_io import tune_local_delta
    from pipelines.spark import get_spark

    work = args.work_dir or WORK
    sizes = sorted(args.users)
    spark = get_spark("ctt-bench-refresh", master=args.master,
                      shuffle_partitions=args.shuffle_partitions,
                      extra_conf={"spark.driver.memory": args.driver_memory})
    tune_local_delta(spark)
    try:
        fills = {n: fill(spark, n, args.items, args.seed, work) for n in sizes}
        roots = {n: work / f"users_{n}" for n in sizes}
        small, big = sizes[0], sizes[-1]
        seed = int(time.time())  # a new day each run: other users than the last run's
        runs: List[Dict[str, Any]] = [
            one_refresh(spark, roots[n], f"{n:,} users: catch-up", None) for n in sizes]
        runs += [day(spark, roots[n], WARM_UP_EVENTS, f"{n:,} users: warm-up day", seed + 100 + i)
                 for i, n in enumerate(sizes)]
        noop = {n: one_refresh(spark, roots[n], f"{n:,} users: nothing new", None) for n in sizes}
        runs += noop.values()
        x = max(EVENTS_PER_USER, int(round(DAY_FRACTION * noop[small]["clean_events"])))
        same: Dict[int, List[Dict[str, Any]]] = {n: [] for n in sizes}
        for r in range(args.repeats):  # sizes interleaved: a drift of the machine hits both
            for i, n in enumerate(sizes):
                same[n].append(day(spark, roots[n], x, f"{n:,} users: +{x:,} events (1 % of the "
                                   f"smallest), day {r + 1}", seed + len(sizes) * r + i))
                runs.append(same[n][-1])
        y = int(round(DAY_FRACTION * same[big][0]["clean_events"]))
        pct = [day(spark, roots[big], y, f"{big:,} users: +{y:,} events (1 %), day {r + 1}",
                   seed + len(sizes) * (args.repeats + r)) for r in range(args.repeats)]
        runs += pct
    finally:
        spark.stop()
    same_s = {str(n): [row["total_s"] for row in same[n]] for n in sizes}
    return {"sizes": sizes, "items": args.items, "master": args.master,
            "shuffle_partitions": args.shuffle_partitions, "driver_memory": args.driver_memory,
            "events_per_touched_user": EVENTS_PER_USER, "repeats": args.repeats,
            "fills": list(fills.values()),
            "runs": runs, "noop_s": {str(n): noop[n]["total_s"] for n in sizes},
            "same_increment_events": x, "same_increment_s_runs": same_s,
            "same_increment_s": {n: median(v) for n, v in same_s.items()},
            "same_increment_ratio_largest_over_smallest":
                round(median(same_s[str(big)]) / median(same_s[str(small)]), 3),
            "lake_ratio": big / small, "day_1pct_events": y,
            "day_1pct_largest_s_runs": [row["total_s"] for row in pct],
            "day_1pct_largest_s": median([row["total_s"] for row in pct])}


def median(values: Sequence[float]) -> float:
    """The median of the repeated days (a shared machine's one slow minute is not the figure)."""
    return round(float(np.median(values)), 2)


def bars(r: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Issue-17 bars; stated for a 1M-user lake and a 10x size ratio, so a run at other sizes
    (``--quick``) reports them as not measured."""
    at_scale = r["sizes"][-1] >= BIG and r["lake_ratio"] >= 10
    return [benchlib.bar("refresh_1m_users_1pct_s", r["day_1pct_largest_s"] if at_scale else None,
                         120.0, at_most=True),
            benchlib.bar("refresh_noop_s_1m", r["noop_s"][str(r["sizes"][-1])] if at_scale else None,
                         15.0, at_most=True),
            benchlib.bar("refresh_same_increment_10x_lake_ratio",
                         r["same_increment_ratio_largest_over_smallest"] if at_scale else None,
                         1.2, at_most=True)]


def print_table(r: Dict[str, Any]) -> None:
    for f in r["fills"]:
        ff = f["first_fill"]
        print(f"{f['users']:,} users: generated in {f['generate_s']:.0f}s, first fill "
              f"{ff['total_s']:.0f}s ({ff['clean_events']:,} events, {f['date']})")
    head = ["run", "appended events", "users re-encoded"] + [f"{s} s" for s in STEPS] + [
        "total s", "peak RSS MB"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in r["runs"]:
        app = row["appended"]["events"] if row["appended"] else "-"
        cells = [f"{row['label']} ({row['clean_events']:,} events)", str(app),
                 f"{row['users_reencoded']:,}"]
        cells += [f"{row['seconds'][s]:.1f}" for s in STEPS] + [f"{row['total_s']:.1f}",
                                                                 f"{row['peak_rss_mb']:,}"]
        print("| " + " | ".join(cells) + " |")
    print(json.dumps(bars(r)))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, nargs="+", default=[100_000, BIG],
                   help="one lake per size (the same item count in each)")
    p.add_argument("--items", type=int, default=50_000)
    p.add_argument("--master", default="local[2]")
    p.add_argument("--shuffle-partitions", type=int, default=8)
    p.add_argument("--driver-memory", default="4g",
                   help="JVM heap of the local session (Spark's 1g default fails the 1M-user fill)")
    p.add_argument("--seed", type=int, default=0, help="generator seed of the lakes")
    p.add_argument("--repeats", type=int, default=3,
                   help="days of each measured kind (same increment per lake, 1 %% of the largest); "
                        "the bars take their median")
    return benchlib.parse_args(p, argv, RESULTS, {"users": [2_000, 20_000], "items": 5_000},
                               "2k and 20k users, 5k items (a smoke run; no bars)",
                               work_help=f"where the lakes are kept (default {WORK})")


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    benchlib.run_and_report("refresh", lambda: run(args), machine, print_table, args.out, bars)


if __name__ == "__main__":
    main()
