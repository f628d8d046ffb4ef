"""Batch inference benchmark: the Spark job (local[2]) against a plain single-process torch loop.

What it measures, on the same users, the same bundle and the same batch size:
- spark_first: ``pipelines.inference.run_batch_inference`` on an empty ``user_states`` (every
  user encoded, appended), end to end: Delta read, classification, mapInArrow encoding, write;
- spark_new_version: the same job after a model change (every user re-encoded, MERGE updates);
- baseline: one Python process, ``deltalake`` read of user_sequences + ``pad_history`` +
  ``encode_user_state`` in batches under ``torch.inference_mode`` with torch's default threads
  (all cores), no write. This is the "just run it in a loop" alternative the Spark job must not
  lose badly to: target Spark <= 1.5x the baseline's time at 100k+ users.
The states written by Spark are compared with the baseline's (max abs difference, must be
<= 1e-5). Users/s and the ratio go to benchmarks/results/batch_inference.json with the machine
and its load average (this machine is shared: figures move with the load; nothing is
hard-coded).

Set-up: an untrained, seeded model with the default ModelConfig (the architecture, not the
weights, sets the cost) exported with models.export over a synthetic catalog; histories of 1-100
conversions (geometric, mean ~8, like the synthetic data), written to a real Delta
user_sequences table with the production hash.

Usage: PYSPARK_PYTHON=.venv/bin/python python benchmarks/batch_inference.py [--users 100000]
       [--batch-size 1024] [--master local[2]] [--quick]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import torch

import benchlib  # sibling module: benchmarks/ is first on sys.path when run as a script

from models.export import export_bundle, load_bundle
from models.lake_read import read_arrow
from models.two_tower import ContextualTwoTower, ModelConfig
import ctt_contracts as C
from pipelines.inference import run_batch_inference
from pipelines.inference_worker import DEFAULT_BATCH_SIZE, encode_histories

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results" / "batch_inference.json"
TARGET_RATIO = 1.5  # spark time / baseline time
TOLERANCE = 1e-5


def machine() -> Dict[str, Any]:
    return {**benchlib.machine(("torch", "pyspark", "delta-spark", "deltalake", "numpy")),
            "torch_threads_baseline": torch.get_num_threads()}


def synthetic_catalog(n_items: int, rng: np.random.Generator) -> pd.DataFrame:
    k = rng.integers(1, 6, n_items)
    return pd.DataFrame({
        C.ITEM_ID: np.arange(n_items, dtype=np.int64),
        C.CATEGORY_IDS: [rng.choice(500, size=int(n), replace=False).astype(np.int32) for n in k],
        C.CATEGORY_WEIGHTS: [np.sort(rng.uniform(0.05, 1, int(n)))[::-1].astype(np.float32) for n in k],
        C.ADVERTISER_ID: rng.integers(0, 100, n_items).astype(np.int64)})


def write_user_sequences(spark, lake: str, n_users: int, n_items: int, rng: np.random.Generator) -> float:
    """user_sequences with the contract schema and pipelines.sequences' hash; returns the mean
    history length."""
    from pipelines.sequences import sequence_hash

    lengths = np.minimum(rng.geometric(1 / 8, n_users), 100)
    ts = [np.sort(rng.integers(1_700_000_000, 1_730_000_000, n)).astype(np.int64) for n in lengths]
    frame = pd.DataFrame({
        C.USER_ID: np.arange(n_users, dtype=np.int64),
        C.AS_OF_TS: pd.to_datetime([t[-1] for t in ts], unit="s", utc=True),
        C.ITEM_IDS: [rng.integers(0, n_items, n).astype(np.int64) for n in lengths],
        C.EVENT_TS: ts, C.SEQUENCE_HASH: ""})
    df = spark.createDataFrame(frame, C.spark_schema(C.T_USER_SEQUENCES)).withColumn(
        C.SEQUENCE_HASH, sequence_hash())
    df.write.format("delta").mode("overwrite").save(C.LakePaths(lake).table(C.T_USER_SEQUENCES))
    return float(lengths.mean())


def baseline(lake: str, bundle_dir: Path, batch_size: int) -> tuple[Dict[str, float], pd.DataFrame]:
    """Plain loop: read with deltalake, encode in batches; returns timings and states."""
    t0 = time.perf_counter()
    seq = read_arrow(C.LakePaths(lake).table(C.T_USER_SEQUENCES),
                     [C.USER_ID, C.ITEM_IDS, C.EVENT_TS])[0].to_pandas()
    t1 = time.perf_counter()
    model = load_bundle(bundle_dir).model
    states = encode_histories(model, list(zip(seq[C.ITEM_IDS], seq[C.EVENT_TS])), batch_size)
    t2 = time.perf_counter()
    out = pd.DataFrame({C.USER_ID: seq[C.USER_ID].to_numpy(), "state": list(states)})
    return {"read_s": t1 - t0, "encode_s": t2 - t1, "total_s": t2 - t0}, out


def max_abs_diff(lake: str, reference: pd.DataFrame) -> float:
    got = read_arrow(C.LakePaths(lake).table(C.T_USER_STATES),
                     [C.USER_ID, C.HIDDEN_STATE])[0].to_pandas().set_index(C.USER_ID)
    ref = reference.set_index(C.USER_ID)
    if set(got.index) != set(ref.index):
        raise AssertionError(f"Spark wrote {len(got)} users, the baseline encoded {len(ref)}")
    a = np.stack(got.loc[ref.index, C.HIDDEN_STATE].map(lambda v: np.asarray(v, np.float32)).to_numpy())
    b = np.stack(ref["state"].to_numpy())
    return float(np.abs(a - b).max())


def run(args: argparse.Namespace) -> Dict[str, Any]:
    from pipelines.delta_io import tune_local_delta
    from pipelines.spark import get_spark

    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="ctt-bench-bi-", dir=args.work_dir))
    try:
        config = ModelConfig()
        catalog = synthetic_catalog(args.items, rng)
        bundles = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            bundles.append(export_bundle(ContextualTwoTower(config).eval(), config, catalog,
                                         work / f"bundle{seed}", f"bench-{seed}"))
        spark = get_spark("ctt-bench-batch-inference", master=args.master)
        tune_local_delta(spark)
        lake = str(work / "lake")
        mean_len = write_user_sequences(spark, lake, args.users, args.items, rng)

        t0 = time.perf_counter()
        first = run_batch_inference(spark, lake, str(bundles[0]), args.batch_size, args.partitions)
        spark_first = time.perf_counter() - t0
        base_times, reference = baseline(lake, bundles[0], args.batch_size)
        diff = max_abs_diff(lake, reference)

        t0 = time.perf_counter()
        second = run_batch_inference(spark, lake, str(bundles[1]), args.batch_size, args.partitions)
        spark_second = time.perf_counter() - t0
        t0 = time.perf_counter()
        noop = run_batch_inference(spark, lake, str(bundles[1]), args.batch_size, args.partitions)
        spark_noop = time.perf_counter() - t0
        spark.stop()
        if diff > TOLERANCE:
            raise AssertionError(f"Spark states differ from the plain loop by {diff:.2e} > {TOLERANCE}")
        n = args.users
        return {
            "users": n, "batch_size": args.batch_size, "master": args.master,
            "partitions": args.partitions or "defaultParallelism",
            "model": {"dim": config.dim, "n_layers": config.n_layers, "max_len": config.max_len,
                      "state_dim": config.state_dim},
            "mean_history_len": round(mean_len, 2),
            "spark_first": {"seconds": round(spark_first, 2), "users_per_s": round(n / spark_first, 1),
                            "encoded": first.encoded, "committed": first.committed},
            "spark_new_version": {"seconds": round(spark_second, 2),
                                  "users_per_s": round(n / spark_second, 1),
                                  "encoded": second.encoded, "model_changed": second.model_changed},
            "spark_noop_rerun": {"seconds": round(spark_noop, 2), "encoded": noop.encoded,
                                 "committed": noop.committed},
            "baseline": {k: round(v, 2) for k, v in base_times.items()}
            | {"users_per_s": round(n / base_times["total_s"], 1),
               "encode_only_users_per_s": round(n / base_times["encode_s"], 1)},
            "ratio_spark_first_over_baseline": round(spark_first / base_times["total_s"], 3),
            "ratio_spark_new_version_over_baseline": round(spark_second / base_times["total_s"], 3),
            "target_ratio_max": TARGET_RATIO,
            "max_abs_state_diff": diff,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bars(r: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The Spark job's time over the plain loop's, first run and full re-encode."""
    return [benchlib.bar("batch_inference_first_run_vs_plain_loop",
                         r["ratio_spark_first_over_baseline"], TARGET_RATIO, at_most=True),
            benchlib.bar("batch_inference_new_model_vs_plain_loop",
                         r["ratio_spark_new_version_over_baseline"], TARGET_RATIO, at_most=True)]


