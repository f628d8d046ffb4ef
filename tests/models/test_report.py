"""The evaluation report end to end: comparison table, plots, measured serving latency, MLflow.

Built on a tiny demo output (tests/tiny_demo.py: real training, Feast SQLite store, ScaNN index)
so the latency comes from the real in-process resolver, exactly as `make demo` measures it.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow import MlflowClient
from tiny_demo import LATENCY_REQUESTS, demo_environment, environment, evaluate_argv

from models import evaluate as ev
from models import report as rp
from serving import latency as lat
from serving.latency import evaluate_main
from models.export import load_bundle

ALL_VARIANTS = (ev.CONTEXTUAL, ev.NO_CONTEXT, ev.SEQUENCE_ONLY, ev.POPULARITY,
                ev.TOP_CATEGORY_POPULARITY, ev.CATEGORY_POPULARITY)
VARIANTS = {ev.GROUP_ALL: ALL_VARIANTS, ev.GROUP_REAL: ALL_VARIANTS + (ev.COOCCURRENCE,)}
KINDS = (lat.REQ_NO_CONTEXT, lat.REQ_SUBJECT_ITEM)


@pytest.fixture
def demo(tiny_demo_run):
    """The session's tiny demo output (tests/conftest.py), evaluated with latency measured."""
    return tiny_demo_run


def _evaluation_run(tracking_uri: str, run_name: str):
    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = [r for r in client.search_runs(experiments) if r.info.run_name == run_name]
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def test_report_has_every_variant_plots_and_measured_latency(demo):
    files = {name: demo.report / name for name in (rp.REPORT_MD, rp.REPORT_JSON, rp.REPORT_PNG,
                                                     rp.REPORT_COVERAGE_PNG, rp.REPORT_LATENCY_PNG)}
    for path in files.values():
        assert path.stat().st_size > 0, path
    for png in (rp.REPORT_PNG, rp.REPORT_COVERAGE_PNG, rp.REPORT_LATENCY_PNG):
        assert files[png].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = files[rp.REPORT_MD].read_text()
    for group, variants in VARIANTS.items():
        for variant in variants:
            assert f"| {group} | {variant} |" in md
    for png in (rp.REPORT_PNG, rp.REPORT_COVERAGE_PNG, rp.REPORT_LATENCY_PNG):
        assert f"]({png})" in md  # self-contained: the plots are linked beside the Markdown
    assert "not measured" not in md

    saved = json.loads(files[rp.REPORT_JSON].read_text())
    assert {(r["group"], r["variant"]) for r in saved["rows"]} == {
        (g, v) for g, variants in VARIANTS.items() for v in variants}
    # every check of the design, each with its interval or "not enough data", printed as such
    assert set(saved["checks"]) == {spec.name for spec in ev.QUALITY_CHECKS}
    for name, c in saved["checks"].items():
        enough = c["n_examples"] >= ev.MIN_CHECK_EXAMPLES and c["denominator"] > 0
        assert c["status"] in ((ev.STATUS_PASSED, ev.STATUS_FAILED) if enough else (ev.STATUS_NOT_ENOUGH_DATA,))
        assert c["passed"] == (c["status"] == ev.STATUS_PASSED)
        if c["denominator"] > 0:
            assert c["ci_low"] <= c["ratio"] <= c["ci_high"], (name, c)
        assert rp.format_check(name, c) in md
    lat = saved["latency"]
    assert lat["model_version"] == load_bundle(demo.contextual_bundle).model_version
    assert lat["index_backend"] == "scann"
    assert lat["n_requests"] == {k: LATENCY_REQUESTS for k in KINDS}
    assert lat["cold_starts"] == {k: 0 for k in KINDS}  # every test user has a cached state
    assert lat["machine"]["torch_threads"] == 1  # timed as ctt-serve runs the head
    for kind in KINDS:
        stats = lat["stats"][kind]
        for stage in (*rp.LATENCY_STAGES, rp.CALLER_WALL):
            s = stats[stage]
            assert 0 < s["p50"] <= s["p99"] <= s["max"], (kind, stage, s)
        # the caller's own clock wraps the resolver's total: both came from the same calls
        assert stats[rp.CALLER_WALL]["p50"] >= stats["total"]["p50"]
        assert stats["total"]["p50"] >= stats["feast"]["p50"]
        totals = np.asarray(lat["totals_ms"][kind])
        assert len(totals) == LATENCY_REQUESTS and len(np.unique(totals)) > 1  # measured, not constant
        assert stats["total"]["p50"] == pytest.approx(float(np.percentile(totals, 50)))
        assert f"| {kind} | {LATENCY_REQUESTS} | 0 | total | {stats['total']['p50']:.3f} |" in md


