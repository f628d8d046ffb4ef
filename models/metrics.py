"""Full-corpus retrieval metrics (no sampled negatives), vectorised.

Why full corpus: metrics over a handful of sampled negatives overstate quality and can even
rank models in the wrong order; the system serves from the whole catalog, so every example is
ranked against every item. The rank of the target is ``(scores > target_score).sum()`` (ties
count in the target's favour), computed in chunks of users so memory stays ``chunk x N``.

Excluding the user's own history from the ranking is an OPTION (``exclude``): the MovieLens
protocol needs it (a rated movie is never rated again); the synthetic conversion data allows
repeats, so it is off there.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torchmetrics import Metric, MetricCollection

DEFAULT_KS: Tuple[int, ...] = (10, 50, 100, 500)
NDCG_K = 10
COVERAGE_K = 100


Scorer = Callable[[int, int], torch.Tensor]  # (start, stop) -> scores (stop - start, N)


def rank_with_scorer(scorer: Scorer, target_idx: torch.Tensor, n_items: int,
                     exclude: Optional[torch.Tensor] = None, top_k: int = 0,
                     chunk_size: int = 1024) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """0-based rank of each target among all items, and optionally each query's top-k items.

    ``scorer(start, stop)`` returns the scores (b, N) of queries start..stop-1 against every
    item (a model's dot products or a baseline's heuristic), target_idx LongTensor (B,) is the
    target's column, exclude LongTensor (B, H) holds item columns to drop from the ranking
    (-1 = none; the target itself is never dropped). Returns ranks LongTensor (B,) and top-k
    LongTensor (B, top_k) or None.
    """
    if target_idx.numel() and (target_idx.min() < 0 or target_idx.max() >= n_items):
        raise ValueError("target index outside the item matrix")
    ranks, tops = [], []
    for start in range(0, target_idx.shape[0], chunk_size):
        stop = min(start + chunk_size, target_idx.shape[0])
        scores = scorer(start, stop)  # (b, N)
        if scores.shape != (stop - start, n_items):
            raise ValueError(f"scorer returned {tuple(scores.shape)}, expected ({stop - start}, {n_items})")
        target = target_idx[start:stop].unsqueeze(1)  # (b, 1)
        target_score = scores.gather(1, target)  # (b, 1)
        if exclude is not None:
            ex = exclude[start:stop]  # (b, H)
            drop = (ex >= 0) & (ex != target)  # (b, H)
            # Kept slots rewrite the target's own score into the target column (a no-op).
            columns = torch.where(drop, ex, target.expand_as(ex))  # (b, H)
            values = torch.where(drop, torch.full(ex.shape, -math.inf, dtype=scores.dtype),
                                 target_score.expand_as(ex))  # (b, H)
            scores = scores.scatter(1, columns, values)  # (b, N)
        ranks.append((scores > target_score).sum(dim=1))  # (b,)
        if top_k:
            tops.append(scores.topk(min(top_k, n_items), dim=1).indices)  # (b, k)
    rank = torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)
    top = (torch.cat(tops) if tops else torch.zeros(0, top_k, dtype=torch.long)) if top_k else None
    return rank, top


def embedding_scorer(user_emb: torch.Tensor, item_emb: torch.Tensor) -> Scorer:
    """Dot-product scorer: user_emb (B, D), item_emb (N, D) -> chunks of (b, N)."""
    return lambda start, stop: user_emb[start:stop] @ item_emb.T


def rank_targets(user_emb: torch.Tensor, item_emb: torch.Tensor, target_idx: torch.Tensor,
                 exclude: Optional[torch.Tensor] = None, top_k: int = 0,
                 chunk_size: int = 1024) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Ranks of the targets under ``user_emb @ item_emb.T`` (see :func:`rank_with_scorer`)."""
    if user_emb.shape[0] != target_idx.shape[0]:
        raise ValueError(f"{user_emb.shape[0]} users but {target_idx.shape[0]} targets")
    return rank_with_scorer(embedding_scorer(user_emb, item_emb), target_idx, item_emb.shape[0],
                            exclude, top_k, chunk_size)


