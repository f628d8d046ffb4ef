"""Non-learned baselines, as scorers for models.metrics.rank_with_scorer.

- popularity: every query gets the catalog ranked by the item's label count in the training
  split (the floor any model has to beat);
- popularity within the context's categories: the context heuristic a contextual model has to
  beat. Item j's score for a query with context categories c (weights w_c) is
  ``affinity_j * (count_j + 1)`` with ``affinity_j = sum_c w_c * item_weight_j(c)``: popular
  items whose categories match the context strongly come first; a tiny popularity term orders
  the items outside the context so the ranking is still full-corpus.
"""
from __future__ import annotations

import numpy as np
import torch

from models.metrics import Scorer

_FALLBACK = 1e-6  # weight of plain popularity for items sharing no category with the context


def popularity_scorer(item_counts: torch.Tensor) -> Scorer:
    """item_counts (N,) training label counts -> scorer returning (b, N) copies of them."""
    counts = item_counts.to(torch.float64).unsqueeze(0)  # (1, N)
    return lambda start, stop: counts.expand(stop - start, -1)


def item_category_matrix(cat_ids: torch.Tensor, cat_weights: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """Catalog categories (N, Ci) -1-padded -> dense (N, K) weights and the K category ids."""
    ids = cat_ids.numpy()
    vocab = np.unique(ids[ids >= 0])  # (K,)
    dense = torch.zeros(ids.shape[0], len(vocab), dtype=torch.float64)  # (N, K)
    rows, slots = np.nonzero(ids >= 0)
    cols = np.searchsorted(vocab, ids[rows, slots])
    dense[torch.as_tensor(rows), torch.as_tensor(cols)] = cat_weights[rows, slots].to(torch.float64)
    return dense, vocab


def category_popularity_scorer(item_counts: torch.Tensor, cat_ids: torch.Tensor,
                               cat_weights: torch.Tensor, ctx_ids: torch.Tensor,
                               ctx_weights: torch.Tensor) -> Scorer:
    """Popularity within the context's categories (see module docstring).

    item_counts (N,), catalog cat_ids/cat_weights (N, Ci), query context ctx_ids/ctx_weights
    (B, C) (-1/0 padding; an empty context falls back to plain popularity).
    """
    item_cats, vocab = item_category_matrix(cat_ids, cat_weights)  # (N, K)
    if len(vocab) == 0:  # a catalog without categories: the heuristic is plain popularity
        return popularity_scorer(item_counts)
    ctx = ctx_ids.numpy()
    pos = np.minimum(np.searchsorted(vocab, ctx), len(vocab) - 1)  # (B, C)
    known = (ctx >= 0) & (vocab[pos] == ctx)  # context categories no item has add nothing
    query = torch.zeros(ctx.shape[0], len(vocab), dtype=torch.float64)  # (B, K)
    b_idx, c_idx = np.nonzero(known)
    query.index_put_((torch.as_tensor(b_idx), torch.as_tensor(pos[b_idx, c_idx])),
                     ctx_weights[b_idx, c_idx].to(torch.float64), accumulate=True)
    pop = item_counts.to(torch.float64) + 1.0  # (N,)

    def scorer(start: int, stop: int) -> torch.Tensor:
        affinity = query[start:stop] @ item_cats.T  # (b, N)
        return (affinity + _FALLBACK) * pop.unsqueeze(0)  # (b, N)

    return scorer
