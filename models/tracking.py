"""MLflow tracking: where runs go and what a training / evaluation run records.

Tracking URI, in order: an explicit ``tracking_uri`` (``--tracking-uri`` / the config: what the
user typed for this run wins, as with every other flag), the ``MLFLOW_TRACKING_URI`` environment
variable (a shared server or database), else ``sqlite:///<out_dir>/mlflow.db``
(MLflow 3 keeps the plain ``mlruns`` file store in maintenance mode and refuses it by default,
so the local default is the embedded SQLite backend). With the local default the artifacts go
beside the SQLite file (``<db folder>/mlartifacts``) instead of MLflow's cwd-relative ``./mlruns``.

A run killed before it could close (SIGKILL, OOM killer, a lost node) stays RUNNING in MLflow for
ever. So every training run is tagged with the process that runs it (``ctt.pid``, its start
time, the machine's kernel boot + PID namespace, and the resolved ``ctt.out_dir``), and the next
start in the same ``out_dir`` marks each RUNNING run of that folder whose process provably no
longer exists on this machine as KILLED (tag ``ctt.ended_by``). A run being resumed from its
checkpoint is continued instead (its process tags are updated). Runs of other machines are left
alone: their liveness cannot be checked from here.

A training run records: hyper-parameters (Lightning's MLFlowLogger), per-epoch metrics, the
Delta versions of its inputs (params ``input_version.<table>``), the test metrics of the trained
model, and the exported serving bundle as the artifact folder ``bundle`` (optionally also
registered as a model version). An evaluation run records the comparison table (markdown +
JSON + Recall@K plot) as artifacts and every cell as a metric ``<variant>.<metric>``.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from mlflow import MlflowClient
from pytorch_lightning.loggers import MLFlowLogger

from ctt_contracts.flags import flag_field, tracking_uri_field
from models.export import BUNDLE_ARTIFACT_PATH
from models.metrics import metric_key

ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
DEFAULT_EXPERIMENT = "contextual_two_tower"


@dataclass(frozen=True)
class TrackingConfig:
    """Where a run is recorded: the MLflow flags ctt-train and ctt-evaluate share (each names
    its own ``--out-dir`` and ``--run-name``)."""

    experiment_name: str = flag_field("MLflow experiment of the run", DEFAULT_EXPERIMENT)
    tracking_uri: Optional[str] = tracking_uri_field(
        f"default ${ENV_TRACKING_URI}, else SQLite (mlflow.db) in --out-dir")


# Tags naming the process of a training run (see the module docstring).
TAG_OUT_DIR = "ctt.out_dir"
TAG_HOST = "ctt.host"
TAG_NODE = "ctt.node"
TAG_PID = "ctt.pid"
TAG_PID_START = "ctt.pid_start"
TAG_ENDED_BY = "ctt.ended_by"
STATUS_RUNNING, STATUS_KILLED = "RUNNING", "KILLED"


def resolve_tracking_uri(out_dir: Optional[Path | str], tracking_uri: Optional[str] = None) -> str:
    """Explicit URI > environment variable > ``sqlite:///<out_dir>/mlflow.db``."""
    if tracking_uri:
        return tracking_uri
    env = os.environ.get(ENV_TRACKING_URI)
    if env:
        return env
    if out_dir is None:
        raise ValueError(f"no tracking URI: set {ENV_TRACKING_URI}, pass tracking_uri or an out_dir")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{out / 'mlflow.db'}"


def _local_artifact_location(uri: str) -> Optional[str]:
    """Artifacts of a local SQLite store go beside its database file (``<db folder>/mlartifacts``)
    rather than MLflow's default ``./mlruns`` relative to whatever the working directory is;
    servers and other stores keep their own artifact setting."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()


# ------------------------------------------------------------------ which process runs a run
def process_start(pid: int) -> Optional[int]:
    """Start time of a process in clock ticks since boot (Linux /proc); None if it does not exist
    or there is no /proc. With the pid it names one process even across pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])  # field 22, after the ")" of comm


def node_id() -> Optional[str]:
    """Kernel boot + PID namespace: processes with the same node id see the same pids."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def process_tags(out_dir: Path | str) -> Dict[str, str]:
    """The tags that let a later start tell whether this run's process still exists."""
    pid = os.getpid()
    return {TAG_OUT_DIR: str(Path(out_dir).resolve()), TAG_HOST: socket.gethostname(),
            TAG_NODE: node_id() or "", TAG_PID: str(pid), TAG_PID_START: str(process_start(pid) or "")}


def process_is_gone(tags: Mapping[str, str]) -> bool:
    """True only when the tagged process provably no longer runs (same node, pid gone or reused)."""
    here = node_id()
    if not here or tags.get(TAG_NODE) != here or not tags.get(TAG_PID, "").isdigit():
        return False
    start = process_start(int(tags[TAG_PID]))
    return start is None or (tags.get(TAG_PID_START, "") not in ("", str(start)))


