"""Console entry points of serving: `ctt-serve` (HTTP app) and `ctt-build-index` (ScaNN index).

`jobs/serve.py` and `jobs/build_index.py` only import these, so the same code runs as a console
script, as `python jobs/x.py` and under the tests (each `main` takes `argv`).

Start-up errors an operator can fix (missing or corrupt bundle or index, an index of another
model version, a feature repo that does not load or was never applied, a registry without the
feature service) are printed as ONE line on stderr, ``<prog>: error: <what and where>``, and exit
with code 2 like argparse's own usage errors; a traceback would bury the one line that matters.
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from serving.app import DEFAULT_MAX_BODY_BYTES
from serving.index import (BACKENDS, DEFAULT_K, DEFAULT_N_QUERIES, DEFAULT_TARGET_RECALL,
                           build_index)
from serving.errors import ServingError
from serving.metrics import (MULTIPROC_ENV, ServingMetrics, mark_worker_dead, multiprocess_dir,
                             prepare_multiprocess_dir, values_in_files)
from serving.request_log import RequestLog
from serving.resolver import HEAD_BACKENDS, HEAD_NUMPY, SKEW_POLICIES, SKEW_REFUSE, Resolver

LOG = logging.getLogger(__name__)
DEFAULT_HOST = "127.0.0.1"  # loopback unless the operator asks otherwise
DEFAULT_PORT = 8000
EXIT_STARTUP_ERROR = 2  # same code as argparse's usage errors: the command line needs fixing


def startup_errors(with_mlflow: bool = False) -> Tuple[type, ...]:
    """Exceptions that mean "the artifacts or the configuration are wrong", not "a bug"."""
    import yaml
    from feast.errors import FeastError

    from models.export import BundleError

    errors: List[type] = [BundleError, ServingError, FeastError, yaml.YAMLError, OSError,
                          ValueError]
    if with_mlflow:
        from mlflow.exceptions import MlflowException

        errors.append(MlflowException)
    return tuple(errors)


def report_startup_error(prog: str, exc: BaseException) -> int:
    """Print `<prog>: error: <message>` on one line (multi-line messages folded), return 2."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_STARTUP_ERROR


def build_index_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ctt-build-index",
        description="Embed-once ScaNN index of a bundle's catalog (item_embeddings.npy) with a "
                    "manifest recording model_version, dims, parameters and measured recall@k.")
    p.add_argument("--bundle", required=True, type=Path, help="model bundle folder (models.export)")
    p.add_argument("--out", required=True, type=Path,
                   help="index folder to write (<out>/scann + <out>/index_manifest.json)")
    p.add_argument("--k", type=int, default=DEFAULT_K, help="k of the recall target (default 100)")
    p.add_argument("--target-recall", type=float, default=DEFAULT_TARGET_RECALL)
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="default: by catalog size (brute force for tiny catalogs, else ScaNN)")
    p.add_argument("--queries", type=Path, default=None,
                   help="optional .npy (Q, D) of real user-tower queries to tune/measure recall on; "
                        "default: perturbed catalog vectors")
    p.add_argument("--n-queries", type=int, default=DEFAULT_N_QUERIES)
    p.add_argument("--seed", type=int, default=0)
    return p


def build_index_main(argv: Optional[List[str]] = None) -> int:
    """Load the bundle (checksums verified), build + tune + measure the index, print the manifest."""
    parser = build_index_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from models.export import load_bundle

    try:
        bundle = load_bundle(args.bundle)
        queries = None
        source = "perturbed_catalog"
        if args.queries is not None:
            queries = np.load(args.queries, allow_pickle=False)
            source = f"file:{args.queries.name}"
    except startup_errors() as exc:
        return report_startup_error(parser.prog, exc)
    index = build_index(bundle.item_ids, bundle.item_embeddings, bundle.model_version, args.out,
                        queries=queries, query_source=source, k=args.k,
                        target_recall=args.target_recall, backend=args.backend,
                        n_queries=args.n_queries, seed=args.seed)
    print(index.manifest.to_json())
    return 0


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ctt-serve",
        description="Online resolver over HTTP: POST /recommend, GET /health, GET /version.")
    p.add_argument("--host", default=DEFAULT_HOST, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", type=Path, help="model bundle folder")
    src.add_argument("--mlflow-run-id", help="load the bundle logged by this MLflow run")
    src.add_argument("--mlflow-model", help="registered model name (with --mlflow-version)")
    p.add_argument("--mlflow-version", default=None)
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--index", type=Path, default=None,
                   help="index folder from ctt-build-index (default: build one at start-up)")
    p.add_argument("--feature-repo", type=Path, required=True,
                   help="Feast repo folder (feature_store.yaml; `feast apply` done)")
    p.add_argument("--skew-policy", choices=SKEW_POLICIES, default=SKEW_REFUSE,
                   help="cached state of another model version: refuse (409) or serve as cold start")
    p.add_argument("--head", choices=HEAD_BACKENDS, default=HEAD_NUMPY,
                   help="numpy: the head's weights copied to numpy at load (default, fastest); "
                        "torch: the model's own query_from_state (same function)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="intra-op threads of the torch head; 1 is fastest for one-row requests")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="request bodies above this many bytes are answered 413 before parsing "
                        f"(default {DEFAULT_MAX_BODY_BYTES})")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes (gunicorn + uvicorn workers forked after the bundle and "
                        "index are loaded, so they share them read-only); > 1 needs "
                        f"{MULTIPROC_ENV} (an existing folder) for /metrics to add up all workers")
    p.add_argument("--request-log", type=Path, default=None,
                   help="folder of the structured request log (requests-<pid>.jsonl per worker)")
    p.add_argument("--request-log-sample-rate", type=float, default=0.0,
                   help="share of answered recommendations written to --request-log (0 = off)")
    p.add_argument("--log-level", default="info")
    return p


