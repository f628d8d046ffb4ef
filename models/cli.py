"""Console entry points ``ctt-train`` and ``ctt-evaluate`` (also behind jobs/train.py, jobs/evaluate.py).

Configuration is LightningCLI/jsonargparse only (one way): YAML files under configs/ plus
``--key value`` overrides, e.g.::

    ctt-train --config configs/contextual.yaml --data.lake_root lake --out-dir runs/contextual
    ctt-train --config configs/contextual.yaml --config configs/sequence_only.yaml --data.lake_root lake --out-dir runs/sequence_only
    ctt-evaluate --lake lake --contextual-bundle runs/contextual/bundle \\
        --sequence-only-bundle runs/sequence_only/bundle --out-dir runs/report

Training = seed_everything, fit with ModelCheckpoint + EarlyStopping on ``val/recall_at_100``,
reload the best checkpoint, export the serving bundle to ``<out_dir>/bundle``, evaluate it on
the test split, and record everything in MLflow (see models/tracking.py). The data module's
``max_len``/``max_ctx``/``max_item_categories``/``country_buckets`` are linked to the model
config so the tensors always fit the network.

Resume: rerunning the same command with the same ``--out-dir`` after a crash or a kill resumes
from the newest ``<out_dir>/<experiment_id>/<run_id>/checkpoints/last.ckpt`` of a run that did
not finish (``train_summary.json`` names the last finished one), or from ``--ckpt-path``.
The MLflow run of that checkpoint is CONTINUED (tagged ``resumed_from_checkpoint`` and
``resume_count``) rather than a new one started: one trained model = one run whose metric
history has every epoch once, checkpoints stay in the run's folder, and the bundle is logged
where the curves are. A checkpoint from elsewhere (its run unknown to the tracking store)
starts a new run with the same tags. Lightning restores loops, optimizer, scheduler and
callbacks; ``RngStateCallback`` adds every rank's torch / numpy / python RNG states, so a
resumed run draws the same dropout masks and uniform negatives as an uninterrupted one (the
training order is a pure function of seed and epoch, see models/data.py).

DDP (``--trainer.strategy ddp --trainer.devices 2 --trainer.accelerator cpu``): every rank
runs this entry point; only global rank 0 exports, evaluates and logs to MLflow, the others
return ``None`` after ``fit``. ``data.batch_size`` is per process.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from jsonargparse import ArgumentParser, ActionConfigFile
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pytorch_lightning import Callback
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import MLFlowLogger

from ctt_contracts.flags import (CONFIG_HELP, add_dataclass_flags, bundle_field, current_flags,
                                 feature_repo_field, flag_field, from_args, index_field,
                                 lake_field, underscore_aliases)
from models import evaluate as ev
from models import report as rp
from models import tracking
from models.tracking import TrackingConfig
from models.data import ContextualSequenceDataModule
from models.export import export_bundle, load_bundle
from models.system import ContextualRetrievalSystem
import ctt_contracts as C
from ctt_contracts.process import entry_point

log = logging.getLogger(__name__)

LINKED_DATA_FIELDS = ("max_len", "max_ctx", "max_item_categories", "country_buckets")
BUNDLE_DIR = "bundle"
SUMMARY_FILE = "train_summary.json"
LAST_CHECKPOINT = f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
TAG_RESUMED_FROM = "resumed_from_checkpoint"
TAG_RESUME_COUNT = "resume_count"


# ---------------------------------------------------------------------------------- RNG states
def capture_rng_state() -> Dict[str, Any]:
    """This process's torch (CPU + CUDA), numpy and python RNG states as tensors and plain
    Python values, so the checkpoint still loads with ``torch.load(weights_only=True)``."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": random.getstate()}


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class RngStateCallback(Callback):
    """Every rank's RNG states in each checkpoint; restored when a run resumes from one.

    Why: Lightning restores loops, optimizer, scheduler and callbacks but not the global RNGs,
    which drive dropout, the history/context drops and the uniform negatives. The states are
    captured when the checkpoint is written (end of an epoch's validation; nothing draws random
    numbers between there and the next epoch's first batch) and put back at the start of the
    first epoch after the restore, the matching point, so nothing in between (model building,
    restore itself) shifts the streams. Under DDP all ranks write their states (one all-gather
    per checkpoint, every rank takes part in saving) and rank r gets state r back.
    """

    def __init__(self) -> None:
        self._pending: Optional[List[Dict[str, Any]]] = None

    def state_dict(self) -> Dict[str, Any]:
        state = capture_rng_state()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            per_rank: List[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(per_rank, state)
            return {"per_rank": per_rank}
        return {"per_rank": [state]}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._pending = state_dict["per_rank"]

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self._pending is None:
            return
        states, self._pending = self._pending, None
        rank, world = trainer.global_rank, trainer.world_size
        if len(states) != world:
            log.warning("checkpoint holds RNG states of %d processes but this run has %d: resuming "
                        "without exact reproducibility", len(states), world)
        restore_rng_state(states[rank % len(states)])
        if rank == 0:
            log.info("restored the RNG states of %d process(es) from the checkpoint", len(states))


# ---------------------------------------------------------------------------------- resume
def completed_run_id(out_dir: Path) -> Optional[str]:
    """MLflow run id of the last run that finished in ``out_dir`` (its summary is written last)."""
    summary = out_dir / SUMMARY_FILE
    if not summary.is_file():
        return None
    return json.loads(summary.read_text()).get("mlflow_run_id")


def checkpoint_run_id(ckpt: Path) -> Optional[str]:
    """The MLflow run id in Lightning's checkpoint layout ``<experiment_id>/<run_id>/checkpoints/``."""
    return ckpt.parent.parent.name if ckpt.parent.name == "checkpoints" else None


def find_resume_checkpoint(out_dir: Path) -> Optional[Path]:
    """The newest ``last.ckpt`` under ``out_dir`` unless its run finished; None = start afresh."""
    candidates = sorted(out_dir.glob(f"*/*/checkpoints/{LAST_CHECKPOINT}"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        return None
    newest = candidates[-1]
    if checkpoint_run_id(newest) == completed_run_id(out_dir):
        log.info("%s belongs to the finished run %s: starting a new run", newest, checkpoint_run_id(newest))
        return None
    return newest


def existing_run(tracking_uri: str, run_id: Optional[str]) -> Optional[str]:
    """``run_id`` if the tracking store has that run, else None (a checkpoint from elsewhere)."""
    if run_id is None:
        return None
    try:
        MlflowClient(tracking_uri).get_run(run_id)
    except MlflowException:
        return None
    return run_id


class SaveConfigToRun(SaveConfigCallback):
    """The resolved config as ``<out_dir>/config.yaml`` and as the MLflow run's artifact
    (the MLflow logger has no local log_dir for the default save-to-log_dir behaviour)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "save_to_log_dir": False, "overwrite": True})

    def save_config(self, trainer, pl_module, stage: str) -> None:
        path = Path(trainer.default_root_dir) / self.config_filename
        path.parent.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, str(path), skip_none=False, overwrite=True, multifile=False)
        logger = trainer.logger
        if isinstance(logger, MLFlowLogger):
            logger.experiment.log_artifact(logger.run_id, str(path))


@dataclass(frozen=True)
class TrainRunConfig:
    """ctt-train's own top-level flags: the run's folder, name, registration and resume (the
    MLflow experiment and URI: ``TrackingConfig``; model, data and trainer: LightningCLI's
    nested keys). Built from the parsed config by ``TrainCLI.run_config``."""

    out_dir: str = flag_field("checkpoints, bundle, summary and (default) the MLflow store",
                              "runs/contextual")
    run_name: Optional[str] = flag_field(
        "MLflow run name and model_version prefix (default: UTC timestamp)", None)
    register_model: Optional[str] = flag_field(
        "also register the bundle as a version of this MLflow model", None)
    ckpt_path: Optional[str] = flag_field(
        "resume from this Lightning checkpoint (default: the newest unfinished run's "
        f"{LAST_CHECKPOINT} under out_dir, see --auto-resume)", None)
    auto_resume: bool = flag_field(
        f"resume from <out_dir>/<experiment>/<run>/checkpoints/{LAST_CHECKPOINT} of an unfinished "
        "run if there is one", True)


# The spellings of the previous release (underscores; ``--lake_root`` for the lake): accepted for
# one more release, rewritten to the current flag with a warning, and left out of ``--help``.
# Nested config keys (``--data.lake_root``, ``--trainer.max_epochs``) follow the dataclass and
# class field names and are not renamed; the config files' top-level keys (``out_dir:``) are
# the flags' destinations and are unchanged.
DEPRECATED_TRAIN_FLAGS: Dict[str, str] = underscore_aliases(TrainRunConfig, TrackingConfig)


class TrainCLI(LightningCLI):
    """LightningCLI with the run's output folder, MLflow and resume settings as top-level options."""

    resume_from: Optional[Path] = None  # the checkpoint fit resumes from, set with the trainer

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        add_dataclass_flags(parser, TrainRunConfig, typed=True, only=("out_dir", "run_name"))
        add_dataclass_flags(parser, TrackingConfig, typed=True)
        add_dataclass_flags(parser, TrainRunConfig, typed=True, skip=("out_dir", "run_name"))
        for name in LINKED_DATA_FIELDS:
            parser.link_arguments(f"model.model_config.{name}", f"data.{name}")

    def run_config(self) -> Tuple[TrainRunConfig, TrackingConfig]:
        """The top-level flags of the parsed config, as their dataclasses."""
        return from_args(TrainRunConfig, self.config), from_args(TrackingConfig, self.config)

    def instantiate_trainer(self, **kwargs: Any):
        run, where = self.run_config()
        out_dir = Path(run.out_dir)
        self.resume_from = resume_checkpoint(out_dir, run.ckpt_path, run.auto_resume)
        uri = tracking.resolve_tracking_uri(out_dir, where.tracking_uri)
        run_id = existing_run(uri, checkpoint_run_id(self.resume_from)) if self.resume_from else None
        kwargs.setdefault("logger", tracking.make_logger(run.out_dir, run.run_name,
                                                         where.experiment_name, where.tracking_uri,
                                                         run_id=run_id))
        kwargs.setdefault("default_root_dir", run.out_dir)
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(RngStateCallback())
        return trainer


def resume_checkpoint(out_dir: Path, ckpt_path: Optional[str], auto_resume: bool) -> Optional[Path]:
    """The checkpoint to resume from: ``--ckpt-path`` (must exist), else the automatic pick."""
    if ckpt_path:
        path = Path(ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"--ckpt-path {ckpt_path}: no such checkpoint file")
        return path
    return find_resume_checkpoint(out_dir) if auto_resume else None


def record_resume(logger: MLFlowLogger, ckpt: Path) -> None:
    """Tag the (continued or new) MLflow run with the checkpoint it resumed from."""
    client, run_id = logger.experiment, logger.run_id
    tags = client.get_run(run_id).data.tags
    client.set_tag(run_id, TAG_RESUMED_FROM, str(ckpt.resolve()))
    client.set_tag(run_id, TAG_RESUME_COUNT, str(int(tags.get(TAG_RESUME_COUNT, "0")) + 1))


def _best_checkpoint(trainer) -> Optional[str]:
    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.best_model_path:
            return cb.best_model_path
    return None


def finish_training(system: ContextualRetrievalSystem, dm: ContextualSequenceDataModule, trainer,
                    out_dir: Path, run_name: Optional[str], register_model: Optional[str],
                    tracking_uri: str) -> Dict[str, Any]:
    """Best weights -> bundle -> test evaluation -> MLflow. Returns the run summary. Refused
    when the fit ran no optimizer step: its bundle would be the random initial weights."""
    if trainer.global_step == 0:
        raise RuntimeError("training ran no optimizer step (no training batch within the limits "
                           "given, e.g. trainer.max_epochs / max_steps / max_time / "
                           "limit_train_batches): nothing to export")
    best = _best_checkpoint(trainer)
    if best:
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        system.load_state_dict(state)
    model = system.model.cpu().eval()
    logger = trainer.logger
    run_id = logger.run_id
    bundle_dir = export_bundle(model, model.config, dm.items_frame, out_dir / BUNDLE_DIR,
                               run_name or None,
                               extra_manifest={"input_versions": dm.input_versions, "mlflow_run_id": run_id,
                                               "best_checkpoint": best,
                                               "id_gate_k": system.hparams.id_gate_k},
                               id_gate=None if system.id_gate is None else system.id_gate.numpy(),
                               context_top_k=dm.context_top_k)
    bundle = load_bundle(bundle_dir)
    data = ev.EvalExamples.from_datamodule(dm, C.SPLIT_TEST)
    result = ev.evaluate_bundles(bundle, None, data)
    client = logger.experiment
    tracking.log_input_versions(client, run_id, dm.input_versions)
    tracking.log_metrics(client, run_id, {f"test.{k}": v for k, v in _flat(result.as_table()).items()})
    client.log_param(run_id, C.MODEL_VERSION, bundle.model_version)
    registered = tracking.log_bundle(client, run_id, bundle_dir, register_model)
    summary = {"model_version": bundle.model_version, "bundle": str(bundle_dir.resolve()),
               "mlflow_run_id": run_id, "tracking_uri": tracking_uri,
               "registered_version": registered, "best_checkpoint": best,
               "input_versions": dm.input_versions, "test": result.as_table()}
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True))
    return summary


def _flat(table: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    return {f"{row}.{name}": v for row, metrics in table.items() for name, v in metrics.items()}


def train_main(argv: Optional[List[str]] = None) -> Optional[Dict[str, Any]]:
    """``ctt-train``: fit (resuming if possible) + export + evaluate + track; prints and returns
    the summary (None on DDP ranks other than 0)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = current_flags(argv, DEPRECATED_TRAIN_FLAGS, "ctt-train")
    cli = TrainCLI(ContextualRetrievalSystem, ContextualSequenceDataModule, args=argv, run=False,
                   save_config_callback=SaveConfigToRun)
    run, where = cli.run_config()
    out_dir = Path(run.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer, ckpt = cli.trainer, cli.resume_from
    if ckpt is not None and trainer.is_global_zero:
        if isinstance(trainer.logger, MLFlowLogger):
            record_resume(trainer.logger, ckpt)
        log.warning("RESUMING from checkpoint %s (MLflow run %s)", ckpt, trainer.logger.run_id)
    trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(ckpt) if ckpt else None,
                weights_only=True)
    if dist.is_available() and dist.is_initialized():
        # DDP: the ranks part here; rank 0 exports and evaluates alone, so no collective (e.g. a
        # torchmetrics sync in the evaluation) may wait for ranks that have exited.
        dist.destroy_process_group()
    if not trainer.is_global_zero:  # one bundle, one evaluation, one set of MLflow records
        return None
    summary = finish_training(cli.model, cli.datamodule, cli.trainer, out_dir, run.run_name,
                              run.register_model,
                              tracking.resolve_tracking_uri(out_dir, where.tracking_uri))
    print(json.dumps({k: summary[k] for k in ("model_version", "bundle", "mlflow_run_id")}, indent=2))
    return summary


@dataclass(frozen=True)
class EvaluateConfig:
    """What ctt-evaluate compares, on which split, where the report goes, and the serving
    latency it measures with ``--index`` and ``--feature-repo`` (the MLflow experiment and URI:
    ``TrackingConfig``)."""

    lake: str = lake_field()
    contextual_bundle: str = bundle_field(note="the contextual model's")
    sequence_only_bundle: Optional[str] = bundle_field(
        None, note="the sequence-only model's, compared when given")
    out_dir: str = flag_field("report folder (evaluation.md, plots, evaluation.json)", "runs/report")
    split: str = flag_field("split of the sequences table evaluated", C.SPLIT_TEST)
    exclude_history: bool = flag_field(
        "drop the user's own history items from the ranking (MovieLens protocol)", False)
    run_name: str = flag_field("MLflow run name", "evaluation")
    index: Optional[str] = index_field(
        "the contextual bundle's; with --feature-repo, time real resolver requests for the "
        "report's latency section")
    feature_repo: Optional[str] = feature_repo_field(
        None, note="with materialized features (CTT_LAKE / CTT_FEAST_DATA exported for "
        "feature_repo/)")
    latency_requests: int = flag_field("timed requests per kind (no context / subject item)",
                                       rp.DEFAULT_LATENCY_REQUESTS)
    latency_warmup: int = flag_field("untimed requests first", rp.DEFAULT_LATENCY_WARMUP)
    latency_k: int = flag_field("k of the timed requests", rp.DEFAULT_LATENCY_K)
    latency_torch_threads: int = flag_field(
        "torch intra-op threads while timing; 1 = ctt-serve's default (--torch-threads), the "
        "fastest for one-row heads", 1)

    def __post_init__(self) -> None:
        if (self.index is None) != (self.feature_repo is None):
            raise ValueError("give both --index and --feature-repo to measure serving latency, "
                             "or neither")


DEPRECATED_EVALUATE_FLAGS: Dict[str, str] = {
    "--lake_root": "--lake", **underscore_aliases(EvaluateConfig, TrackingConfig)}


def evaluate_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="ctt-evaluate", description="Compare the contextual model, the "
                            "sequence-only model and the baselines (popularity, top category "
                            "popularity, co-occurrence, category popularity) on the same examples, "
                            "with bootstrap intervals on the quality checks.")
    parser.add_argument("--config", action=ActionConfigFile, help=CONFIG_HELP)
    add_dataclass_flags(parser, EvaluateConfig, typed=True)
    add_dataclass_flags(parser, TrackingConfig, typed=True)
    return parser


def evaluate_main(argv: Optional[List[str]] = None,
                  measure_latency: Optional[Callable[[EvaluateConfig], rp.LatencyReport]] = None
                  ) -> ev.EvaluationResult:
    """The evaluation table from saved bundles -> report folder + MLflow run.

    ``measure_latency(cfg)`` times the serving path for the report's latency section when
    ``--index`` / ``--feature-repo`` are given; it lives with serving (serving/latency.py, whose
    ``evaluate_main`` is ``ctt-evaluate``), since models/ knows nothing of serving.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = evaluate_parser().parse_args(current_flags(argv, DEPRECATED_EVALUATE_FLAGS,
                                                      "ctt-evaluate"))
    try:
        cfg = from_args(EvaluateConfig, args)
    except ValueError as err:
        raise SystemExit(f"ctt-evaluate: {err}")
    where = from_args(TrackingConfig, args)
    if cfg.index is not None and measure_latency is None:
        raise SystemExit("measuring serving latency needs the serving harness: run ctt-evaluate "
                         "or jobs/evaluate.py (serving/latency.py)")
    contextual = load_bundle(cfg.contextual_bundle)
    sequence_only = load_bundle(cfg.sequence_only_bundle) if cfg.sequence_only_bundle else None
    result = ev.evaluate_from_lake(contextual, sequence_only, cfg.lake, cfg.split,
                                   cfg.exclude_history)
    latency = None
    if cfg.index is not None:
        latency = measure_latency(cfg)
    report_files = rp.write_report(result, cfg.out_dir, latency)
    client, run_id = tracking.start_run(cfg.out_dir, cfg.run_name, where.experiment_name,
                                        where.tracking_uri)
    tracking.log_input_versions(client, run_id, result.input_versions)
    for name, version in result.model_versions.items():
        client.log_param(run_id, f"{C.MODEL_VERSION}.{name}", version)
    client.set_tag(run_id, "latency_measured", str(latency is not None).lower())
    table = {**result.as_table(), **result.checks_table()}
    if latency is not None:
        client.log_param(run_id, "latency.index_backend", latency.index_backend)
        client.log_param(run_id, "latency.k", latency.k)
        table.update(rp.latency_table(latency))
    tracking.log_report(client, run_id, report_files, table)
    client.set_terminated(run_id)
    print(rp.format_markdown(result, latency))
    return result


# Command-line entry point: the process ends with the exit code main chose (ctt_contracts.process).
train_cli = entry_point(train_main)
