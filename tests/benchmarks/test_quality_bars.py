"""The quality benchmark's bars: ratios pooled over data seeds, so a seed whose denominator is a
few hits cannot decide a bar."""
from __future__ import annotations

import pytest

import quality as bench

NO_CTX = "no_context_vs_sequence_only"


def world(alignment, seed, numerator, denominator, name=NO_CTX):
    check = {"numerator": numerator, "denominator": denominator,
             "ratio": None if not denominator else numerator / denominator, "ci_low": 0.5}
    return {"alignment": alignment, "seed": seed, "rows": [], "checks": {name: check}}


def test_a_seed_with_a_handful_of_hits_does_not_outweigh_the_others():
    # two seeds at ~0.73, one at 2 hits vs 1 (ratio 2.0): the mean of ratios would read 1.15
    worlds = [world(0.5, 0, 0.042, 0.058), world(0.5, 1, 0.0022, 0.0011), world(0.5, 2, 0.049, 0.068)]
    assert bench.pooled_ratio(worlds, NO_CTX) == pytest.approx((0.042 + 0.0022 + 0.049)
                                                               / (0.058 + 0.0011 + 0.068))
    bar = {b["name"]: b for b in bench.bars(worlds, None)}["no_ctx_vs_sequence_only"]
    assert bar["value"] == pytest.approx(0.7333, abs=1e-4) and bar["met"] is False


def test_a_zero_denominator_seed_is_left_out_and_no_seed_is_no_value():
    worlds = [world(0.5, 0, 0.05, 0.05), world(0.5, 1, 0.01, 0.0)]
    assert bench.pooled_ratio(worlds, NO_CTX) == pytest.approx(1.0)
    assert bench.pooled_ratio([world(0.5, 0, 0.01, 0.0)], NO_CTX) is None
    assert bench.pooled_ratio(worlds, "real_context_vs_best_baseline_recall") is None