def make_resolver(args: argparse.Namespace) -> Resolver:
    if args.bundle is not None:
        return Resolver.from_paths(args.bundle, args.index, args.feature_repo,
                                   skew_policy=args.skew_policy, head=args.head)
    return Resolver.from_mlflow(run_id=args.mlflow_run_id, model_name=args.mlflow_model,
                                version=args.mlflow_version, index_dir=args.index,
                                feature_repo_dir=args.feature_repo, tracking_uri=args.tracking_uri,
                                skew_policy=args.skew_policy, head=args.head)


def serve_main(argv: Optional[List[str]] = None) -> int:
    """Load everything first (fail fast on a mismatched index/bundle), then run uvicorn."""
    parser = serve_parser()
    args = parser.parse_args(argv)
    if args.max_body_bytes < 0:
        parser.error(f"--max-body-bytes must be >= 0, got {args.max_body_bytes}")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if not 0.0 <= args.request_log_sample_rate <= 1.0:
        parser.error(f"--request-log-sample-rate must be in [0, 1], got {args.request_log_sample_rate}")
    if args.request_log_sample_rate > 0 and args.request_log is None:
        parser.error("--request-log-sample-rate needs --request-log FOLDER")
    if args.workers > 1 and not (values_in_files() and multiprocess_dir()):
        parser.error(f"--workers {args.workers} needs {MULTIPROC_ENV} set to an existing folder in "
                     f"the server's environment (each worker writes its metrics there)")
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch
    import uvicorn

    from serving.app import create_app

    torch.set_num_threads(args.torch_threads)
    try:
        if multiprocess_dir() is not None:
            removed = prepare_multiprocess_dir(Path(multiprocess_dir()))
            LOG.info("metrics folder %s: %d files of an earlier run removed", multiprocess_dir(),
                     removed)
        resolver = make_resolver(args)
        metrics = ServingMetrics()
        request_log = (RequestLog(args.request_log, args.request_log_sample_rate)
                       if args.request_log is not None else None)
    except startup_errors(with_mlflow=args.bundle is None) as exc:
        return report_startup_error(parser.prog, exc)
    LOG.info("resolver ready: %s", json.dumps(resolver.version()))
    app = create_app(resolver, max_body_bytes=args.max_body_bytes, metrics=metrics,
                     request_log=request_log)
    if args.workers == 1:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, workers=1)
    else:
        run_workers(app, resolver, args)
    return 0


def run_workers(app: object, resolver: Resolver, args: argparse.Namespace) -> None:
    """gunicorn master + `args.workers` uvicorn workers forked from this process.

    The app (bundle, numpy head, ScaNN index) is built once here and inherited by every worker
    through fork: the read-only arrays stay shared copy-on-write pages instead of one copy per
    worker. Each worker then opens its own online-store connection (`Resolver.after_fork`), and
    a worker that exits has its live metrics files marked dead.
    """
    from gunicorn.app.base import BaseApplication

    settings = {
        "bind": f"{args.host}:{args.port}",
        "workers": args.workers,
        "worker_class": "uvicorn_worker.UvicornWorker",
        "preload_app": True,
        "keepalive": 5,  # uvicorn's own default keep-alive (s)
        "loglevel": args.log_level,
        "post_fork": lambda _server, _worker: resolver.after_fork(),
        "child_exit": lambda _server, worker: mark_worker_dead(worker.pid),
    }

    class _Server(BaseApplication):
        def load_config(self) -> None:
            for key, value in settings.items():
                self.cfg.set(key, value)

        def load(self) -> object:
            return app

    _Server().run()


if __name__ == "__main__":  # pragma: no cover - use the console scripts or jobs/
    sys.exit(serve_main())
