"""Benchmark: the sequence build (sequences + context_rows + user_sequences) in Spark vs a
single-process pandas/numpy implementation of the same transform, on the same synthetic data.

    python benchmarks/build_sequences.py --events 1000000 10000000

For each size: (1) prepare, once, a synthetic lake with validated `events` / `items` tables
(benchmarks/work/, git-ignored); (2) run the Spark build and (3) the pandas build, each in its own
subprocess, while this process samples the RSS of that subprocess's whole process tree (driver
Python + JVM + Python workers) with psutil every 50 ms; (4) check that both produced the same rows;
(5) print a table and write benchmarks/results/build_sequences.json.

Steps (2) and (3) are repeated (``--repeats``, default 3), Spark and pandas alternating so that a
drift of this shared machine hits both sides: the same pandas build took 41 s and 66 s within
an hour of one day. Throughput is the median run's, peak memory the highest run's.

Both sides read the same Delta tables and write Parquet, use the same explicit split cutoffs
(exact quantiles computed at preparation) and the same cap / top-k, so their outputs are
compared row for row (arrays, float weights and hashes included). Timings exclude interpreter /
JVM start-up (reported separately for Spark), so events/s is the transform's own throughput.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

import benchlib  # sibling module: benchmarks/ is first on sys.path when run as a script

import ctt_contracts as C
from models.lake_read import read_arrow

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / "work" / "build_sequences"
RESULTS = REPO / "benchmarks" / "results" / "build_sequences.json"
CAP = 100
# The catalog size at every event count, so that sizes differ only in events, users and
# conversions (the transform's cost per event depends on the catalog through the context join).
N_ITEMS = 50_000
TOP_K = C.DEFAULT_CONTEXT_TOP_K


# --------------------------------------------------------------------------------------
# Phase 1: prepare the lake (generate raw, validate, write events/items)
# --------------------------------------------------------------------------------------
def phase_prepare(lake: str, n_events: int, master: str, driver_memory: str) -> Dict:
    from dataclasses import replace

    from pipelines.delta_io import read_table, write_raw
    from pipelines.spark import get_spark
    from pipelines.synthetic import PLANTED, SyntheticConfig, generate, users_for_events
    from pipelines.validate import validate_events, validate_items

    spark = get_spark("bench-prepare", master=master,
                      extra_conf={"spark.driver.memory": driver_memory})
    cfg = SyntheticConfig(preset=PLANTED, n_items=N_ITEMS)
    cfg = replace(cfg, n_users=users_for_events(n_events, cfg))
    tables = generate(spark, cfg)
    paths = C.LakePaths(lake)
    write_raw(spark, tables.items, lake, C.T_RAW_ITEMS)
    write_raw(spark, tables.events, lake, C.T_RAW_EVENTS)
    raw_items = read_table(spark, paths.table(C.T_RAW_ITEMS))
    raw_events = read_table(spark, paths.table(C.T_RAW_EVENTS))
    items, _ = validate_items(raw_items)
    items.write.format("delta").mode("overwrite").save(paths.table(C.T_ITEMS))
    items = read_table(spark, paths.table(C.T_ITEMS))
    events, _ = validate_events(raw_events, items, datetime.now(timezone.utc))
    events.write.format("delta").mode("overwrite").save(paths.table(C.T_EVENTS))
    ev = read_table(spark, paths.table(C.T_EVENTS))
    ts = np.asarray([r[0] for r in ev.where(ev[C.EVENT_TYPE] == C.EVENT_CONVERSION)
                     .selectExpr(f"unix_micros({C.EVENT_TS})").collect()], dtype=np.int64)
    val_us, test_us = (int(q) for q in np.quantile(ts, [0.8, 0.9], method="lower"))
    meta = {"n_events": ev.count(), "n_users": cfg.n_users, "n_items": cfg.n_items,
            "val_start_us": val_us, "test_start_us": test_us, "synthetic": cfg.to_dict()}
    (Path(lake) / "bench_meta.json").write_text(json.dumps(meta, indent=1))
    spark.stop()
    return meta


# --------------------------------------------------------------------------------------
# Phase 2: Spark build
# --------------------------------------------------------------------------------------
def phase_spark(lake: str, out: str, master: str, driver_memory: str, partitions: int) -> Dict:
    t_start = time.perf_counter()
    from pipelines.context import build_context_rows
    from pipelines.delta_io import read_table, tune_local_delta
    from pipelines.sequences import (SplitCutoffs, build_sequences, conversions,
                                     example_keys_from_ranked, examples_from_ranked,
                                     rank_conversions, user_sequences_from_ranked)
    from pipelines.spark import get_spark
    from pyspark import StorageLevel

    meta = json.loads((Path(lake) / "bench_meta.json").read_text())
    spark = get_spark("bench-spark", master=master, shuffle_partitions=partitions,
                      extra_conf={"spark.driver.memory": driver_memory})
    tune_local_delta(spark)  # as the build job's session does (pipelines.cli.job_session)
    spark.range(1).count()  # JVM and executors up
    t_ready = time.perf_counter()
    paths = C.LakePaths(lake)
    events = read_table(spark, paths.table(C.T_EVENTS))
    items = read_table(spark, paths.table(C.T_ITEMS))
    cut = SplitCutoffs(_dt(meta["val_start_us"]), _dt(meta["test_start_us"]))
    ranked = rank_conversions(conversions(events)).persist(StorageLevel.MEMORY_AND_DISK)
    build_sequences(examples_from_ranked(ranked, CAP, 1), cut).write.mode("overwrite").parquet(
        f"{out}/{C.T_SEQUENCES}")
    build_context_rows(example_keys_from_ranked(ranked, CAP, 1), items, TOP_K).write.mode(
        "overwrite").parquet(f"{out}/{C.T_CONTEXT_ROWS}")
    user_sequences_from_ranked(ranked, CAP).write.mode("overwrite").parquet(
        f"{out}/{C.T_USER_SEQUENCES}")
    t_done = time.perf_counter()
    spark.stop()
    return {"startup_s": t_ready - t_start, "seconds": t_done - t_ready}


def _dt(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1e6, tz=timezone.utc)


# --------------------------------------------------------------------------------------
# Phase 3: pandas / numpy baseline of the same transform
# --------------------------------------------------------------------------------------
def pandas_build(events, items, val_us: int, test_us: int, cap: int = CAP, k: int = TOP_K):
    """The reference implementation (one process): returns (sequences, context, user_sequences)."""
    import pandas as pd

    conv = events[events[C.EVENT_TYPE] == C.EVENT_CONVERSION]
    conv = (conv.groupby([C.USER_ID, C.EVENT_TS, C.ITEM_ID], sort=False)[C.SUBJECT_ITEM_ID]
            .min().reset_index())
    ts_us = conv[C.EVENT_TS].to_numpy().astype("datetime64[us]").astype(np.int64)
    conv = conv.assign(__us=ts_us).sort_values([C.USER_ID, "__us", C.ITEM_ID], kind="stable")
    user = conv[C.USER_ID].to_numpy()
    us = conv["__us"].to_numpy()
    item = conv[C.ITEM_ID].to_numpy()
    secs = us // 1_000_000
    subject = conv[C.SUBJECT_ITEM_ID].to_numpy()
    n = len(conv)
    idx = np.arange(n)
    new_user = np.r_[True, user[1:] != user[:-1]]
    new_tie = new_user | np.r_[True, us[1:] != us[:-1]]
    user_start = np.maximum.accumulate(np.where(new_user, idx, 0))
    tie_start = np.maximum.accumulate(np.where(new_tie, idx, 0))
    hist_lo = np.maximum(user_start, tie_start - cap)
    keep = tie_start > hist_lo  # at least one earlier conversion
    rows = np.flatnonzero(keep)
    item_l, secs_l = item.tolist(), secs.tolist()
    seq = pd.DataFrame({
        C.USER_ID: user[rows], "__us": us[rows],
        C.ITEM_IDS: [item_l[hist_lo[r]:tie_start[r]] for r in rows],
        C.EVENT_TS: [secs_l[hist_lo[r]:tie_start[r]] for r in rows],
        C.LABEL_ITEM_ID: item[rows],
    })
    seq[C.SPLIT] = np.where(seq["__us"] < val_us, C.SPLIT_TRAIN,
                            np.where(seq["__us"] < test_us, C.SPLIT_VAL, C.SPLIT_TEST))
    ctx_of = {int(i): C.project_context(c, w, k) for i, c, w in zip(
        items[C.ITEM_ID], items[C.CATEGORY_IDS], items[C.CATEGORY_WEIGHTS])}
    subj_rows = subject[rows]
    ctx = []
    for source, ids in ((C.CONTEXT_PSEUDO, item[rows]), (C.CONTEXT_REAL, subj_rows)):
        mask = ~pd.isna(ids)
        sel = ids[mask].astype(np.int64)
        ctx.append(pd.DataFrame({
            C.USER_ID: user[rows][mask], "__us": us[rows][mask],
            C.LABEL_ITEM_ID: item[rows][mask],
            C.CONTEXT_CATEGORY_IDS: [ctx_of[i][0] for i in sel.tolist()],
            C.CONTEXT_WEIGHTS: [ctx_of[i][1] for i in sel.tolist()],
            C.CONTEXT_SOURCE: source,
            C.SUBJECT_ITEM_ID: pd.array(sel if source == C.CONTEXT_REAL else [None] * len(sel),
                                        dtype="Int64")}))
    context = pd.concat(ctx, ignore_index=True)
    last = np.flatnonzero(np.r_[user[1:] != user[:-1], True])
    lo = np.maximum(user_start[last], last + 1 - cap)
    ids_l = [item_l[a:b + 1] for a, b in zip(lo, last)]
    ts_l = [secs_l[a:b + 1] for a, b in zip(lo, last)]
    user_seq = pd.DataFrame({
        C.USER_ID: user[last], "__us": us[last], C.ITEM_IDS: ids_l, C.EVENT_TS: ts_l,
        C.SEQUENCE_HASH: [hashlib.sha256(json.dumps({"i": a, "t": b}, separators=(",", ":"))
                                         .encode()).hexdigest() for a, b in zip(ids_l, ts_l)]})
    return seq, context, user_seq


def phase_pandas(lake: str, out: str) -> Dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    meta = json.loads((Path(lake) / "bench_meta.json").read_text())
    t0 = time.perf_counter()
    paths = C.LakePaths(lake)
    events = read_arrow(paths.table(C.T_EVENTS))[0].to_pandas()
    items = read_arrow(paths.table(C.T_ITEMS))[0].to_pandas()
    seq, ctx, us = pandas_build(events, items, meta["val_start_us"], meta["test_start_us"])
    Path(out).mkdir(parents=True, exist_ok=True)
    for name, df in ((C.T_SEQUENCES, seq), (C.T_CONTEXT_ROWS, ctx), (C.T_USER_SEQUENCES, us)):
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), f"{out}/{name}.parquet")
    return {"seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------
def _canonical(df, table: str):
    """Rows as sortable tuples with timestamps as epoch microseconds."""
    import pandas as pd

    df = df.copy()
    if C.AS_OF_TS in df.columns:
        df["__us"] = pd.to_datetime(df[C.AS_OF_TS], utc=True).astype("int64") // 1000
        df = df.drop(columns=[C.AS_OF_TS])
    cols = sorted(df.columns)
    conv = [(lambda v: tuple(float(x) for x in v)) if c == C.CONTEXT_WEIGHTS
            else (lambda v: tuple(int(x) for x in v)) if c in (C.ITEM_IDS, C.EVENT_TS,
                                                               C.CONTEXT_CATEGORY_IDS)
            else (lambda v: None if pd.isna(v) else int(v)) if c == C.SUBJECT_ITEM_ID
            else (lambda v: v) for c in cols]
    rows = [tuple(f(v) for f, v in zip(conv, r)) for r in df[cols].itertuples(index=False)]
    rows.sort()
    return cols, rows


def compare_outputs(spark_out: str, pandas_out: str) -> Dict[str, bool]:
    import pandas as pd

    equal = {}
    for table in (C.T_SEQUENCES, C.T_CONTEXT_ROWS, C.T_USER_SEQUENCES):
        a = pd.read_parquet(f"{spark_out}/{table}")
        b = pd.read_parquet(f"{pandas_out}/{table}.parquet")
        equal[table] = _canonical(a, table) == _canonical(b, table)
    return equal


# --------------------------------------------------------------------------------------
# Orchestration with process-tree memory sampling
# --------------------------------------------------------------------------------------
def run_measured(args: List[str]) -> Dict:
    """Run this script in a subprocess; return its JSON result plus the tree's peak RSS."""
    import psutil

    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable,
               SPARK_LOCAL_IP=os.environ.get("SPARK_LOCAL_IP", "127.0.0.1"))
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    peak = [0]
    loads: List[float] = []
    stop = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                rss = 0
                for p in procs:
                    try:
                        rss += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak[0] = max(peak[0], rss)
                loads.append(os.getloadavg()[0])
            except psutil.Error:
                return
            time.sleep(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    stdout, stderr = proc.communicate()
    stop.set()
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"phase {args[:2]} failed:\n{stderr[-4000:]}")
    result = json.loads(next(line for line in stdout.splitlines()
                             if line.startswith("RESULT ")).split(" ", 1)[1])
    result["peak_rss_mb"] = peak[0] / 2**20
    # The machine may be shared: the 1-minute load average during the phase qualifies the timing.
    result["mean_load_avg_1m"] = round(sum(loads) / len(loads), 2) if loads else None
    return result


