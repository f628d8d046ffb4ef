"""Full-corpus retrieval metrics against a naive python reference."""
from __future__ import annotations

import math

import pytest
import torch

from models.metrics import (CatalogCoverage, MeanReciprocalRank, NDCGAtK, RecallAtK, TiedRanks,
                            embedding_scorer, evaluate_ranked, evaluate_scorer, per_query_metrics,
                            rank_targets, rank_with_scorer, retrieval_metrics)


def naive_metrics(scores, targets, exclude=None, ks=(1, 3, 5), ndcg_k=3, cov_k=2):
    """One example at a time, plain python: every position of the target's tie block is
    equally likely, each metric is the average over those positions."""
    n_items = len(scores[0])
    recall = {k: 0.0 for k in ks}
    ndcg = mrr = 0.0
    reached = set()
    for i, row in enumerate(scores):
        drop = set(exclude[i]) - {-1, targets[i]} if exclude else set()
        kept = [j for j in range(n_items) if j not in drop]
        greater = sum(1 for j in kept if row[j] > row[targets[i]])
        ties = sum(1 for j in kept if row[j] == row[targets[i]] and j != targets[i])
        positions = range(greater, greater + ties + 1)
        for k in ks:
            recall[k] += sum(r < k for r in positions) / len(positions)
        ndcg += sum(1 / math.log2(r + 2) for r in positions if r < ndcg_k) / len(positions)
        mrr += sum(1 / (r + 1) for r in positions) / len(positions)
        order = sorted(kept, key=lambda j: -row[j])
        reached.update(order[:cov_k])
    n = len(scores)
    out = {f"recall@{k}": recall[k] / n for k in ks}
    out.update({f"ndcg@{ndcg_k}": ndcg / n, "mrr": mrr / n, "coverage": len(reached) / n_items})
    return out


@pytest.mark.parametrize("with_exclude", [False, True])
def test_metrics_match_naive_reference(with_exclude):
    g = torch.Generator().manual_seed(3)
    users, items = torch.randn(37, 8, generator=g), torch.randn(23, 8, generator=g)
    targets = torch.randint(0, 23, (37,), generator=g)
    exclude = torch.randint(-1, 23, (37, 5), generator=g) if with_exclude else None
    if with_exclude:
        exclude[0, 0] = targets[0]  # the target itself in the history is never dropped
    scores = (users @ items.T).tolist()
    ref = naive_metrics(scores, targets.tolist(), exclude.tolist() if with_exclude else None)

    ranks, top = rank_targets(users, items, targets, exclude, top_k=2, chunk_size=8)  # 5 chunks
    metrics = {f"recall@{k}": RecallAtK(k) for k in (1, 3, 5)}
    metrics.update({"ndcg@3": NDCGAtK(3), "mrr": MeanReciprocalRank()})
    for m in metrics.values():
        m.update(ranks)
    cov = CatalogCoverage(n_items=23, k=2)
    cov.update(top)
    for name, metric in metrics.items():
        assert metric.compute().item() == pytest.approx(ref[name], abs=1e-6), name
    assert cov.compute().item() == pytest.approx(ref["coverage"], abs=1e-6)


def test_ties_count_the_expected_rank_under_random_tie_breaking():
    items = torch.tensor([[1.0], [2.0], [2.0], [0.5], [2.0]])
    ranks, _ = rank_targets(torch.tensor([[1.0], [1.0]]), items, torch.tensor([1, 3]))
    assert ranks.greater.tolist() == [0, 4] and ranks.ties.tolist() == [2, 0]
    assert ranks.mid.tolist() == [1.0, 4.0]  # items 2 and 4 tie with the target 1: mid-rank 1
    recall = RecallAtK(2)
    recall.update(ranks)
    assert recall.compute().item() == pytest.approx((2 / 3 + 0.0) / 2)  # positions 0,1 of 0..2


@pytest.mark.parametrize("with_exclude", [False, True])
def test_coarse_scores_with_many_ties_match_the_naive_expectation(with_exclude):
    """A lookup-table-like scorer (a few distinct values, big tie blocks) against the naive
    average over every tie-breaking position."""
    g = torch.Generator().manual_seed(11)
    scores = torch.randint(0, 4, (41, 29), generator=g).to(torch.float64)  # (B, N) 4 levels
    targets = torch.randint(0, 29, (41,), generator=g)
    exclude = torch.randint(-1, 29, (41, 6), generator=g) if with_exclude else None
    ref = naive_metrics(scores.tolist(), targets.tolist(), exclude.tolist() if with_exclude else None,
                        ks=(1, 5, 10), ndcg_k=10)
    ranks, _ = rank_with_scorer(lambda a, b: scores[a:b], targets, 29, exclude, chunk_size=16)
    got = per_query_metrics(ranks, ks=(1, 5, 10))
    for name in ("recall@1", "recall@5", "recall@10", "ndcg@10", "mrr"):
        assert got[name].mean().item() == pytest.approx(ref[name], abs=1e-12), name


def test_all_equal_scores_get_the_random_ranking_expectation():
    """A model that scores every item alike knows nothing: it must score what random ranking
    scores (Recall@k = k / N, MRR = H_N / N), not 1.0 as when ties favoured the target."""
    n, b = 40, 7
    scores = torch.zeros(b, n)
    targets = torch.arange(b) * 5
    got, ranks = evaluate_ranked(lambda a, c: scores[a:c], targets, n, ks=(1, 10, 50))
    assert ranks.mid.tolist() == [(n - 1) / 2] * b
    assert got["recall@1"] == pytest.approx(1 / n)
    assert got["recall@10"] == pytest.approx(10 / n)
    assert got["recall@50"] == pytest.approx(1.0)
    assert got["mrr"] == pytest.approx(sum(1 / r for r in range(1, n + 1)) / n, rel=1e-6)
    assert got["ndcg@10"] == pytest.approx(sum(1 / math.log2(r + 2) for r in range(10)) / n, rel=1e-6)


def test_untied_ranks_from_elsewhere_are_accepted_as_exact():
    recall = RecallAtK(3)
    recall.update(torch.tensor([0, 2, 3, 7]))
    assert recall.compute().item() == pytest.approx(0.5)
    both = TiedRanks.cat([TiedRanks.exact(torch.tensor([1, 2])), TiedRanks.exact(torch.tensor([3]))])
    assert len(both) == 3 and both[1:].greater.tolist() == [2, 3]


def test_nan_scores_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        rank_with_scorer(lambda a, b: torch.tensor([[0.1, float("nan")]]), torch.tensor([0]), 2)


def test_metric_collection_and_scorer_path_agree():
    g = torch.Generator().manual_seed(0)
    users, items = torch.randn(50, 4, generator=g), torch.randn(30, 4, generator=g)
    targets = torch.randint(0, 30, (50,), generator=g)
    got = evaluate_scorer(embedding_scorer(users, items), targets, 30, ks=(5, 10))
    ranks, top = rank_targets(users, items, targets, top_k=100)
    coll = retrieval_metrics(30, ks=(5, 10))
    coll.update(ranks=ranks, top_items=top)
    assert got == pytest.approx({k: float(v) for k, v in coll.compute().items()})
    assert set(got) == {"recall@5", "recall@10", "ndcg@10", "mrr", "coverage@100"}


def test_metrics_refuse_empty_and_bad_targets():
    with pytest.warns(UserWarning, match="before the ``update``"), \
            pytest.raises(ValueError, match="no examples"):
        RecallAtK(10).compute()
    with pytest.raises(ValueError, match="outside"):
        rank_targets(torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 4]))
