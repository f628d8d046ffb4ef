"""MLflow tracking: where runs go and what a training / evaluation run records.

Tracking URI, in order: an explicit ``tracking_uri`` (``--tracking_uri`` / the config: what the
user typed for this run wins, as with every other flag), the ``MLFLOW_TRACKING_URI`` environment
variable (a shared server or database), else ``sqlite:///<out_dir>/mlflow.db``
(MLflow 3 keeps the plain ``mlruns`` file store in maintenance mode and refuses it by default,
so the local default is the embedded SQLite backend). With the local default the artifacts go
beside the SQLite file (``<db folder>/mlartifacts``) instead of MLflow's cwd-relative ``./mlruns``.

A training run records: hyper-parameters (Lightning's MLFlowLogger), per-epoch metrics, the
Delta versions of its inputs (params ``input_version.<table>``), the test metrics of the trained
model, and the exported serving bundle as the artifact folder ``bundle`` (optionally also
registered as a model version). An evaluation run records the comparison table (markdown +
JSON + Recall@K plot) as artifacts and every cell as a metric ``<variant>.<metric>``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

from mlflow import MlflowClient
from pytorch_lightning.loggers import MLFlowLogger

from models.export import BUNDLE_ARTIFACT_PATH
from models.metrics import metric_key

ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
DEFAULT_EXPERIMENT = "contextual_two_tower"


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


def make_logger(out_dir: Path | str, run_name: Optional[str] = None,
                experiment_name: str = DEFAULT_EXPERIMENT,
                tracking_uri: Optional[str] = None, run_id: Optional[str] = None) -> MLFlowLogger:
    """Lightning's MLFlowLogger on the resolved tracking URI (per-epoch metrics + hparams);
    ``run_id`` continues an existing run (a resumed training) instead of starting one."""
    uri = resolve_tracking_uri(out_dir, tracking_uri)
    return MLFlowLogger(experiment_name=experiment_name, run_name=run_name, tracking_uri=uri,
                        artifact_location=_local_artifact_location(uri), log_model=False,
                        run_id=run_id)


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