def test_mlflow_run_has_the_report_and_latency_metrics(demo):
    client, run = _evaluation_run(demo.tracking_uri, "evaluation")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert artifacts == {f"report/{n}" for n in (rp.REPORT_MD, rp.REPORT_JSON, rp.REPORT_PNG,
                                                 rp.REPORT_COVERAGE_PNG, rp.REPORT_LATENCY_PNG)}
    saved = json.loads((demo.report / rp.REPORT_JSON).read_text())
    metrics = run.data.metrics
    for kind in KINDS:
        for stage in rp.LATENCY_STAGES:
            assert metrics[f"latency.{kind}.{stage}_p99_ms"] == pytest.approx(
                saved["latency"]["stats"][kind][stage]["p99"])
    real = next(r for r in saved["rows"] if r["group"] == ev.GROUP_REAL and r["variant"] == ev.CONTEXTUAL)
    assert metrics["real.contextual.recall_at_100"] == pytest.approx(real["recall@100"])
    assert run.data.tags["latency_measured"] == "true"
    assert run.data.params["latency.index_backend"] == "scann"


def test_without_serving_artifacts_the_report_says_latency_was_not_measured(demo, tmp_path):
    out = tmp_path / "report"
    stale = out / rp.REPORT_LATENCY_PNG
    out.mkdir()
    stale.write_bytes(b"from an earlier run")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the shared demo output stays untouched
    with environment(demo_environment(demo)):
        evaluate_main(evaluate_argv(demo, out, with_latency=False) + ["--tracking-uri", uri])
    md = (out / rp.REPORT_MD).read_text()
    assert "Latency was **not measured**" in md and "--index" in md and "ms |" not in md
    assert json.loads((out / rp.REPORT_JSON).read_text())["latency"] is None
    assert not stale.exists()  # no plot of another run beside a report that measured nothing
    client, run = _evaluation_run(uri, "evaluation")
    assert run.data.tags["latency_measured"] == "false"
    assert not any(k.startswith("latency.") for k in run.data.metrics)


def test_index_without_feature_repo_is_refused(demo, tmp_path):
    argv = evaluate_argv(demo, tmp_path / "r", with_latency=False) + ["--index", str(demo.index)]
    with pytest.raises(SystemExit, match="both --index and --feature-repo"):
        evaluate_main(argv)
    assert not (tmp_path / "r").exists()


def test_time_requests_keeps_each_answers_own_stage_timings(demo):
    """Sample by sample: the resolver's stages add up to at most its total, which the caller's
    clock wraps; subject-item requests are answered with the subject item's context."""
    from serving.resolver import Resolver

    with environment(demo_environment(demo)):
        resolver = Resolver.from_paths(demo.contextual_bundle, demo.index, demo.feature_repo)
    users = lat.split_users(str(demo.lake))
    requests = lat.latency_requests(users, resolver.bundle.item_ids, 6, seed=3)
    samples = lat.time_requests(resolver.recommend, requests, k=7, warmup=2)
    assert [s.kind for s in samples] == [r.kind for r in requests]
    for s in samples:
        parts = s.timings["feast"] + s.timings["head"] + s.timings["search"]
        assert 0 < parts <= s.timings["total"] + 1e-3 <= s.wall_ms + 2e-3
        assert s.n_items == 7 and not s.cold_start
    report = lat.summarize_latency(samples, k=7, warmup=2)
    assert report.n_requests == {lat.REQ_NO_CONTEXT: 6, lat.REQ_SUBJECT_ITEM: 6}


def test_latency_requests_interleave_kinds_and_cycle_users():
    reqs = lat.latency_requests([5, 3, 9], [100, 200], n_per_kind=4, seed=0)
    assert [r.kind for r in reqs] == [lat.REQ_NO_CONTEXT, lat.REQ_SUBJECT_ITEM] * 4
    users = [r.user_id for r in reqs[::2]]
    assert sorted(users[:3]) == [3, 5, 9] and users[3] == users[0]  # every user once before repeats
    assert all(r.subject_item_id in (100, 200) for r in reqs[1::2])
    assert all(a.user_id == b.user_id for a, b in zip(reqs[::2], reqs[1::2]))
    with pytest.raises(ValueError, match="need users"):
        lat.latency_requests([], [1], 3)
    with pytest.raises(ValueError, match="n_per_kind"):
        lat.latency_requests([1], [1], 0)


def test_summarize_refuses_answers_from_mixed_serving_setups():
    def sample(version: str) -> lat.LatencySample:
        return lat.LatencySample(lat.REQ_NO_CONTEXT, {s: 1.0 for s in rp.LATENCY_STAGES}, 1.5, False,
                                10, "scann", version)

    with pytest.raises(ValueError, match="model_versions"):
        lat.summarize_latency([sample("a"), sample("b")], k=10, warmup=0)
    with pytest.raises(ValueError, match="no latency samples"):
        lat.summarize_latency([], k=10, warmup=0)
