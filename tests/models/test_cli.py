"""End to end: LightningCLI fit on configs/test_tiny.yaml with real MLflow (SQLite) in tmp_path,
then the evaluation CLI on the saved bundles."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from models import evaluate as ev
from models import report as rp
from models.cli import SUMMARY_FILE, evaluate_main, train_main
from models.data import INPUT_TABLES
from models.export import load_bundle, load_bundle_from_mlflow
import ctt_contracts as C

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "test_tiny.yaml"


@pytest.fixture(scope="module")
def trained(tiny_lake, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        summary = train_main(["--config", str(CONFIG), "--data.lake_root", str(tiny_lake),
                              "--out-dir", str(out), "--run-name", "tiny",
                              "--register-model", "ctt_tiny"])
    return out, summary


def test_fit_exports_bundle_and_tracks_the_run(trained):
    out, summary = trained
    assert json.loads((out / SUMMARY_FILE).read_text())["model_version"] == summary["model_version"]
    bundle = load_bundle(summary["bundle"])
    assert bundle.model_version == summary["model_version"] and bundle.model_version.startswith("tiny-")
    assert bundle.manifest["input_versions"] == {t: 0 for t in INPUT_TABLES}
    assert bundle.manifest[C.CONTEXT_TOP_K] == bundle.context_top_k == C.DEFAULT_CONTEXT_TOP_K  # the lake's
    assert Path(summary["best_checkpoint"]).is_file()
    assert summary["tracking_uri"] == f"sqlite:///{out.resolve() / 'mlflow.db'}"

    client = MlflowClient(summary["tracking_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    params = run.data.params
    assert all(params[f"input_version.{t}"] == "0" for t in INPUT_TABLES)
    assert params[C.MODEL_VERSION] == bundle.model_version
    assert params["lr"] == "0.003"  # hyper-parameters via Lightning's MLFlowLogger
    history = client.get_metric_history(run.info.run_id, "val/recall_at_100")
    assert len(history) == 2  # one point per epoch (max_epochs: 2)
    assert "test.real.contextual.recall_at_100" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"bundle", "config.yaml"} <= artifacts
    assert {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "bundle")} >= {
        C.BUNDLE_WEIGHTS, C.BUNDLE_MANIFEST, C.BUNDLE_ITEM_EMBEDDINGS}

    by_run = load_bundle_from_mlflow(run_id=run.info.run_id, tracking_uri=summary["tracking_uri"])
    by_name = load_bundle_from_mlflow(model_name="ctt_tiny", tracking_uri=summary["tracking_uri"])
    assert by_run.model_version == by_name.model_version == bundle.model_version
    assert summary["registered_version"] == "1"


def test_evaluate_cli_writes_report_and_logs_it(trained, tiny_lake, tmp_path):
    out, summary = trained
    report = tmp_path / "report"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        result = evaluate_main(["--lake", str(tiny_lake), "--contextual-bundle", summary["bundle"],
                                "--sequence-only-bundle", summary["bundle"], "--out-dir", str(report)])
    for name in (rp.REPORT_MD, rp.REPORT_JSON, rp.REPORT_PNG):
        assert (report / name).stat().st_size > 0
    variants = {(r["group"], r["variant"]) for r in result.rows}
    assert (ev.GROUP_REAL, ev.CONTEXTUAL) in variants and (ev.GROUP_ALL, ev.CATEGORY_POPULARITY) in variants
    saved = json.loads((report / rp.REPORT_JSON).read_text())
    # all: 3 models + 3 baselines; real: the same + co-occurrence (it needs the subject item)
    assert len(saved["rows"]) == len(result.rows) == 6 + 7
    assert (ev.GROUP_REAL, ev.COOCCURRENCE) in variants and (ev.GROUP_ALL, ev.COOCCURRENCE) not in variants
    assert set(saved["checks"]) == {spec.name for spec in ev.QUALITY_CHECKS}
    client = MlflowClient(f"sqlite:///{report.resolve() / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("contextual_two_tower").experiment_id])
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    assert metrics["real.contextual.recall_at_100"] == pytest.approx(
        result.metric(ev.GROUP_REAL, ev.CONTEXTUAL, "recall@100"))
    check = result.checks["real_context_vs_best_baseline_recall"]
    assert metrics["check.real_context_vs_best_baseline_recall.passed"] == float(check["passed"])
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id, "report")} == {
        f"report/{n}" for n in (rp.REPORT_MD, rp.REPORT_JSON, rp.REPORT_PNG, rp.REPORT_COVERAGE_PNG)}


def test_explicit_tracking_uri_wins_over_the_environment(tmp_path, monkeypatch):
    """``--tracking-uri`` is what the user typed for this run; a shell-wide MLFLOW_TRACKING_URI
    must not silently redirect it (and is still used when no URI is given)."""
    from models.tracking import resolve_tracking_uri

    explicit, env = f"sqlite:///{tmp_path / 'explicit.db'}", f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
    assert resolve_tracking_uri(tmp_path, explicit) == explicit
    assert resolve_tracking_uri(tmp_path) == env
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def test_a_fit_without_a_step_exports_nothing(tiny_lake, tmp_path, monkeypatch):
    """No optimizer step (here: no training batch allowed) would export the random initial
    weights as a bundle; the trainer refuses instead."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(RuntimeError, match="no optimizer step"):
        train_main(["--config", str(CONFIG), "--data.lake_root", str(tiny_lake),
                    "--out-dir", str(tmp_path), "--run-name", "nostep",
                    "--trainer.limit_train_batches", "0"])
    assert not (tmp_path / "bundle").exists()
