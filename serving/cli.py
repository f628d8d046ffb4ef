"""Console entry points of serving: `ctt-serve` (HTTP app) and `ctt-build-index` (ScaNN index).

`jobs/serve.py` and `jobs/build_index.py` only import these, so the same code runs as a console
script, as `python jobs/x.py` and under the tests (each `main` takes `argv`).

Start-up errors an operator can fix (missing or corrupt bundle or index, an index of another
model version, a feature repo that does not load or was never applied, a registry without the
feature service) are printed as ONE line on stderr, ``<prog>: error: <what and where>``, and exit
with code 2 like argparse's own usage errors; a traceback would bury the one line that matters.
Anything else is a bug and keeps its traceback.

The flags are read from the config dataclasses below (``ctt_contracts.flags``), which each main
builds from the parsed flags and passes on: ``IndexBuildConfig`` (ctt-build-index),
``ModelSource`` + ``ResolverFlags`` + ``ServeConfig`` (ctt-serve); ``ResolverFlags`` (index,
feature repo, skew policy) is ctt-replay's too.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from ctt_contracts.flags import (add_exclusive_flags, bundle_field, dataclass_parser,
                                 feature_repo_field, flag_field, from_args, index_field,
                                 tracking_uri_field)
from ctt_contracts.process import entry_point
from serving.app import DEFAULT_MAX_BODY_BYTES
from serving.index import (BACKENDS, DEFAULT_K, DEFAULT_N_QUERIES, DEFAULT_TARGET_RECALL,
                           MAX_DEFAULT_SHARDS, SHARD_MIN_ITEMS, ItemIndex, build_index,
                           usable_cores)
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


@dataclass(frozen=True)
class IndexBuildConfig:
    """What ``ctt-build-index`` builds: the bundle's catalog, where to, and how it is tuned."""

    bundle: Path = bundle_field()
    out: Path = flag_field(
        "index folder to write (<out>/scann/<shard>/ + <out>/index_manifest.json)")
    k: int = flag_field("k of the recall target", DEFAULT_K)
    target_recall: float = flag_field("recall@k the tuned index must reach against brute force",
                                      DEFAULT_TARGET_RECALL)
    backend: Optional[str] = flag_field(
        "default: by catalog size (brute force for tiny catalogs, else ScaNN)", None,
        choices=BACKENDS)
    queries: Optional[Path] = flag_field(
        "optional .npy (Q, D) of real user-tower queries to tune/measure recall on; default: "
        "perturbed catalog vectors", None)
    n_queries: int = flag_field("queries drawn to tune and measure recall", DEFAULT_N_QUERIES)
    seed: int = flag_field("seed of the perturbed queries", 0)
    shards: Optional[int] = flag_field(
        "row-range shards, one ScaNN searcher each, searched in parallel threads by the server; "
        f"default: one per {SHARD_MIN_ITEMS:,} items, at most {MAX_DEFAULT_SHARDS}", None)

    def __post_init__(self) -> None:
        if self.shards is not None and self.shards < 1:
            raise ValueError(f"--shards must be >= 1, got {self.shards}")


def build_index_parser() -> argparse.ArgumentParser:
    return dataclass_parser(
        "ctt-build-index",
        "Embed-once ScaNN index of a bundle's catalog (item_embeddings.npy) with a manifest "
        "recording model_version, dims, parameters and measured recall@k.", IndexBuildConfig)


def build_index_main(argv: Optional[List[str]] = None) -> int:
    """Load the bundle (checksums verified), build + tune + measure the index, print the manifest."""
    parser = build_index_parser()
    try:
        cfg = from_args(IndexBuildConfig, parser.parse_args(argv))
    except ValueError as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from models.export import load_bundle

    try:
        bundle = load_bundle(cfg.bundle)
        queries = None
        source = "perturbed_catalog"
        if cfg.queries is not None:
            queries = np.load(cfg.queries, allow_pickle=False)
            source = f"file:{cfg.queries.name}"
    except startup_errors() as exc:
        return report_startup_error(parser.prog, exc)
    index = build_index(bundle.item_ids, bundle.item_embeddings, bundle.model_version, cfg.out,
                        queries=queries, query_source=source, k=cfg.k,
                        target_recall=cfg.target_recall, backend=cfg.backend,
                        n_queries=cfg.n_queries, seed=cfg.seed, shards=cfg.shards)
    print(index.manifest.to_json())
    return 0


