"""Quality checks: paired bootstrap intervals, best-of-baselines ratios, "not enough data"."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models import evaluate as ev
from models import report as rp
from models.metrics import TiedRanks

SPEC = ev.CheckSpec("x", ev.GROUP_REAL, "recall@100", ev.CONTEXTUAL,
                    (ev.TOP_CATEGORY_POPULARITY, ev.COOCCURRENCE), 1.2, 1.0)


def bernoulli(p: float, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g) < p).to(torch.float64)


def test_bootstrap_means_are_paired_seeded_and_chunked():
    values = torch.stack([torch.arange(50, dtype=torch.float64), torch.arange(50, dtype=torch.float64) * 2])
    a = ev.bootstrap_means(values, 250, seed=3, chunk=100)
    assert a.shape == (250, 2)
    assert torch.allclose(a[:, 1], 2 * a[:, 0])  # the same resample for every variant
    assert torch.equal(a, ev.bootstrap_means(values, 250, seed=3, chunk=100))
    assert not torch.equal(a, ev.bootstrap_means(values, 250, seed=4, chunk=100))
    assert float(a[:, 0].mean()) == pytest.approx(24.5, abs=0.5)


def test_interval_of_a_ratio_matches_the_normal_approximation():
    """Denominator constant 0.5 per example: ratio = 2 x a Bernoulli mean, whose 95 % interval is
    about 2 x (p +- 1.96 sqrt(p (1 - p) / n))."""
    n, p = 400, 0.5
    num = bernoulli(p, n, seed=1)
    half = torch.full((n,), 0.5, dtype=torch.float64)
    out = ev.ratio_check(SPEC, num, [half, half * 0.5], [ev.TOP_CATEGORY_POPULARITY, ev.COOCCURRENCE])
    m = float(num.mean())
    assert out["ratio"] == pytest.approx(2 * m)
    assert out["denominator_variant"] == ev.TOP_CATEGORY_POPULARITY and out["denominator"] == 0.5
    se = math.sqrt(m * (1 - m) / n)
    assert out["ci_low"] == pytest.approx(2 * (m - 1.96 * se), abs=0.03)
    assert out["ci_high"] == pytest.approx(2 * (m + 1.96 * se), abs=0.03)
    assert out["n_examples"] == n and out["n_resamples"] == ev.BOOTSTRAP_RESAMPLES


def test_status_needs_the_target_and_the_interval_above_one():
    names = [ev.TOP_CATEGORY_POPULARITY, ev.COOCCURRENCE]
    base = bernoulli(0.3, 2000, seed=2)
    strong = torch.maximum(base, bernoulli(0.3, 2000, seed=5))  # ~0.51 vs ~0.3: ~1.7x
    out = ev.ratio_check(SPEC, strong, [base, base * 0], names)
    assert out["status"] == ev.STATUS_PASSED and out["passed"] and out["ci_low"] > 1.0
    # ratio above 1.2 on few, noisy examples: the interval reaches below 1.0 -> failed
    few_num = torch.tensor([1.0, 0, 0, 0, 0] * 24, dtype=torch.float64)  # 120 examples, mean 0.2
    few_den = torch.tensor([0, 1.0, 0, 0, 0, 0, 0, 0] * 15, dtype=torch.float64)  # mean 0.125
    out = ev.ratio_check(SPEC, few_num, [few_den, few_den], names)
    assert out["ratio"] == pytest.approx(1.6) and out["ci_low"] < 1.0
    assert out["status"] == ev.STATUS_FAILED and not out["passed"]
    # below the target
    out = ev.ratio_check(SPEC, base, [strong, base], names)
    assert out["status"] == ev.STATUS_FAILED and out["denominator_variant"] == ev.TOP_CATEGORY_POPULARITY


def test_the_best_baseline_is_picked_on_every_resample():
    """A baseline that is always at least as good as the other: the interval equals the one
    against it alone; a baseline that wins only on some resamples makes the interval lower."""
    names = [ev.TOP_CATEGORY_POPULARITY, ev.COOCCURRENCE]
    num = bernoulli(0.6, 500, seed=7)
    a = bernoulli(0.4, 500, seed=8)
    dominated = a * bernoulli(0.5, 500, seed=9)
    alone = ev.ratio_check(SPEC, num, [a], names[:1])
    both = ev.ratio_check(SPEC, num, [dominated, a], names)
    assert (both["ratio"], both["ci_low"], both["ci_high"]) == (alone["ratio"], alone["ci_low"], alone["ci_high"])
    assert both["denominator_variant"] == ev.COOCCURRENCE
    rival = bernoulli(0.4, 500, seed=10)  # equal on average: the max over resamples is higher
    mixed = ev.ratio_check(SPEC, num, [a, rival], names)
    assert mixed["ci_low"] < alone["ci_low"]


def test_few_examples_or_a_zero_denominator_is_not_enough_data():
    names = [ev.TOP_CATEGORY_POPULARITY, ev.COOCCURRENCE]
    ones, zeros = torch.ones(99, dtype=torch.float64), torch.zeros(99, dtype=torch.float64)
    out = ev.ratio_check(SPEC, ones, [ones * 0.1, zeros], names)  # 10x, but 99 examples
    assert out["ratio"] == pytest.approx(10.0)
    assert out["status"] == ev.STATUS_NOT_ENOUGH_DATA and out["passed"] is False
    ones, zeros = torch.ones(500, dtype=torch.float64), torch.zeros(500, dtype=torch.float64)
    out = ev.ratio_check(SPEC, ones, [zeros, zeros], names)
    assert out["ratio"] is None and out["ci_low"] is None and out["ci_high"] is None
    assert out["status"] == ev.STATUS_NOT_ENOUGH_DATA and out["passed"] is False
    row = rp.format_check("x", out)
    assert "**not enough data**" in row and "inf" not in row and "True" not in row


def _result(n: int, variants, seed: int = 0) -> ev.EvaluationResult:
    g = torch.Generator().manual_seed(seed)
    result = ev.EvaluationResult()
    for group, variant in variants:
        greater = torch.randint(0, 300, (n,), generator=g)
        result.ranks[group, variant] = TiedRanks(greater, torch.zeros_like(greater))
    return result


def test_quality_checks_skip_checks_whose_variants_were_not_evaluated():
    real = [(ev.GROUP_REAL, v) for v in (ev.CONTEXTUAL, ev.TOP_CATEGORY_POPULARITY, ev.COOCCURRENCE)]
    result = _result(150, real + [(ev.GROUP_ALL, ev.NO_CONTEXT)])
    checks = ev.quality_checks(result)
    assert set(checks) == {"real_context_vs_best_baseline_recall", "real_context_vs_best_baseline_ndcg"}
    seq = [(ev.GROUP_ALL, ev.SEQUENCE_ONLY), (ev.GROUP_REAL, ev.SEQUENCE_ONLY)]
    result = _result(150, real + [(ev.GROUP_ALL, ev.NO_CONTEXT)] + seq)
    checks = ev.quality_checks(result)
    assert set(checks) == {s.name for s in ev.QUALITY_CHECKS}
    recall = checks["real_context_vs_best_baseline_recall"]
    expected = {v: float((result.ranks[ev.GROUP_REAL, v].greater < 100).double().mean())
                for v in (ev.CONTEXTUAL, ev.TOP_CATEGORY_POPULARITY, ev.COOCCURRENCE)}
    best = max(expected[ev.TOP_CATEGORY_POPULARITY], expected[ev.COOCCURRENCE])
    assert recall["ratio"] == pytest.approx(expected[ev.CONTEXTUAL] / best)
    assert checks["no_context_vs_sequence_only"]["target"] == 0.9
    assert checks["no_context_vs_sequence_only"]["group"] == ev.GROUP_ALL


def test_report_prints_intervals_and_checks_serialise_as_json():
    import json

    real = [(ev.GROUP_REAL, v) for v in (ev.CONTEXTUAL, ev.TOP_CATEGORY_POPULARITY, ev.COOCCURRENCE)]
    result = _result(150, real)
    result.checks = ev.quality_checks(result, n_resamples=200, seed=1)
    md = rp.format_markdown(result)
    c = result.checks["real_context_vs_best_baseline_recall"]
    assert f"[{c['ci_low']:.2f}, {c['ci_high']:.2f}]" in md and "200 resamples" in md
    assert json.loads(json.dumps(result.checks, allow_nan=False)) == result.checks
    table = result.checks_table()
    assert table["check.real_context_vs_best_baseline_recall"]["ratio"] == pytest.approx(c["ratio"])
    assert np.isfinite(list(table["check.real_context_vs_best_baseline_ndcg"].values())).all()


def test_subject_relations_are_exclusive_and_follow_the_category_order():
    """Items 0-1 share leaf 10, item 2 is a sibling leaf (11) under parent 20, item 3 another
    parent's leaf; item 4 has no category at all (never 'same leaf' as another such item)."""
    cat_ids = torch.tensor([[10, 20], [10, 20], [11, 20], [12, 21], [-1, -1], [-1, -1]])
    subject = torch.tensor([0, 0, 0, 0, 4])
    label = torch.tensor([0, 1, 2, 3, 5])
    masks = ev.subject_relations(subject, label, cat_ids)
    assert list(masks) == list(ev.RELATIONS)
    as_lists = {k: v.tolist() for k, v in masks.items()}
    assert as_lists[ev.SUBJECT_IS_LABEL] == [True, False, False, False, False]
    assert as_lists[ev.SAME_LEAF] == [False, True, False, False, False]
    assert as_lists[ev.SAME_PARENT] == [False, False, True, False, False]
    assert as_lists[ev.OTHER] == [False, False, False, True, True]
    only_leaf = ev.subject_relations(subject, label, cat_ids[:, :1])  # no second category
    assert only_leaf[ev.SAME_PARENT].tolist() == [False] * 5


