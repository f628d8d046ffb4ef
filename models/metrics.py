"""Full-corpus retrieval metrics (no sampled negatives), vectorised.

Why full corpus: metrics over a handful of sampled negatives overstate quality and can even
rank models in the wrong order; the system serves from the whole catalog, so every example is
ranked against every item, in chunks of users so memory stays ``chunk x N``.

Ties: a target is placed among all items by two counts, the items scored strictly above it and
the other items scored exactly as it (``TiedRanks``). Under uniformly random tie-breaking its
0-based rank is uniform over ``greater .. greater + ties``: the expected rank is the mid-rank
``greater + ties / 2``, and every metric here is its exact expectation over that uniform rank
(Recall@k = share of the tie block that lands above k, and likewise for NDCG and MRR). Counting
ties in the target's favour, as before, let a lookup table that gives most of the catalog the
same score look far better than it is (a model scoring every item alike had Recall@k = 1); now
it scores what random ranking scores (Recall@k = k / N).

Excluding the user's own history from the ranking is an OPTION (``exclude``): the MovieLens
protocol needs it (a rated movie is never rated again); the synthetic conversion data allows
repeats, so it is off there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torchmetrics import Metric, MetricCollection

DEFAULT_KS: Tuple[int, ...] = (10, 50, 100, 500)
NDCG_K = 10
COVERAGE_K = 100
EULER_GAMMA = 0.5772156649015329


Scorer = Callable[[int, int], torch.Tensor]  # (start, stop) -> scores (stop - start, N)


@dataclass(frozen=True)
class TiedRanks:
    """Where each target lands among all items, ties kept apart.

    greater (B,) int64: items scored strictly above the target; ties (B,) int64: OTHER items
    scored exactly as the target (the target itself excluded). The rank under random
    tie-breaking is uniform over ``greater .. greater + ties``.
    """

    greater: torch.Tensor
    ties: torch.Tensor

    @classmethod
    def exact(cls, ranks: torch.Tensor) -> "TiedRanks":
        """Ranks known to be untied (e.g. computed elsewhere): ties = 0."""
        ranks = ranks.to(torch.long)
        return cls(ranks, torch.zeros_like(ranks))

    @classmethod
    def cat(cls, parts: Sequence["TiedRanks"]) -> "TiedRanks":
        if not parts:
            empty = torch.zeros(0, dtype=torch.long)
            return cls(empty, empty)
        return cls(torch.cat([p.greater for p in parts]), torch.cat([p.ties for p in parts]))

    @property
    def mid(self) -> torch.Tensor:
        """(B,) float64 expected 0-based rank under random tie-breaking (mid-rank)."""
        return self.greater.to(torch.float64) + self.ties.to(torch.float64) / 2.0

    def __len__(self) -> int:
        return int(self.greater.shape[0])

    def __getitem__(self, idx) -> "TiedRanks":
        return TiedRanks(self.greater[idx], self.ties[idx])


RankLike = Union[TiedRanks, torch.Tensor]  # a plain tensor = exact, untied 0-based ranks


def as_tied(ranks: RankLike) -> TiedRanks:
    return ranks if isinstance(ranks, TiedRanks) else TiedRanks.exact(ranks)


def expected_hit(ranks: RankLike, k: int) -> torch.Tensor:
    """(B,) float64 P(rank < k) for a rank uniform over greater..greater+ties."""
    r = as_tied(ranks)
    block = r.ties.to(torch.float64) + 1.0
    return (k - r.greater.to(torch.float64)).clamp(min=0.0).minimum(block) / block


def _gain_prefix(k: int) -> torch.Tensor:
    """(k + 1,) float64: entry j = sum of 1 / log2(r + 2) over r < j."""
    gains = 1.0 / torch.log2(torch.arange(k, dtype=torch.float64) + 2.0)
    return torch.cat([torch.zeros(1, dtype=torch.float64), gains.cumsum(0)])


def expected_ndcg(ranks: RankLike, k: int) -> torch.Tensor:
    """(B,) float64 expected NDCG@k with one relevant item: mean of 1 / log2(rank + 2) over the
    tie block's positions below k (0 beyond k); ideal DCG = 1."""
    r = as_tied(ranks)
    prefix = _gain_prefix(k)
    lo = r.greater.clamp(max=k)
    hi = (r.greater + r.ties + 1).clamp(max=k)
    return (prefix[hi] - prefix[lo]) / (r.ties.to(torch.float64) + 1.0)


