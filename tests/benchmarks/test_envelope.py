"""Every benchmark writes benchlib's one envelope: the same top-level keys in every results JSON
(the README renderer and the bars table read them all alike), the script's figures under
``result``, and percentiles spelt the same whether computed here or by wrk."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

import benchlib


def check_envelope(report):
    assert list(report) == list(benchlib.ENVELOPE_KEYS)
    assert report["benchmark"] == "test"
    assert len(report["load_avg_before"]) == 3 and len(report["load_avg_after"]) == 3
    assert report["cpu_probe_s_before"] == report["cpu_probe_s_after"] == 0.5
    assert report["cpu_steal_pct"] is None or 0 <= report["cpu_steal_pct"] <= 100
    assert all({"name", "value", "target", "met"} <= set(b) for b in report["bars"])
    json.dumps(report)  # what write_json writes


def test_envelope_records_the_readings_around_the_run(measurement):
    report = measurement.envelope({"cores": 2}, [benchlib.bar("x", 1.0, 2.0)], {"figure": 1})
    check_envelope(report)
    assert report["result"] == {"figure": 1} and report["machine"] == {"cores": 2}
    assert report["date"] == measurement.started.isoformat(timespec="seconds")


def test_run_and_report_writes_the_envelope_and_reads_the_machine_after_the_run(tmp_path, monkeypatch,
                                                                              capsys):
    monkeypatch.setattr(benchlib, "cpu_probe_s", lambda: 0.5)
    calls = []
    out = tmp_path / "r.json"
    report = benchlib.run_and_report(
        "test", lambda: calls.append("run") or {"seconds": 3.0},
        lambda: calls.append("machine") or {"cores": 2}, lambda r: print("table", r["seconds"]), out,
        bars=lambda r: [benchlib.bar("seconds", r["seconds"], 5.0, at_most=True)])
    assert calls == ["run", "machine"]
    assert json.loads(out.read_text()) == report
    check_envelope(report)
    assert report["bars"][0]["met"] is True and report["result"] == {"seconds": 3.0}
    assert "table 3.0" in capsys.readouterr().out


def test_percentiles_are_spelt_alike_everywhere():
    got = benchlib.percentiles([1.0, 2.0, 3.0, 4.0])
    assert [benchlib.percentile_key(p) for p in benchlib.PERCENTILES] == ["p50", "p90", "p99", "p999"]
    assert set(got) == {"p50", "p90", "p99", "p999", "mean", "n"}


def test_wrk_summary_keys_its_percentiles_as_benchlib_does(tmp_path):
    import load_test

    summary = {"duration_us": 2_000_000, "requests": 100, "bytes": 1,
               "errors": {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0},
               "latency_us": {"min": 500, "mean": 900.0, "stdev": 10.0, "max": 9000},
               "percentiles_us": [800, 1200, 2500, 4000], "statuses": {"200": 100}}
    got = load_test.parse_wrk(f"noise\nWRK_JSON_BEGIN\n{json.dumps(summary)}\nWRK_JSON_END\n")
    assert got["latency_ms"] == {"min": 0.5, "mean": 0.9, "stdev": 0.01, "max": 9.0,
                                 "p50": 0.8, "p90": 1.2, "p99": 2.5, "p999": 4.0}
    assert got["throughput_rps"] == 50.0
    script = load_test.wrk_script([{"user_id": 1}], tmp_path / "pool.lua").read_text()
    assert "ipairs({50, 90, 99, 99.9})" in script


def test_build_sequences_report(measurement):
    import build_sequences as bench

    row = {"events_requested": bench.BAR_EVENTS, "ratio_events_per_s_spark_over_pandas": 1.04,
           "ratio_peak_rss_spark_over_pandas": 0.9}
    report = bench.report(measurement, {"cores": 2}, {"repeats": 3}, [row])
    check_envelope(report)
    assert report["result"] == {"config": {"repeats": 3}, "by_size": [row]}
    assert [b["met"] for b in report["bars"]] == [True, True]


def test_calibration_report(measurement):
    import calibrate_synthetic as bench
    from pipelines.synthetic import SyntheticConfig

    keys = ("logged_alignment", "logged_subject_is_converted_item", "leaf_categories_in_log",
            "category_size_median", "category_size_p90", "one_conversion_user_share",
            "at_most_two_conversions_user_share", "views_per_conversion",
            "views_before_conversion_in_session", "unseen_test_conversions", "popularity_slope_views")
    real = {k: 1.0 for k in keys if not k.startswith("logged")}
    gen = {k: 1.0 for k in keys}
    interest = {"movielens_1m_genres": 0.3, "movielens_users": 10, "generated_long_history": 0.31,
                "generated_users": 20}
    report = bench.report(measurement, SyntheticConfig(), real, gen, interest)
    check_envelope(report)
    assert set(report["result"]) == {"config", "stats"}
    assert report["result"]["stats"][-1] == {"name": "interest_kappa", **interest}
    assert {b["name"]: b["met"] for b in report["bars"]}["interest_kappa"] is True


def test_training_report(measurement):
    import training as bench

    def runs(*rates):
        return [{"seconds": 1.0, "examples": int(r), "examples_per_s": r} for r in rates]

    report = bench.report(measurement, {"lightning": runs(90.0, 100.0, 80.0),
                                        "plain_torch": runs(110.0, 120.0, 100.0)}, {"steps": 60})
    check_envelope(report)
    r = report["result"]
    assert r["settings"] == {"steps": 60} and r["figures"]["lightning"]["median_examples_per_s"] == 90.0
    assert r["ratio_time_lightning_over_plain"] == pytest.approx(110.0 / 90.0) and r["passed"] is True
    assert report["bars"][0]["value"] == r["ratio_time_lightning_over_plain"]


def test_serving_and_load_test_reports_keep_their_flags_in_the_result(measurement, tmp_path):
    import load_test
    import serving_latency

    args = SimpleNamespace(items=20_000, out=tmp_path / "x.json", quick=True)
    serving = serving_latency.report(measurement, args, "untrained (seed 0)", [
        {"n_items": 20_000, "dim": 64, "head_only": {"numpy_ms": {"p50": 0.05}}}])
    check_envelope(serving)
    assert serving["result"]["args"] == {"items": 20_000, "out": str(tmp_path / "x.json"), "quick": True}
    assert serving["result"]["by_size"][0]["n_items"] == 20_000
    assert {b["name"]: b["met"] for b in serving["bars"]}["head_p50_ms_dim64"] is True
    phase = {"latency_ms": {"p99": 2.0}, "throughput_rps": 700.0, "error_count": 0, "statuses": {"200": 1}}
    result = {"setup": {"n_items": 20_000}, "phases": {"single_client": phase, "conn32": phase}}
    load = load_test.report(measurement, args, result)
    check_envelope(load)
    assert load["result"] == {**result, "args": serving["result"]["args"]}
    assert all(b["value"] is None for b in load["bars"])  # not at 1M items
