"""Daily refresh benchmark: does the refresh cost scale with the NEW events or with the lake?

Measured with the production code path (``pipelines.refresh.run_refresh``: build_sequences ->
batch inference -> Feast snapshot export -> materialize into a real SQLite online store), on a
Spark ``local[2]`` session, per step:
- lake N: first fill (every user encoded, full materialize), a refresh with nothing new (the
  fixed cost of a refresh; it also warms the JVM before the measured increments), then a
  refresh after appending new events = 1 % of the lake's events, then one after another 5 %;
- lake 2N: first fill, nothing new, then a refresh after appending the SAME absolute number of
  events as the 1 % increment of lake N.
If the refresh scaled with the lake, 2N/N would be ~2; if it scaled with the increment only, ~1.
Batch inference and materialize touch only the affected users by construction; build_sequences
re-derives the per-user histories from all clean events and MERGEs only the differences, so
its part is expected to grow with the lake (reported separately, not hidden in a total).

New events: 2 conversions per chosen user (distinct users, random), one day after the lake's
last event, on existing items (each its own subject item). The model is untrained with the
default ModelConfig (the architecture sets the cost, not the weights). Nothing is hard-coded:
every figure is measured, written to benchmarks/results/refresh.json with the machine, the date
and the load average (this machine is shared).

Usage: PYSPARK_PYTHON=.venv/bin/python python benchmarks/refresh.py [--users 4000] [--quick]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from datetime import timedelta, timezone
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

import benchlib  # sibling module: benchmarks/ is first on sys.path when run as a script

import ctt_contracts as C

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results" / "refresh.json"
EVENTS_PER_USER = 2  # conversions appended per touched user
STEPS = ("build_sequences", "batch_inference", "feast_export", "materialize")


def machine() -> Dict[str, Any]:
    return benchlib.machine(("torch", "pyspark", "delta-spark", "deltalake", "feast"))


def export_model(lake: str, out: Path) -> Path:
    """An untrained default-config bundle whose catalog is the lake's raw items (no malformed
    rows are generated, so raw items = clean items)."""
    from deltalake import DeltaTable

    from models.export import export_bundle
    from models.two_tower import ContextualTwoTower, ModelConfig

    items = DeltaTable(C.LakePaths(lake).table(C.T_RAW_ITEMS)).to_pandas(columns=C.ITEMS_COLUMNS)
    torch.manual_seed(0)
    config = ModelConfig()
    return export_bundle(ContextualTwoTower(config).eval(), config, items, out, "bench-refresh")


def append_events(spark, lake: str, n_events: int, seed: int) -> Dict[str, int]:
    """Append ``n_events`` conversions (EVENTS_PER_USER per distinct random user) one day after
    the lake's last clean event; returns what was appended."""
    from deltalake import DeltaTable

    from pipelines.delta_io import write_raw

    paths = C.LakePaths(lake)
    ev = DeltaTable(paths.table(C.T_EVENTS)).to_pyarrow_table(columns=[C.USER_ID, C.EVENT_TS])
    users = np.unique(ev.column(C.USER_ID).to_numpy())
    last = max(ev.column(C.EVENT_TS).to_pylist())
    last = last if last.tzinfo else last.replace(tzinfo=timezone.utc)
    items = DeltaTable(paths.table(C.T_ITEMS)).to_pyarrow_table(columns=[C.ITEM_ID])
    items = items.column(C.ITEM_ID).to_numpy()
    rng = np.random.default_rng(seed)
    n_users = max(1, n_events // EVENTS_PER_USER)
    if n_users > len(users):
        raise ValueError(f"{n_events} new events need {n_users} users, the lake has {len(users)}")
    chosen = rng.choice(users, size=n_users, replace=False)
    day = last + timedelta(days=1)
    rows = []
    for j, user in enumerate(chosen):
        for e in range(EVENTS_PER_USER):
            item = int(rng.choice(items))
            rows.append((int(user), item, C.EVENT_CONVERSION,
                         day + timedelta(seconds=j * EVENTS_PER_USER + e), "home", item, None))
    write_raw(spark, spark.createDataFrame(rows, C.spark_schema(C.T_RAW_EVENTS)), lake,
              C.T_RAW_EVENTS, mode="append")
    return {"events": len(rows), "users": n_users}


def lake_size(lake: str) -> Dict[str, int]:
    from deltalake import DeltaTable

    ev = DeltaTable(C.LakePaths(lake).table(C.T_EVENTS)).to_pyarrow_table(columns=[C.USER_ID])
    us = DeltaTable(C.LakePaths(lake).table(C.T_USER_SEQUENCES)).to_pyarrow_table(columns=[C.USER_ID])
    return {"clean_events": ev.num_rows, "users_with_history": us.num_rows}


def one_refresh(spark, lake: str, bundle: Path, feast_data: Path, label: str,
                appended: Optional[Dict[str, int]], first: bool = False) -> Dict[str, Any]:
    from pipelines.refresh import run_refresh

    t0 = time.perf_counter()
    res = run_refresh(spark, lake, bundle, feast_data, apply=first)
    total = time.perf_counter() - t0
    us = res.user_sequences_write
    row = {"label": label, "appended": appended, "seconds": {k: round(res.seconds[k], 2) for k in STEPS},
           "total_s": round(total, 2), "users_reencoded": res.inference.encoded,
           "user_sequences_changed": us.inserted + us.updated + us.deleted,
           "states_materialized": res.materialized.states_in_window,
           "full_materialize": res.materialized.full, **lake_size(lake)}
    print(f"  {label:<34} total {total:7.1f}s  " + "  ".join(
        f"{k} {res.seconds[k]:.1f}s" for k in STEPS) + f"  re-encoded {res.inference.encoded}",
        flush=True)
    return row


def run(args: argparse.Namespace) -> Dict[str, Any]:
    from pipelines.cli import run_generate
    from pipelines.delta_io import tune_local_delta
    from pipelines.spark import get_spark
    from pipelines.synthetic import PLANTED, SyntheticConfig

    work = Path(tempfile.mkdtemp(prefix="ctt-bench-refresh-", dir=args.work_dir))
    spark = get_spark("ctt-bench-refresh", master=args.master, shuffle_partitions=args.shuffle_partitions)
    tune_local_delta(spark)
    rows = []
    try:
        lakes = {}
        for name, n_users in (("N", args.users), ("2N", 2 * args.users)):
            lake = str(work / f"lake_{name}")
            cfg = SyntheticConfig(preset=PLANTED, n_users=n_users, n_items=args.items,
                                  malformed_frac=0.0, seed=args.seed)
            print(f"lake {name}: generating {n_users} users", flush=True)
            run_generate(spark, lake, cfg, partitions=None)
            lakes[name] = lake
        # lake N: fill, +1 %, +5 %, nothing new
        lake, data = lakes["N"], work / "feast_N"
        bundle = export_model(lake, work / "bundle")
        fill_n = one_refresh(spark, lake, bundle, data, "lake N: first fill", None, first=True)
        rows.append(fill_n)
        base_events = fill_n["clean_events"]
        one_pct = max(EVENTS_PER_USER, int(round(0.01 * base_events)))
        five_pct = max(EVENTS_PER_USER, int(round(0.05 * base_events)))
        rows.append(one_refresh(spark, lake, bundle, data, "lake N: nothing new", None))
        app = append_events(spark, lake, one_pct, seed=1)
        rows.append(one_refresh(spark, lake, bundle, data, "lake N: +1 % events", app))
        app = append_events(spark, lake, five_pct, seed=2)
        rows.append(one_refresh(spark, lake, bundle, data, "lake N: +5 % events", app))
        # lake 2N: fill, nothing new, then the same absolute increment as lake N's 1 %
        lake, data = lakes["2N"], work / "feast_2N"
        rows.append(one_refresh(spark, lake, bundle, data, "lake 2N: first fill", None, first=True))
        rows.append(one_refresh(spark, lake, bundle, data, "lake 2N: nothing new", None))
        app = append_events(spark, lake, one_pct, seed=3)
        rows.append(one_refresh(spark, lake, bundle, data, "lake 2N: same absolute increment", app))
    finally:
        spark.stop()
        shutil.rmtree(work, ignore_errors=True)
    by = {r["label"]: r for r in rows}
    n1, n5 = by["lake N: +1 % events"], by["lake N: +5 % events"]
    n2 = by["lake 2N: same absolute increment"]

    def ratio(a: Dict[str, Any], b: Dict[str, Any], key: Optional[str] = None) -> float:
        x = a["total_s"] if key is None else a["seconds"][key]
        y = b["total_s"] if key is None else b["seconds"][key]
        return round(x / y, 3) if y else float("nan")

    def above_fixed(a: Dict[str, Any], idle: Dict[str, Any]) -> float:
        return round(a["total_s"] - idle["total_s"], 2)

    idle_n, idle_2n = by["lake N: nothing new"], by["lake 2N: nothing new"]
    marginal = {"lake N: +1 %": above_fixed(n1, idle_n), "lake N: +5 %": above_fixed(n5, idle_n),
                "lake 2N: same absolute increment": above_fixed(n2, idle_2n)}
    ratios = {
        "fixed_cost_2N_over_N": ratio(idle_2n, idle_n),
        "total_5pct_over_1pct": ratio(n5, n1),
        "total_2N_over_N_same_increment": ratio(n2, n1),
        "total_1pct_over_first_fill": ratio(n1, by["lake N: first fill"]),
        **{f"{k}_2N_over_N_same_increment": ratio(n2, n1, k) for k in STEPS},
        **{f"{k}_5pct_over_1pct": ratio(n5, n1, k) for k in STEPS},
    }
    return {"users_N": args.users, "items": args.items, "master": args.master,
            "events_per_touched_user": EVENTS_PER_USER, "runs": rows,
            "seconds_above_nothing_new_refresh": marginal, "ratios": ratios}


def print_table(r: Dict[str, Any]) -> None:
    print(f"\nrefresh, lake N = {r['users_N']} users, Spark {r['master']}")
    head = ["run", "appended events", "users re-encoded"] + [f"{s} s" for s in STEPS] + ["total s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in r["runs"]:
        app = row["appended"]["events"] if row["appended"] else "-"
        cells = [f"{row['label']} ({row['clean_events']:,} events)", str(app),
                 f"{row['users_reencoded']:,}"]
        cells += [f"{row['seconds'][s]:.1f}" for s in STEPS] + [f"{row['total_s']:.1f}"]
        print("| " + " | ".join(cells) + " |")
    print("\nseconds above the same lake's nothing-new refresh:",
          json.dumps(r["seconds_above_nothing_new_refresh"]))
    print("ratios:", json.dumps(r["ratios"]))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=4_000, help="users of lake N (lake 2N has twice)")
    p.add_argument("--items", type=int, default=5_000)
    p.add_argument("--master", default="local[2]")
    p.add_argument("--shuffle-partitions", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    return benchlib.parse_args(p, argv, RESULTS, {"users": 2_000}, "2k users (a smoke run)")


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    benchlib.run_and_report("refresh", lambda: run(args), machine, print_table, args.out)


if __name__ == "__main__":
    main()
