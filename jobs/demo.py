"""`make demo`: the whole system end to end on synthetic data, one documented command per step.

Every step runs as a subprocess with exactly the command the README lists, so a user can copy any
line and run it alone. The demo only adds ordering, timing and the final printout.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import httpx

from ctt_contracts.flags import (RawDescriptionFieldHelpFormatter, dataclass_parser, flag_field,
                                 from_args)
from ctt_contracts.process import run_job

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Step:
    """One command of the pipeline; `cwd` None = repository root."""

    title: str
    argv: List[str]
    cwd: Optional[Path] = None


def _bin(name: str) -> str:
    """A console script of the running virtualenv (spark-submit, feast, ...)."""
    return str(Path(sys.executable).parent / name)


def demo_env(out: Path) -> Dict[str, str]:
    """Environment shared by all steps: where the lake, Feast registry/online store and MLflow live."""
    env = dict(os.environ)
    env.update({
        "CTT_LAKE": str(out / "lake"),
        "CTT_FEAST_DATA": str(out / "feast"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}",
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "SPARK_LOCAL_IP": env.get("SPARK_LOCAL_IP", "127.0.0.1"),
    })
    return env


def steps(out: Path, users: int, items: Optional[int], master: str) -> List[Step]:
    """The pipeline, in order. Paths are absolute so each command also works from anywhere."""
    lake, runs, py = out / "lake", out / "runs", sys.executable
    bundle = runs / "contextual" / "bundle"
    return [
        Step("generate a realistic synthetic log: raw_events/items/users (Delta)",
             [py, "jobs/generate_data.py", "--lake", str(lake), "--users", str(users),
              *([] if items is None else ["--items", str(items)]), "--master", master]),
        Step("validate + build sequences and context rows (spark-submit)",
             [_bin("spark-submit"), "--master", master, "jobs/build_sequences.py", "--lake", str(lake),
              "--min-history", "0"]),
        Step("train the contextual two-tower (Lightning, MLflow)",
             [py, "jobs/train.py", "--config", "configs/contextual.yaml", "--data.lake_root", str(lake),
              "--out-dir", str(runs / "contextual")]),
        Step("train the sequence-only baseline with the same budget",
             [py, "jobs/train.py", "--config", "configs/contextual.yaml", "--config",
              "configs/sequence_only.yaml", "--data.lake_root", str(lake),
              "--out-dir", str(runs / "sequence_only")]),
        Step("batch inference: encoder last hidden state per user -> user_states (spark-submit)",
             [_bin("spark-submit"), "--master", master, "jobs/batch_inference.py", "--lake", str(lake),
              "--bundle", str(bundle)]),
        Step("feast apply", [_bin("feast"), "apply"], REPO / "feature_repo"),
        Step("feast materialize (offline Delta -> SQLite online store)",
             [_bin("feast"), "materialize", "2000-01-01T00:00:00", "2100-01-01T00:00:00"],
             REPO / "feature_repo"),
        Step("build the ScaNN index of the item-tower embeddings",
             [py, "jobs/build_index.py", "--bundle", str(bundle), "--out", str(out / "index")]),
        # Last, so the report also times the real serving path (Feast read, head, ScaNN search).
        Step("evaluate: contextual vs no context vs sequence-only vs popularity, serving latency "
             "(report + MLflow)",
             [py, "jobs/evaluate.py", "--lake", str(lake), "--contextual-bundle", str(bundle),
              "--sequence-only-bundle", str(runs / "sequence_only" / "bundle"),
              "--out-dir", str(out / "report"), "--index", str(out / "index"),
              "--feature-repo", str(REPO / "feature_repo")]),
    ]


def run_step(i: int, n: int, step: Step, env: Dict[str, str]) -> float:
    """Run one step, streaming its output; raise with the command line if it fails."""
    shown = " ".join(step.argv if step.cwd is None else ["(cd", str(step.cwd), "&&", *step.argv, ")"])
    print(f"\n=== [{i}/{n}] {step.title}\n$ {shown}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(step.argv, cwd=step.cwd or REPO, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"step {i} failed (exit {done.returncode}): {shown}")
    print(f"=== [{i}/{n}] done in {seconds:.0f} s", flush=True)
    return seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"resolver exited with {proc.returncode} before becoming healthy")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"resolver not healthy after {timeout:.0f} s")


def pick_demo_user(lake: Path) -> tuple[int, list[int]]:
    """A user with a cached state and two subject items of different primary categories."""
    import ctt_contracts as C
    from models.lake_read import read_arrow

    states = read_arrow(str(lake / C.T_USER_STATES), [C.USER_ID])[0].to_pandas()
    items = read_arrow(str(lake / C.T_ITEMS), [C.ITEM_ID, C.CATEGORY_IDS])[0].to_pandas()
    user = int(states[C.USER_ID].min())
    primary = items[C.CATEGORY_IDS].map(lambda c: int(c[0]))
    first = items.iloc[0]
    other = items[primary != int(first[C.CATEGORY_IDS][0])].iloc[0]
    return user, [int(first[C.ITEM_ID]), int(other[C.ITEM_ID])]


def show_answers(url: str, lake: Path, k: int) -> None:
    """Top items for one user without context and under two different subject items."""
    import ctt_contracts as C
    from models.lake_read import read_arrow

    user, subjects = pick_demo_user(lake)
    items = read_arrow(str(lake / C.T_ITEMS), [C.ITEM_ID, C.CATEGORY_IDS])[0].to_pandas()
    plain = items[C.CATEGORY_IDS].map(lambda c: [int(x) for x in c])  # numpy ints print as np.int32(..)
    cats = dict(zip(items[C.ITEM_ID].astype(int), plain))
    requests = [("no context", {"user_id": user, "k": k})] + [
        (f"subject item {s} (categories {cats[s]})", {"user_id": user, "subject_item_id": s, "k": k})
        for s in subjects
    ]
    for label, body in requests:
        answer = httpx.post(f"{url}/recommend", json=body, timeout=30.0)
        answer.raise_for_status()
        got = answer.json()
        age = got["state_age_seconds"]
        age_text = "no state" if age is None else f"state age {age:.0f} s"
        print(f"\nuser {user}, {label}: model {got['model_version']}, {age_text}, "
              f"cold_start={got['cold_start']}")
        for rank, (item, score) in enumerate(got["items"], 1):  # [item_id, score] pairs, best first
            print(f"  {rank:2d}. item {item:>7}  score {score:+.4f}  categories {cats.get(item)}")


def serve_and_query(out: Path, env: Dict[str, str], k: int) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "jobs/serve.py", "--host", "127.0.0.1", "--port", str(port),
            "--bundle", str(out / "runs" / "contextual" / "bundle"), "--index", str(out / "index"),
            "--feature-repo", str(REPO / "feature_repo")]
    print(f"\n=== resolver\n$ {' '.join(argv)}", flush=True)
    proc = subprocess.Popen(argv, cwd=REPO, env=env)
    try:
        wait_healthy(url, proc)
        show_answers(url, out / "lake", k)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@dataclass(frozen=True)
class DemoConfig:
    """The demo's world and where it goes; each field is a flag (``ctt_contracts.flags``)."""

    out: str = flag_field("folder for every output", "demo_run")
    users: int = flag_field("users of the synthetic world", 30_000)
    items: Optional[int] = flag_field(
        "catalogue size (default: the realistic world's, 45,000 items in 3,000 leaf categories)",
        None)
    master: str = flag_field("Spark master of the Spark steps", "local[*]")
    k: int = flag_field("items shown per answer", 10)
    fresh: bool = flag_field("delete --out first", False)


def demo_parser() -> argparse.ArgumentParser:
    """The demo's command line, read from ``DemoConfig``; its help is this module's docstring."""
    return dataclass_parser("demo", __doc__, DemoConfig,
                            formatter_class=RawDescriptionFieldHelpFormatter)


def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg = from_args(DemoConfig, demo_parser().parse_args(argv))
    out = Path(cfg.out).resolve()
    if cfg.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    env = demo_env(out)
    plan = steps(out, cfg.users, cfg.items, cfg.master)
    started = time.perf_counter()
    timings = {s.title: run_step(i, len(plan), s, env) for i, s in enumerate(plan, 1)}
    serve_and_query(out, env, cfg.k)
    total = time.perf_counter() - started
    (out / "demo_timings.json").write_text(json.dumps({"seconds": timings, "total": total}, indent=2))
    print(f"\nDemo finished in {total / 60:.1f} min. Outputs under {out}:")
    print(f"  report:  {out / 'report' / 'evaluation.md'} (PNG plots beside it)")
    print(f"  notebook: CTT_DEMO_DIR={out} jupyter lab notebooks/walkthrough.ipynb")
    print(f"  MLflow:  mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'} --host 127.0.0.1")


if __name__ == "__main__":
    run_job(main)
