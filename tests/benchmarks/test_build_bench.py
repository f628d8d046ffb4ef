"""The sequence-build benchmark's summary of repeated runs and its bars."""
from __future__ import annotations

import build_sequences as bench


def run(seconds, rss, load=1.0, startup=None):
    out = {"seconds": seconds, "peak_rss_mb": rss, "mean_load_avg_1m": load}
    if startup is not None:
        out["startup_s"] = startup
    return out


def test_repeated_runs_give_the_median_time_and_the_highest_memory():
    runs = [run(50.0, 2000.0, 1.0, 9.0), run(70.0, 1800.0, 2.0, 12.0), run(55.0, 2100.0, 1.5, 10.0)]
    got = bench.summarise(runs)
    assert got["seconds"] == 55.0  # one slow run on a shared machine is not the figure
    assert got["peak_rss_mb"] == 2100.0  # memory: the worst run counts
    assert got["startup_s"] == 10.0
    assert got["mean_load_avg_1m"] == 1.5
    assert got["runs"] == runs


def test_a_side_without_jvm_start_has_no_startup_figure():
    assert "startup_s" not in bench.summarise([run(30.0, 2500.0)])


def test_a_run_without_load_samples_does_not_count_as_load_zero():
    assert bench.summarise([run(30.0, 2500.0, 2.0), run(31.0, 2500.0, None)])[
        "mean_load_avg_1m"] == 2.0
    assert bench.summarise([run(30.0, 2500.0, None)])["mean_load_avg_1m"] is None


def test_bars_read_the_10m_row_only():
    row = {"events_requested": bench.BAR_EVENTS, "ratio_events_per_s_spark_over_pandas": 1.04,
           "ratio_peak_rss_spark_over_pandas": 1.1}
    bars = {b["name"]: b for b in bench.bars([row])}
    assert bars["build_10m_spark_vs_pandas"]["met"] is True
    assert bars["build_10m_peak_rss_spark_vs_pandas"]["met"] is False  # at most 1.0
    small = dict(row, events_requested=1_000_000)
    assert all(b["value"] is None and b["met"] is None for b in bench.bars([small]))