class _MeanOverQueries(Metric):
    """Mean of a per-query score of the target's rank."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _score(self, ranks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, ranks: torch.Tensor) -> None:
        """ranks LongTensor (B,) 0-based rank of each target."""
        self.total += self._score(ranks).to(torch.float64).sum()
        self.count += ranks.numel()

    def compute(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError(f"{type(self).__name__}: no examples were evaluated")
        return (self.total / self.count).float()


class RecallAtK(_MeanOverQueries):
    """Share of examples whose target is among the top k (one relevant item per example)."""

    def __init__(self, k: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.k = k

    def _score(self, ranks: torch.Tensor) -> torch.Tensor:
        return (ranks < self.k).to(torch.float64)


class NDCGAtK(_MeanOverQueries):
    """NDCG@k with one relevant item: 1 / log2(rank + 2) if rank < k else 0 (ideal DCG = 1)."""

    def __init__(self, k: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.k = k

    def _score(self, ranks: torch.Tensor) -> torch.Tensor:
        gain = 1.0 / torch.log2(ranks.to(torch.float64) + 2.0)
        return torch.where(ranks < self.k, gain, torch.zeros_like(gain))


class MeanReciprocalRank(_MeanOverQueries):
    """Mean of 1 / (rank + 1) over the full corpus (no cut-off)."""

    def _score(self, ranks: torch.Tensor) -> torch.Tensor:
        return 1.0 / (ranks.to(torch.float64) + 1.0)


class CatalogCoverage(Metric):
    """Share of the catalog that appears in at least one example's top-k (seed 002's diversity
    signal: a model collapsing onto a few popular items has high recall on popular targets but
    tiny coverage)."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, n_items: int, k: int = COVERAGE_K, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n_items, self.k = n_items, k
        self.add_state("hits", default=torch.zeros(n_items, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, top_items: torch.Tensor) -> None:
        """top_items LongTensor (B, >= k) item rows ranked best first."""
        self.hits += torch.bincount(top_items[:, : self.k].reshape(-1), minlength=self.n_items)

    def compute(self) -> torch.Tensor:
        return (self.hits > 0).float().mean()


def metric_key(name: str) -> str:
    """A metric name as a logger key: MLflow allows only alphanumerics and ``_-. /``, so the
    report's ``recall@100`` is logged as ``recall_at_100``."""
    return name.replace("@", "_at_")


def metric_names(ks: Sequence[int] = DEFAULT_KS) -> Tuple[str, ...]:
    """Column order of every report: recall@k..., ndcg@10, mrr, coverage@100."""
    return tuple(f"recall@{k}" for k in ks) + (f"ndcg@{NDCG_K}", "mrr", f"coverage@{COVERAGE_K}")


def retrieval_metrics(n_items: int, ks: Sequence[int] = DEFAULT_KS) -> MetricCollection:
    """The report's metrics; update with ``update(ranks=..., top_items=...)``."""
    metrics: Dict[str, Metric] = {f"recall@{k}": RecallAtK(k) for k in ks}
    metrics[f"ndcg@{NDCG_K}"] = NDCGAtK(NDCG_K)
    metrics["mrr"] = MeanReciprocalRank()
    metrics[f"coverage@{COVERAGE_K}"] = CatalogCoverage(n_items, COVERAGE_K)
    return MetricCollection(metrics, compute_groups=False)


def evaluate_scorer(scorer: Scorer, target_idx: torch.Tensor, n_items: int,
                   exclude: Optional[torch.Tensor] = None, ks: Sequence[int] = DEFAULT_KS,
                   chunk_size: int = 1024) -> Dict[str, float]:
    """Rank every target against the full corpus and compute the report's metrics."""
    metrics = retrieval_metrics(n_items, ks)
    ranks, top = rank_with_scorer(scorer, target_idx, n_items, exclude, top_k=COVERAGE_K,
                                  chunk_size=chunk_size)
    metrics.update(ranks=ranks, top_items=top)
    return {name: float(value) for name, value in metrics.compute().items()}
