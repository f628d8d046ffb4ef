"""The refresh benchmark's bars and the quick-run guard every plain-script benchmark shares."""
from __future__ import annotations

import pytest

import benchlib
import refresh as bench


def result(sizes, pct_s=100.0, noop_big=12.0, same=(40.0, 50.0)):
    return {"sizes": list(sizes), "lake_ratio": sizes[-1] / sizes[0], "day_1pct_largest_s": pct_s,
            "noop_s": {str(sizes[0]): 5.0, str(sizes[-1]): noop_big},
            "same_increment_ratio_largest_over_smallest": round(same[1] / same[0], 3)}


def test_bars_at_scale_compare_with_the_issue_targets():
    bars = {b["name"]: b for b in bench.bars(result([100_000, 1_000_000]))}
    assert bars["refresh_1m_users_1pct_s"] == {"name": "refresh_1m_users_1pct_s", "value": 100.0,
                                               "target": 120.0, "met": True}
    assert bars["refresh_noop_s_1m"]["met"] is True
    assert bars["refresh_same_increment_10x_lake_ratio"]["value"] == 1.25
    assert bars["refresh_same_increment_10x_lake_ratio"]["met"] is False


def test_bars_of_a_smaller_run_are_not_measured():
    for sizes in ([2_000, 20_000], [1_000_000], [500_000, 1_000_000]):
        assert all(b["value"] is None and b["met"] is None
                   for b in bench.bars(result(sizes)))


def test_quick_run_never_writes_the_committed_results():
    args = bench.parse_args(["--quick"])
    assert args.users == [2_000, 20_000] and args.out == benchlib.quick_out(bench.RESULTS)
    assert bench.parse_args([]).out == bench.RESULTS
    with pytest.raises(SystemExit):
        bench.parse_args(["--quick", "--out", str(bench.RESULTS)])


def test_steal_is_the_share_of_cpu_ticks_between_two_readings():
    assert benchlib.steal_pct({"total": 1000, "steal": 100}, {"total": 3000, "steal": 600}) == 25.0
    assert benchlib.steal_pct({}, {"total": 1, "steal": 0}) is None
    assert benchlib.steal_pct({"total": 5, "steal": 0}, {"total": 5, "steal": 0}) is None
    now = benchlib.cpu_times()
    assert now["total"] > 0 and 0 <= now["steal"] <= now["total"]


def test_the_bars_take_the_median_of_the_repeated_days():
    assert bench.median([30.0, 13.0, 14.0]) == 14.0
    assert bench.median([10.0, 12.0]) == 11.0