def _harmonic(n: torch.Tensor) -> torch.Tensor:
    """H(n) = 1 + 1/2 + ... + 1/n as float64 (H(0) = 0)."""
    return torch.special.digamma(n.to(torch.float64) + 1.0) + EULER_GAMMA


def expected_reciprocal_rank(ranks: RankLike) -> torch.Tensor:
    """(B,) float64 expected 1 / (rank + 1): (H(greater + ties + 1) - H(greater)) / (ties + 1)."""
    r = as_tied(ranks)
    exact = 1.0 / (r.greater.to(torch.float64) + 1.0)
    block = (_harmonic(r.greater + r.ties + 1) - _harmonic(r.greater)) / (r.ties.to(torch.float64) + 1.0)
    return torch.where(r.ties == 0, exact, block)


def rank_with_scorer(scorer: Scorer, target_idx: torch.Tensor, n_items: int,
                     exclude: Optional[torch.Tensor] = None, top_k: int = 0,
                     chunk_size: int = 1024) -> Tuple[TiedRanks, Optional[torch.Tensor]]:
    """Where each target lands among all items, and optionally each query's top-k items.

    ``scorer(start, stop)`` returns the scores (b, N) of queries start..stop-1 against every
    item (a model's dot products or a baseline's heuristic), target_idx LongTensor (B,) is the
    target's column, exclude LongTensor (B, H) holds item columns to drop from the ranking
    (-1 = none; the target itself is never dropped). Returns ``TiedRanks`` (B,) and top-k
    LongTensor (B, top_k) or None (ties in the top-k list are cut in index order: coverage is a
    diversity signal, not a rank). NaN scores are refused: they would silently rank nowhere.
    """
    if target_idx.numel() and (target_idx.min() < 0 or target_idx.max() >= n_items):
        raise ValueError("target index outside the item matrix")
    parts, tops = [], []
    for start in range(0, target_idx.shape[0], chunk_size):
        stop = min(start + chunk_size, target_idx.shape[0])
        scores = scorer(start, stop)  # (b, N)
        if scores.shape != (stop - start, n_items):
            raise ValueError(f"scorer returned {tuple(scores.shape)}, expected ({stop - start}, {n_items})")
        if torch.isnan(scores).any():
            raise ValueError("scorer returned NaN scores")
        target = target_idx[start:stop].unsqueeze(1)  # (b, 1)
        target_score = scores.gather(1, target)  # (b, 1)
        above, level = scores > target_score, scores == target_score  # (b, N)
        if exclude is not None:
            ex = exclude[start:stop]  # (b, H)
            drop = (ex >= 0) & (ex != target)  # (b, H)
            # Kept slots write False into the target column, which is never dropped.
            columns = torch.where(drop, ex, target.expand_as(ex))  # (b, H)
            dropped = torch.zeros_like(above).scatter(1, columns, drop)  # (b, N)
            above, level = above & ~dropped, level & ~dropped
            scores = scores.masked_fill(dropped, -math.inf)
        parts.append(TiedRanks(above.sum(dim=1), level.sum(dim=1) - 1))  # (b,), (b,)
        if top_k:
            tops.append(scores.topk(min(top_k, n_items), dim=1).indices)  # (b, k)
    top = (torch.cat(tops) if tops else torch.zeros(0, top_k, dtype=torch.long)) if top_k else None
    return TiedRanks.cat(parts), top


def embedding_scorer(user_emb: torch.Tensor, item_emb: torch.Tensor) -> Scorer:
    """Dot-product scorer: user_emb (B, D), item_emb (N, D) -> chunks of (b, N)."""
    return lambda start, stop: user_emb[start:stop] @ item_emb.T