def machine() -> Dict:
    import psutil

    return {**benchlib.machine(("pyspark", "pandas", "delta-spark")),
            "ram_gb": round(psutil.virtual_memory().total / 2**30, 1)}


BAR_EVENTS = 10_000_000


def bars(results: List[Dict]) -> List[Dict]:
    """Issue-17 bars at 10M events: Spark throughput >= pandas', Spark peak RSS <= pandas'."""
    row = next((r for r in results if r["events_requested"] == BAR_EVENTS), None)
    return [benchlib.bar("build_10m_spark_vs_pandas",
                         row and round(row["ratio_events_per_s_spark_over_pandas"], 3), 1.0),
            benchlib.bar("build_10m_peak_rss_spark_vs_pandas",
                         row and round(row["ratio_peak_rss_spark_over_pandas"], 3), 1.0, at_most=True)]


def report(measurement: benchlib.Measurement, info: Dict, config: Dict, by_size: List[Dict]) -> Dict:
    """The results JSON: every size measured so far (this run's and, for sizes it did not run,
    the previous file's) under ``result`` with the settings, the bars read from them."""
    return measurement.envelope(info, bars(by_size), {"config": config, "by_size": by_size})


def summarise(runs: List[Dict]) -> Dict:
    """One side's repeated runs -> median seconds (and JVM start), the highest peak RSS, the
    mean of the recorded loads (None if no run recorded one), and every run's figures."""
    loads = [r["mean_load_avg_1m"] for r in runs if r["mean_load_avg_1m"] is not None]
    out = {"seconds": float(np.median([r["seconds"] for r in runs])),
           "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
           "mean_load_avg_1m": round(float(np.mean(loads)), 2) if loads else None,
           "runs": runs}
    if "startup_s" in runs[0]:
        out["startup_s"] = float(np.median([r["startup_s"] for r in runs]))
    return out