def test_relation_slices_recompute_metrics_from_the_stored_ranks():
    result = ev.EvaluationResult(ks=(1, 100))
    result.ranks[ev.GROUP_REAL, ev.CONTEXTUAL] = TiedRanks(torch.tensor([0, 5, 500, 0]),
                                                           torch.tensor([0, 0, 0, 3]))
    result.ranks[ev.GROUP_ALL, ev.CONTEXTUAL] = TiedRanks.exact(torch.tensor([900, 900, 900, 900]))
    cat_ids = torch.tensor([[10, 20], [10, 20], [11, 20], [12, 21]])
    sub = {ev.SUBJECT_ROW: torch.tensor([0, 0, 0, 0]), ev.LABEL_ROW: torch.tensor([0, 1, 2, 3])}
    rows = {r["relation"]: r for r in ev.relation_slices(result, sub, cat_ids)}
    assert set(rows) == set(ev.RELATIONS)  # the "all" group's ranks are not read
    assert rows[ev.SUBJECT_IS_LABEL]["recall@100"] == 1.0
    assert rows[ev.SAME_LEAF]["recall@100"] == 1.0
    assert rows[ev.SAME_PARENT]["recall@100"] == 0.0
    assert rows[ev.OTHER]["ndcg@10"] == pytest.approx(
        float(ev.per_query_metrics(TiedRanks(torch.tensor([0]), torch.tensor([3])))["ndcg@10"][0]))
    table = "\n".join(rp.format_slices(list(rows.values())))
    assert "| same_parent | 1 | 0.000 / 0.000 |" in table
