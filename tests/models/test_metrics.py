"""Full-corpus retrieval metrics against a naive python reference."""
from __future__ import annotations

import math

import pytest
import torch

from models.metrics import (CatalogCoverage, MeanReciprocalRank, NDCGAtK, RecallAtK, evaluate_scorer,
                            embedding_scorer, rank_targets, retrieval_metrics)


def naive_metrics(scores, targets, exclude=None, ks=(1, 3, 5), ndcg_k=3, cov_k=2):
    """One example at a time, plain python sorting."""
    n_items = len(scores[0])
    recall = {k: 0.0 for k in ks}
    ndcg = mrr = 0.0
    reached = set()
    for i, row in enumerate(scores):
        drop = set(exclude[i]) - {-1, targets[i]} if exclude else set()
        kept = [j for j in range(n_items) if j not in drop]
        rank = sum(1 for j in kept if row[j] > row[targets[i]])
        for k in ks:
            recall[k] += rank < k
        ndcg += 1 / math.log2(rank + 2) if rank < ndcg_k else 0.0
        mrr += 1 / (rank + 1)
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


def test_rank_is_zero_based_and_ties_favour_the_target():
    items = torch.tensor([[1.0], [2.0], [2.0], [0.5]])
    ranks, _ = rank_targets(torch.tensor([[1.0], [1.0]]), items, torch.tensor([1, 3]))
    assert ranks.tolist() == [0, 3]  # item 2 ties with the target 1: not counted above it


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