def bench_one(n_events: int, master: str, driver_memory: str, partitions: int,
              reuse: bool, repeats: int) -> Dict:
    work = WORK / f"events_{n_events}"
    lake = str(work / "lake")
    if not (reuse and (Path(lake) / "bench_meta.json").exists()):
        print(f"[{n_events}] preparing the synthetic lake ...", flush=True)
        run_measured(["--phase", "prepare", "--lake", lake, "--events", str(n_events),
                      "--master", master, "--driver-memory", driver_memory])
    meta = json.loads((Path(lake) / "bench_meta.json").read_text())
    spark_runs, pandas_runs = [], []
    for r in range(repeats):
        print(f"[{n_events}] spark build {r + 1}/{repeats} ...", flush=True)
        spark_runs.append(run_measured(["--phase", "spark", "--lake", lake,
                                        "--out", str(work / "spark_out"), "--master", master,
                                        "--driver-memory", driver_memory,
                                        "--partitions", str(partitions)]))
        print(f"[{n_events}] pandas build {r + 1}/{repeats} ...", flush=True)
        pandas_runs.append(run_measured(["--phase", "pandas", "--lake", lake,
                                         "--out", str(work / "pandas_out")]))
    spark_res, pandas_res = summarise(spark_runs), summarise(pandas_runs)
    equal = compare_outputs(str(work / "spark_out"), str(work / "pandas_out"))
    n = meta["n_events"]
    for res in (spark_res, pandas_res):
        res["events_per_s"] = n / res["seconds"]
    return {
        "events_requested": n_events, "events": n, "users": meta["n_users"],
        "items": meta["n_items"], "spark": spark_res, "pandas": pandas_res,
        "ratio_events_per_s_spark_over_pandas": spark_res["events_per_s"] / pandas_res["events_per_s"],
        "ratio_peak_rss_spark_over_pandas": spark_res["peak_rss_mb"] / pandas_res["peak_rss_mb"],
        "outputs_equal": equal,
    }