@dataclass(frozen=True, kw_only=True)
class ResolverFlags:
    """What a resolver is built from besides its bundle: the flags ctt-serve and ctt-replay
    share."""

    index: Optional[Path] = index_field("default: build one at start-up, in a temporary folder")
    feature_repo: Path = feature_repo_field(note="its online store holds the bundle's user states")
    skew_policy: str = flag_field(
        "a cached state of another model version: refuse it (HTTP 409; a replay counts a "
        "version_skew error) or serve the request as a cold start", SKEW_REFUSE,
        choices=SKEW_POLICIES)

    def resolver(self, bundle: Path, head: str = HEAD_NUMPY) -> Resolver:
        """The resolver these flags describe. The head is a parameter, not a flag here: serve
        takes it from ``--head``, replay always scores with the serving default."""
        return Resolver.from_paths(bundle, self.index, self.feature_repo,
                                   skew_policy=self.skew_policy, head=head)


@dataclass(frozen=True)
class ModelSource:
    """Where ctt-serve loads its bundle from: a folder, or MLflow (exactly one of the first
    three fields; the parser puts them in a required, mutually exclusive group)."""

    bundle: Optional[Path] = bundle_field(None)
    mlflow_run_id: Optional[str] = flag_field("load the bundle logged by this MLflow run", None)
    mlflow_model: Optional[str] = flag_field("registered model name (with --mlflow-version)", None)
    mlflow_version: Optional[str] = flag_field("version of --mlflow-model", None)
    tracking_uri: Optional[str] = tracking_uri_field(
        "where --mlflow-run-id / --mlflow-model are looked up; default $MLFLOW_TRACKING_URI")


SOURCE_FIELDS = ("bundle", "mlflow_run_id", "mlflow_model")  # exactly one of them
MLFLOW_FIELDS = ("mlflow_version", "tracking_uri")