def mark_dead_runs(client: MlflowClient, experiment_name: str, out_dir: Path | str,
                   keep: Optional[str] = None) -> List[str]:
    """Set KILLED on every RUNNING run of ``out_dir`` whose process is gone (except ``keep``, a
    run being resumed). Returns their ids."""
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        return []
    folder = str(Path(out_dir).resolve())
    marked = []
    for run in client.search_runs([exp.experiment_id],
                                  filter_string=f"attributes.status = '{STATUS_RUNNING}'"):
        tags = run.data.tags
        if run.info.run_id == keep or tags.get(TAG_OUT_DIR) != folder or not process_is_gone(tags):
            continue
        client.set_tag(run.info.run_id, TAG_ENDED_BY,
                       f"process {tags[TAG_PID]} on {tags.get(TAG_HOST)} ended without closing the "
                       f"run (killed); marked {STATUS_KILLED} by the next start in {folder}")
        client.set_terminated(run.info.run_id, status=STATUS_KILLED)
        marked.append(run.info.run_id)
    return marked


def make_logger(out_dir: Path | str, run_name: Optional[str] = None,
                experiment_name: str = DEFAULT_EXPERIMENT,
                tracking_uri: Optional[str] = None, run_id: Optional[str] = None) -> MLFlowLogger:
    """Lightning's MLFlowLogger on the resolved tracking URI (per-epoch metrics + hparams);
    ``run_id`` continues an existing run (a resumed training) instead of starting one.

    On global rank 0 (the process that logs) it first closes the runs of ``out_dir`` whose
    process died (``mark_dead_runs``) and tags the run with this process (``process_tags``)."""
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    uri = resolve_tracking_uri(out_dir, tracking_uri)
    tags = process_tags(out_dir)
    if getattr(rank_zero_only, "rank", 0) == 0:
        client = MlflowClient(uri)
        for dead in mark_dead_runs(client, experiment_name, out_dir, keep=run_id):
            print(f"MLflow run {dead} of {out_dir}: its process is gone (killed); marked "
                  f"{STATUS_KILLED}", flush=True)
        if run_id is not None:  # a resumed run: this process runs it now
            for key, value in tags.items():
                client.set_tag(run_id, key, value)
    return MLFlowLogger(experiment_name=experiment_name, run_name=run_name, tracking_uri=uri,
                        artifact_location=_local_artifact_location(uri), log_model=False,
                        run_id=run_id, tags=tags if run_id is None else None)


def start_run(out_dir: Path | str, run_name: str, experiment_name: str = DEFAULT_EXPERIMENT,
              tracking_uri: Optional[str] = None) -> tuple[MlflowClient, str]:
    """A new run outside Lightning (evaluation): (client, run_id)."""
    uri = resolve_tracking_uri(out_dir, tracking_uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment_name)
    exp_id = (exp.experiment_id if exp is not None else
              client.create_experiment(experiment_name, _local_artifact_location(uri)))
    run = client.create_run(exp_id, run_name=run_name)
    return client, run.info.run_id


def log_input_versions(client: MlflowClient, run_id: str, versions: Mapping[str, int]) -> None:
    """Delta versions of the tables a run read, as params ``input_version.<table>``."""
    for table, version in sorted(versions.items()):
        client.log_param(run_id, f"input_version.{table}", int(version))


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float],
                prefix: str = "") -> None:
    for name, value in metrics.items():
        client.log_metric(run_id, metric_key(prefix + name), float(value))


def log_bundle(client: MlflowClient, run_id: str, bundle_dir: Path | str,
               register_as: Optional[str] = None) -> Optional[str]:
    """Upload the bundle as the run's ``bundle`` artifact folder; optionally register it as a new
    version of the registered model ``register_as``. Returns the registered version or None."""
    client.log_artifacts(run_id, str(bundle_dir), BUNDLE_ARTIFACT_PATH)
    client.set_tag(run_id, "bundle_path", str(Path(bundle_dir).resolve()))
    if not register_as:
        return None
    if not client.search_registered_models(filter_string=f"name='{register_as}'"):
        client.create_registered_model(register_as)
    source = f"{client.get_run(run_id).info.artifact_uri}/{BUNDLE_ARTIFACT_PATH}"
    return str(client.create_model_version(register_as, source=source, run_id=run_id).version)


def log_report(client: MlflowClient, run_id: str, files: Sequence[Path | str],
               table: Mapping[str, Dict[str, float]]) -> None:
    """Evaluation report files as artifacts ``report/...`` and each cell as metric ``row.metric``.

    Files, not the folder: the default MLflow store may live in the same folder."""
    for file in files:
        client.log_artifact(run_id, str(file), "report")
    for variant, metrics in table.items():
        log_metrics(client, run_id, metrics, prefix=f"{variant}.")