def print_table(rows: List[Dict]) -> None:
    head = (f"{'events':>10} | {'spark ev/s':>11} {'spark s':>8} {'spark MB':>9} | "
            f"{'pandas ev/s':>11} {'pandas s':>8} {'pandas MB':>9} | {'ev/s ratio':>10} "
            f"{'mem ratio':>9} | equal")
    print(head)
    print("-" * len(head))
    for r in rows:
        s, p = r["spark"], r["pandas"]
        print(f"{r['events']:>10} | {s['events_per_s']:>11.0f} {s['seconds']:>8.1f} "
              f"{s['peak_rss_mb']:>9.0f} | {p['events_per_s']:>11.0f} {p['seconds']:>8.1f} "
              f"{p['peak_rss_mb']:>9.0f} | {r['ratio_events_per_s_spark_over_pandas']:>10.2f} "
              f"{r['ratio_peak_rss_spark_over_pandas']:>9.2f} | {all(r['outputs_equal'].values())}")


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, nargs="+", default=[1_000_000],
                   help="event counts to benchmark (e.g. 1000000 10000000)")
    p.add_argument("--master", default="local[*]")
    p.add_argument("--driver-memory", default="6g")
    p.add_argument("--partitions", type=int, default=8, help="spark.sql.shuffle.partitions")
    p.add_argument("--out", default=str(RESULTS), help="results JSON (default %(default)s)")
    p.add_argument("--no-reuse", action="store_true", help="regenerate the lakes")
    p.add_argument("--repeats", type=int, default=3,
                   help="measured runs per side and size, Spark and pandas alternating")
    p.add_argument("--phase", choices=("prepare", "spark", "pandas"), help=argparse.SUPPRESS)
    p.add_argument("--lake", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase:  # internal: one measured phase in this subprocess; --out is its output folder
        out = args.out
        if args.phase == "prepare":
            res = phase_prepare(args.lake, args.events[0], args.master, args.driver_memory)
        elif args.phase == "spark":
            res = phase_spark(args.lake, out, args.master, args.driver_memory, args.partitions)
        else:
            res = phase_pandas(args.lake, out)
        print("RESULT " + json.dumps(res))
        return
    info, measurement = machine(), benchlib.Measurement("build_sequences")
    config = {"cap": CAP, "context_top_k": TOP_K, "master": args.master,
              "driver_memory": args.driver_memory, "shuffle_partitions": args.partitions,
              "repeats": args.repeats}
    rows = []
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    by_size = {r["events_requested"]: r for r in previous.get("result", {}).get("by_size", [])}
    for n in args.events:
        rows.append(bench_one(n, args.master, args.driver_memory, args.partitions,
                              reuse=not args.no_reuse, repeats=args.repeats))
        by_size[n] = rows[-1]
        benchlib.write_json(Path(args.out), report(measurement, info, config,
                                                   [by_size[k] for k in sorted(by_size)]))
    print_table(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