def print_table(r: Dict[str, Any]) -> None:
    b = r["baseline"]
    print(f"\nbatch inference, {r['users']} users, batch {r['batch_size']}, Spark {r['master']}")
    print(f"{'path':<38}{'seconds':>10}{'users/s':>12}{'x baseline':>12}")
    print(f"{'plain torch loop (read + encode)':<38}{b['total_s']:>10.2f}{b['users_per_s']:>12.1f}"
          f"{1.0:>12.2f}")
    print(f"{'  of which encode only':<38}{b['encode_s']:>10.2f}{b['encode_only_users_per_s']:>12.1f}")
    for key, label in (("spark_first", "spark job, first run (append)"),
                       ("spark_new_version", "spark job, new model (MERGE all)")):
        s = r[key]
        print(f"{label:<38}{s['seconds']:>10.2f}{s['users_per_s']:>12.1f}"
              f"{s['seconds'] / b['total_s']:>12.2f}")
    print(f"{'spark job, rerun with nothing new':<38}{r['spark_noop_rerun']['seconds']:>10.2f}")
    print(f"max |spark - loop| = {r['max_abs_state_diff']:.2e}; target ratio <= {r['target_ratio_max']}")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--items", type=int, default=50_000)
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--master", default="local[2]")
    p.add_argument("--partitions", type=int, default=None)
    return benchlib.parse_args(p, argv, RESULTS, {"users": 10_000},
                               "10k users (a smoke run, not the target)")


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    benchlib.run_and_report("batch_inference", lambda: run(args), machine, print_table, args.out,
                            bars)


if __name__ == "__main__":
    main()