@dataclass(frozen=True)
class ServeConfig:
    """The HTTP server around the resolver: where it listens, its head, its processes, its
    request log."""

    host: str = flag_field("bind address", DEFAULT_HOST)
    port: int = flag_field("port", DEFAULT_PORT)
    head: str = flag_field(
        "numpy: the head's weights copied to numpy at load (the fastest); torch: the model's own "
        "query_from_state (same function)", HEAD_NUMPY, choices=HEAD_BACKENDS)
    torch_threads: int = flag_field(
        "intra-op threads of the torch head; 1 is fastest for one-row requests", 1)
    search_threads: Optional[int] = flag_field(
        "threads one request's index search fans out over (at most one per index shard); "
        "default: this machine's cores / --workers, so that busy workers do not contend", None)
    max_body_bytes: int = flag_field(
        "request bodies above this many bytes are answered 413 before parsing",
        DEFAULT_MAX_BODY_BYTES)
    workers: int = flag_field(
        "worker processes (gunicorn + uvicorn workers forked after the bundle and index are "
        "loaded, so they share them read-only); > 1 needs "
        f"{MULTIPROC_ENV} (an existing folder) for /metrics to add up all workers", 1)
    request_log: Optional[Path] = flag_field(
        "folder of the structured request log (requests-<pid>.jsonl per worker)", None)
    request_log_sample_rate: float = flag_field(
        "share of answered recommendations written to --request-log (0 = off)", 0.0)
    log_level: str = flag_field("log level of the server and the resolver", "info")

    def __post_init__(self) -> None:
        if self.max_body_bytes < 0:
            raise ValueError(f"--max-body-bytes must be >= 0, got {self.max_body_bytes}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.search_threads is not None and self.search_threads < 1:
            raise ValueError(f"--search-threads must be >= 1, got {self.search_threads}")
        if not 0.0 <= self.request_log_sample_rate <= 1.0:
            raise ValueError(f"--request-log-sample-rate must be in [0, 1], "
                             f"got {self.request_log_sample_rate}")
        if self.request_log_sample_rate > 0 and self.request_log is None:
            raise ValueError("--request-log-sample-rate needs --request-log FOLDER")

    def threads_per_search(self) -> int:
        """--search-threads, else the cores each worker has to itself: at low load a request's
        shards run side by side; at saturation every core is already busy with a request of its
        own, and more threads than cores only add hand-offs (README: "Index shards and search
        threads")."""
        if self.search_threads is not None:
            return self.search_threads
        return max(1, usable_cores() // self.workers)


def warn_serial_shards(index: ItemIndex) -> None:
    """A sharded index searched with fewer threads than shards runs shards one after another:
    more CPU per request than one searcher (at 1M items, serving benchmark: "Index layouts")."""
    if index.search_threads < len(index.searchers):
        LOG.warning("the index has %d shards but each request searches with %d thread(s): "
                    "shards run one after another, which costs more CPU than one searcher; "
                    "build the index with --shards 1 when the workers fill every core, or give "
                    "each worker more --search-threads", len(index.searchers),
                    index.search_threads)


def serve_parser() -> argparse.ArgumentParser:
    p = dataclass_parser("ctt-serve", "Online resolver over HTTP: POST /recommend, GET /health, "
                         "GET /version.", ServeConfig, ResolverFlags, (ModelSource, MLFLOW_FIELDS))
    add_exclusive_flags(p, (ModelSource, SOURCE_FIELDS), required=True)
    return p


def make_resolver(source: ModelSource, flags: ResolverFlags, head: str) -> Resolver:
    if source.bundle is not None:
        return flags.resolver(source.bundle, head)
    return Resolver.from_mlflow(run_id=source.mlflow_run_id, model_name=source.mlflow_model,
                                version=source.mlflow_version, index_dir=flags.index,
                                feature_repo_dir=flags.feature_repo,
                                tracking_uri=source.tracking_uri,
                                skew_policy=flags.skew_policy, head=head)


def serve_main(argv: Optional[List[str]] = None) -> int:
    """Load everything first (fail fast on a mismatched index/bundle), then run uvicorn."""
    parser = serve_parser()
    args = parser.parse_args(argv)
    try:
        cfg = from_args(ServeConfig, args)
    except ValueError as err:
        parser.error(str(err))
    source, flags = from_args(ModelSource, args), from_args(ResolverFlags, args)
    if cfg.workers > 1 and not (values_in_files() and multiprocess_dir()):
        parser.error(f"--workers {cfg.workers} needs {MULTIPROC_ENV} set to an existing folder in "
                     f"the server's environment (each worker writes its metrics there)")
    logging.basicConfig(level=cfg.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch
    import uvicorn

    from serving.app import create_app

    torch.set_num_threads(cfg.torch_threads)
    try:
        if multiprocess_dir() is not None:
            removed = prepare_multiprocess_dir(Path(multiprocess_dir()))
            LOG.info("metrics folder %s: %d files of an earlier run removed", multiprocess_dir(),
                     removed)
        resolver = make_resolver(source, flags, cfg.head)
        resolver.index.use_threads(cfg.threads_per_search())
        warn_serial_shards(resolver.index)
        metrics = ServingMetrics()
        request_log = (RequestLog(cfg.request_log, cfg.request_log_sample_rate)
                       if cfg.request_log is not None else None)
    except startup_errors(with_mlflow=source.bundle is None) as exc:
        return report_startup_error(parser.prog, exc)
    LOG.info("resolver ready: %s", json.dumps(resolver.version()))
    app = create_app(resolver, max_body_bytes=cfg.max_body_bytes, metrics=metrics,
                     request_log=request_log)
    if cfg.workers == 1:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, workers=1)
    else:
        run_workers(app, resolver, cfg)
    return 0


def run_workers(app: object, resolver: Resolver, cfg: ServeConfig) -> None:
    """gunicorn master + `cfg.workers` uvicorn workers forked from this process.

    The app (bundle, numpy head, ScaNN index) is built once here and inherited by every worker
    through fork: the read-only arrays stay shared copy-on-write pages instead of one copy per
    worker. Each worker then opens its own online-store connection (`Resolver.after_fork`), and
    a worker that exits has its live metrics files marked dead.
    """
    from gunicorn.app.base import BaseApplication

    settings = {
        "bind": f"{cfg.host}:{cfg.port}",
        "workers": cfg.workers,
        "worker_class": "uvicorn_worker.UvicornWorker",
        "preload_app": True,
        "keepalive": 5,  # uvicorn's own default keep-alive (s)
        "loglevel": cfg.log_level,
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


# Command-line entry point: the process ends with the exit code main chose (ctt_contracts.process).
serve_cli = entry_point(serve_main)
build_index_cli = entry_point(build_index_main)


if __name__ == "__main__":
    serve_cli()