def rank_targets(user_emb: torch.Tensor, item_emb: torch.Tensor, target_idx: torch.Tensor,
                 exclude: Optional[torch.Tensor] = None, top_k: int = 0,
                 chunk_size: int = 1024) -> Tuple[TiedRanks, Optional[torch.Tensor]]:
    """Ranks of the targets under ``user_emb @ item_emb.T`` (see :func:`rank_with_scorer`)."""
    if user_emb.shape[0] != target_idx.shape[0]:
        raise ValueError(f"{user_emb.shape[0]} users but {target_idx.shape[0]} targets")
    return rank_with_scorer(embedding_scorer(user_emb, item_emb), target_idx, item_emb.shape[0],
                            exclude, top_k, chunk_size)


class _MeanOverQueries(Metric):
    """Mean over queries of a per-query score's expectation under random tie-breaking."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def per_query(self, ranks: RankLike) -> torch.Tensor:
        """(B,) float64 expected score of each query."""
        raise NotImplementedError

    def update(self, ranks: RankLike) -> None:
        """ranks: ``TiedRanks`` from rank_with_scorer, or a (B,) tensor of untied 0-based ranks."""
        ranks = as_tied(ranks)
        self.total += self.per_query(ranks).sum()
        self.count += len(ranks)

    def compute(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError(f"{type(self).__name__}: no examples were evaluated")
        return (self.total / self.count).float()


class _MeanAtK(_MeanOverQueries):
    """A mean over queries of a score with a rank cut-off k: ``score(ranks, k)`` per query."""

    score: Callable[[RankLike, int], torch.Tensor]  # set by each subclass (a staticmethod)

    def __init__(self, k: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.k = k

    def per_query(self, ranks: RankLike) -> torch.Tensor:
        return type(self).score(ranks, self.k)


class RecallAtK(_MeanAtK):
    """Share of examples whose target is among the top k (one relevant item per example),
    each example counting P(rank < k) under random tie-breaking."""

    score = staticmethod(expected_hit)


class NDCGAtK(_MeanAtK):
    """NDCG@k with one relevant item: E[1 / log2(rank + 2) if rank < k else 0] (ideal DCG = 1)."""

    score = staticmethod(expected_ndcg)


class MeanReciprocalRank(_MeanOverQueries):
    """Mean of E[1 / (rank + 1)] over the full corpus (no cut-off)."""

    def per_query(self, ranks: RankLike) -> torch.Tensor:
        return expected_reciprocal_rank(ranks)


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


def per_query_metrics(ranks: RankLike, ks: Sequence[int] = DEFAULT_KS) -> Dict[str, torch.Tensor]:
    """Every rank-based metric of the report per query, (B,) float64 each, in report order
    (coverage is a property of the whole set of top lists, not of one query). The report's
    value of each is the mean; the bootstrap resamples these."""
    out: Dict[str, torch.Tensor] = {f"recall@{k}": expected_hit(ranks, k) for k in ks}
    out[f"ndcg@{NDCG_K}"] = expected_ndcg(ranks, NDCG_K)
    out["mrr"] = expected_reciprocal_rank(ranks)
    return out


def evaluate_scorer(scorer: Scorer, target_idx: torch.Tensor, n_items: int,
                    exclude: Optional[torch.Tensor] = None, ks: Sequence[int] = DEFAULT_KS,
                    chunk_size: int = 1024) -> Dict[str, float]:
    """Rank every target against the full corpus and compute the report's metrics."""
    return evaluate_ranked(scorer, target_idx, n_items, exclude, ks, chunk_size)[0]


def evaluate_ranked(scorer: Scorer, target_idx: torch.Tensor, n_items: int,
                    exclude: Optional[torch.Tensor] = None, ks: Sequence[int] = DEFAULT_KS,
                    chunk_size: int = 1024) -> Tuple[Dict[str, float], TiedRanks]:
    """:func:`evaluate_scorer` plus the per-example ranks (for paired bootstrap intervals)."""
    metrics = retrieval_metrics(n_items, ks)
    ranks, top = rank_with_scorer(scorer, target_idx, n_items, exclude, top_k=COVERAGE_K,
                                  chunk_size=chunk_size)
    metrics.update(ranks=ranks, top_items=top)
    return {name: float(value) for name, value in metrics.compute().items()}, ranks
