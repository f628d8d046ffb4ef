"""A tiny `make demo` output, built in seconds, for the report and notebook tests.

Same layout as jobs/demo.py writes under ``--out`` (``lake/``, ``runs/<model>/bundle``,
``feast/``, ``index/``, ``report/``, ``mlflow.db``) and the same components for every step
after the Spark ones: real Lightning training + MLflow (SQLite), a real Feast apply/materialize
over feature_repo/ into its SQLite online store, a real ScaNN index and the real evaluation CLI
with measured resolver latency.

The two Spark steps are replaced, because one JVM start costs more than this whole fixture and
the Spark jobs have their own tests (tests/pipelines, tests/serving_offline):
- generate + build_sequences -> synthetic_lake.write_lake (tests/) (the same planted signal and
  contract tables, written with deltalake);
- batch inference -> pipelines.inference_worker.encode_histories (the function the Spark workers run)
  over each user's latest full history, written to ``user_states`` with deltalake.

A module with a unique name (not conftest) so tests/models and tests/notebooks can both import it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import pyarrow as pa

import ctt_contracts as C
from models.lake_read import read_arrow
from pipelines import feast_ops
from pipelines.feast_ops import scoped_environ as environment  # noqa: F401 (used by the tests)

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "test_tiny.yaml"
# configs/sequence_only.yaml's model switches (an overlay of the contextual config), on the tiny config
SEQUENCE_ONLY_OVERRIDES = ["--model.model_config.use_context", "false",
                           "--model.model_config.use_demographics", "false"]
LATENCY_REQUESTS, LATENCY_WARMUP = 30, 5


@dataclass(frozen=True)
class TinyDemo:
    out: Path
    lake: Path
    feast_data: Path
    contextual_bundle: Path
    sequence_only_bundle: Path
    index: Path
    report: Path
    tracking_uri: str

    @property
    def feature_repo(self) -> Path:
        return feast_ops.FEATURE_REPO


def latest_histories(sequences: pd.DataFrame) -> Dict[int, Tuple[np.ndarray, np.ndarray]]:
    """user -> full conversion history (item ids, epoch seconds), oldest first: the newest
    example's history plus its label, i.e. what user_sequences holds for batch inference."""
    newest = sequences.sort_values([C.USER_ID, C.AS_OF_TS]).groupby(C.USER_ID).tail(1)
    out = {}
    for row in newest.itertuples(index=False):
        r = row._asdict()
        ts = int(pd.Timestamp(r[C.AS_OF_TS]).timestamp())
        out[int(r[C.USER_ID])] = (np.append(np.asarray(r[C.ITEM_IDS], np.int64), r[C.LABEL_ITEM_ID]),
                                  np.append(np.asarray(r[C.EVENT_TS], np.int64), ts))
    return out


def write_user_states(lake: Path, bundle_dir: Path, state_ts: datetime) -> int:
    """Encode every user's latest history with the bundle and write ``user_states`` (overwrite)."""
    from deltalake import write_deltalake

    from models.export import load_bundle
    from pipelines.inference_worker import encode_histories

    bundle = load_bundle(bundle_dir)
    sequences = read_arrow(str(lake / C.T_SEQUENCES))[0].to_pandas()
    hist = latest_histories(sequences)
    users = sorted(hist)
    states = encode_histories(bundle.model.eval(), [hist[u] for u in users])  # (U, S)
    hashes = [hashlib.sha256(hist[u][0].tobytes() + hist[u][1].tobytes()).hexdigest()[:16] for u in users]
    table = pa.table({
        C.USER_ID: pa.array(users, pa.int64()),
        C.HIDDEN_STATE: pa.array([s.tolist() for s in states], pa.list_(pa.float32())),
        C.MODEL_VERSION: pa.array([bundle.model_version] * len(users), pa.string()),
        C.STATE_TS: pa.array([state_ts] * len(users), pa.timestamp("us", tz="UTC")),
        C.SEQUENCE_HASH: pa.array(hashes, pa.string())}).select(C.USER_STATES_COLUMNS)
    write_deltalake(str(lake / C.T_USER_STATES), table, mode="overwrite")
    return len(users)


def evaluate_argv(demo: TinyDemo, out_dir: Path, with_latency: bool = True,
                  run_name: str = "evaluation") -> List[str]:
    """The demo's evaluation command line (jobs/demo.py), at a test-sized request count."""
    argv = ["--lake", str(demo.lake), "--contextual-bundle", str(demo.contextual_bundle),
            "--sequence-only-bundle", str(demo.sequence_only_bundle), "--out-dir", str(out_dir),
            "--run-name", run_name, "--tracking-uri", demo.tracking_uri]
    if with_latency:
        argv += ["--index", str(demo.index), "--feature-repo", str(demo.feature_repo),
                 "--latency-requests", str(LATENCY_REQUESTS), "--latency-warmup", str(LATENCY_WARMUP)]
    return argv


def demo_environment(demo: TinyDemo) -> Dict[str, Optional[str]]:
    """Lake and Feast data folders as jobs/demo.py exports them. MLflow's URI is passed as
    ``--tracking-uri``; MLFLOW_TRACKING_URI is unset so a store configured in the calling shell
    is never touched by the tests."""
    return {C.ENV_LAKE: str(demo.lake), C.ENV_FEAST_DATA: str(demo.feast_data),
            "MLFLOW_TRACKING_URI": None}


def build_tiny_demo(out: Path, evaluate: bool = True, extra_evaluate_args: Optional[Sequence[str]] = None
                    ) -> TinyDemo:
    """Every demo output under ``out`` (see the module docstring); ~20 s on an idle 2-core box."""
    from models.cli import train_main
    from models.export import load_bundle
    from synthetic_lake import FixtureSpec, write_lake
    from serving.index import BACKEND_SCANN, build_index

    out = Path(out).resolve()
    runs = out / "runs"
    demo = TinyDemo(out=out, lake=out / "lake", feast_data=out / "feast",
                    contextual_bundle=runs / "contextual" / "bundle",
                    sequence_only_bundle=runs / "sequence_only" / "bundle", index=out / "index",
                    report=out / "report", tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    write_lake(demo.lake, FixtureSpec())
    with environment(demo_environment(demo)):
        for name, extra in (("contextual", []), ("sequence_only", SEQUENCE_ONLY_OVERRIDES)):
            train_main(["--config", str(TINY_CONFIG), "--data.lake_root", str(demo.lake),
                        "--out-dir", str(runs / name), "--run-name", name,
                        "--tracking-uri", demo.tracking_uri, *extra])
        write_user_states(demo.lake, demo.contextual_bundle, datetime.now(timezone.utc))
        feast_ops.export_feature_tables(demo.lake)
        store = feast_ops.apply(demo.lake, demo.feast_data)
        feast_ops.materialize(store, datetime(2000, 1, 1, tzinfo=timezone.utc),
                              datetime.now(timezone.utc) + timedelta(minutes=1))
        bundle = load_bundle(demo.contextual_bundle)
        # 200 items would get the brute-force backend by default; the fixture forces a real
        # ScaNN tree so the timed search is the one a production catalog uses.
        build_index(bundle.item_ids, bundle.item_embeddings, bundle.model_version, demo.index,
                    backend=BACKEND_SCANN, n_queries=200)
        if evaluate:
            from serving.latency import evaluate_main

            evaluate_main(evaluate_argv(demo, demo.report) + list(extra_evaluate_args or []))
    return demo
