"""Non-learned baselines, as scorers for models.metrics.rank_with_scorer.

Each is what a practitioner would deploy before a learned model, and each ranks the whole
catalog for every query (full-corpus metrics), with training-split label counts as the
popularity signal:

- popularity: items by training label count (the floor any model has to beat);
- top category popularity (``top_category_popularity_scorer``): the context's strongest
  category's items by popularity first, then its next categories' in order of weight, then
  everything else by popularity. A lexicographic tiering: an item's tier is the first context
  category it belongs to; within a tier, items are ordered by label count. With the real
  context this is "the most popular items of the subject item's top category" (DESIGN.md
  section 5);
- co-occurrence (``cooccurrence_scorer``): items ranked by how often the training split's
  conversions with subject item X converted on them ("viewed X -> converted Y"), ties and zeros
  (and subjects never seen in training) backed off to top category popularity;
- weighted category popularity (``category_popularity_scorer``): item j scores
  ``affinity_j * (count_j + 1)`` with ``affinity_j = sum_c w_c * item_weight_j(c)``, a softer
  mix of the context's categories (including its weak secondary ones) with popularity.

Without a subject item and without context every one of them is plain popularity. Equal scores
are common (items never converted in training, items sharing a tier and a count): the metrics
count them at their expected rank under random tie-breaking, so no baseline gains from ties.

Catalogs of real logs have tens of thousands of items and thousands of categories, so nothing
here builds a dense (items x categories) or (items x items) matrix: categories and
co-occurrences are kept as compressed rows (``SparseRows``) and expanded per chunk of queries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch

import ctt_contracts as C
from models.metrics import Scorer

_FALLBACK = 1e-6  # weight of plain popularity for items sharing no category with the context


def popularity_scorer(item_counts: torch.Tensor) -> Scorer:
    """item_counts (N,) training label counts -> scorer returning (b, N) copies of them."""
    counts = item_counts.to(torch.float64).unsqueeze(0)  # (1, N)
    return lambda start, stop: counts.expand(stop - start, -1)


def _concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """For blocks [starts[i], starts[i] + lengths[i]): (block index, position) of every element."""
    owner = np.repeat(np.arange(len(lengths)), lengths)
    block_start = np.cumsum(lengths) - lengths  # where each block begins in the output
    pos = np.arange(int(lengths.sum())) - np.repeat(block_start, lengths) + np.repeat(starts, lengths)
    return owner, pos


@dataclass(frozen=True)
class SparseRows:
    """A sparse (rows x N) matrix as compressed rows: row r holds ``(cols, values)`` at
    ``offsets[r]:offsets[r + 1]``. Rows are keys (category ids or subject item rows), columns
    catalog rows."""

    keys: np.ndarray  # (R,) sorted row keys
    offsets: np.ndarray  # (R + 1,)
    cols: np.ndarray  # (nnz,) int64 catalog rows
    values: np.ndarray  # (nnz,) float64

    @classmethod
    def from_triples(cls, keys: np.ndarray, cols: np.ndarray, values: np.ndarray) -> "SparseRows":
        """Entries (key, col, value); repeated (key, col) pairs are summed."""
        keys, cols = np.asarray(keys, np.int64), np.asarray(cols, np.int64)
        values = np.asarray(values, np.float64)
        pairs, inverse = np.unique(np.stack([keys, cols], axis=1), axis=0, return_inverse=True)
        summed = np.bincount(inverse.reshape(-1), weights=values, minlength=len(pairs))
        row_keys, starts = np.unique(pairs[:, 0], return_index=True)
        offsets = np.append(starts, len(pairs)).astype(np.int64)
        return cls(row_keys, offsets, pairs[:, 1].copy(), summed)

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Keys (any shape) -> row index (same shape), -1 for keys without a row."""
        keys = np.asarray(keys, np.int64)
        if len(self.keys) == 0:
            return np.full(keys.shape, -1, np.int64)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where(self.keys[pos] == keys, pos, -1)

    def expand(self, rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row indices (M,) (>= 0) -> every stored entry of them: (which of the M, col, value)."""
        starts = self.offsets[rows]
        owner, pos = _concat_ranges(starts, self.offsets[rows + 1] - starts)
        return owner, self.cols[pos], self.values[pos]


def category_members(cat_ids: torch.Tensor, cat_weights: torch.Tensor) -> SparseRows:
    """Catalog categories (N, Ci) -1-padded -> one row per category id: its items and their
    weight in it."""
    ids = cat_ids.numpy()
    items, slots = np.nonzero(ids >= 0)
    return SparseRows.from_triples(ids[items, slots], items,
                                   cat_weights.numpy()[items, slots].astype(np.float64))


def _by_weight(ctx_ids: torch.Tensor, ctx_weights: torch.Tensor) -> np.ndarray:
    """Context category ids (B, C) in the contract order (``ctt_contracts.category_order``:
    weight desc, then id asc); padding (-1) last."""
    ids, w = ctx_ids.numpy(), ctx_weights.numpy()
    out = np.full_like(ids, -1)  # (B, C)
    for row, (r_ids, r_w) in enumerate(zip(ids, w)):
        present = r_ids >= 0
        cats, weights = r_ids[present].tolist(), r_w[present].tolist()
        out[row, :len(cats)] = [cats[i] for i in C.category_order(cats, weights)]
    return out


def category_tiers(members: SparseRows, ordered_ctx: np.ndarray, n_items: int) -> torch.Tensor:
    """(b, N) int64 tier of every item for each query: the slot of the first context category
    (in the given order) the item belongs to, C (the number of slots) if none."""
    b, n_slots = ordered_ctx.shape
    tier = torch.full((b, n_items), n_slots, dtype=torch.long)
    rows = members.find(ordered_ctx)  # (b, C) -1 = padding or a category no item has
    for slot in reversed(range(n_slots)):  # earlier slots overwrite later ones
        queries = np.flatnonzero(rows[:, slot] >= 0)
        owner, cols, _ = members.expand(rows[queries, slot])
        tier[torch.as_tensor(queries[owner]), torch.as_tensor(cols)] = slot
    return tier


def top_category_popularity_scorer(item_counts: torch.Tensor, cat_ids: torch.Tensor,
                                   cat_weights: torch.Tensor, ctx_ids: torch.Tensor,
                                   ctx_weights: torch.Tensor) -> Scorer:
    """Top category popularity (see module docstring).

    item_counts (N,) training label counts; catalog cat_ids/cat_weights (N, Ci) -1/0 padded;
    query context ctx_ids/ctx_weights (B, C) -1/0 padded (an empty context = popularity). Score
    ``(C - tier) * (max_count + 1) + count``: exact in float64, every tier above the next.
    """
    members = category_members(cat_ids, cat_weights)
    ordered = _by_weight(ctx_ids, ctx_weights)  # (B, C)
    counts = item_counts.to(torch.float64)  # (N,)
    step = float(counts.max()) + 1.0 if len(counts) else 1.0
    n_slots = ordered.shape[1]

    def scorer(start: int, stop: int) -> torch.Tensor:
        tier = category_tiers(members, ordered[start:stop], len(counts))  # (b, N)
        return (n_slots - tier).to(torch.float64) * step + counts.unsqueeze(0)  # (b, N)

    return scorer


def cooccurrence_counts(subject_rows: torch.Tensor, label_rows: torch.Tensor) -> SparseRows:
    """Training examples' (subject row, label row) pairs -> counts keyed by subject row.

    subject_rows (T,) int64 catalog rows, -1 = no subject (skipped); label_rows (T,) int64.
    """
    subjects, labels = subject_rows.numpy(), label_rows.numpy()
    keep = subjects >= 0
    return SparseRows.from_triples(subjects[keep], labels[keep], np.ones(int(keep.sum())))


def cooccurrence_scorer(pairs: SparseRows, subject_rows: torch.Tensor, item_counts: torch.Tensor,
                        cat_ids: torch.Tensor, cat_weights: torch.Tensor, ctx_ids: torch.Tensor,
                        ctx_weights: torch.Tensor) -> Scorer:
    """Co-occurrence from the subject item, backed off to top category popularity.

    pairs from :func:`cooccurrence_counts` on the TRAINING split; subject_rows (B,) the queries'
    subject catalog rows (-1 = none: no co-occurrence, so the back-off alone); the rest as for
    :func:`top_category_popularity_scorer`. Score ``count(X -> j) * span + backoff_j`` with
    ``span`` above every back-off score: co-occurrence decides, the back-off orders its ties.
    """
    backoff = top_category_popularity_scorer(item_counts, cat_ids, cat_weights, ctx_ids, ctx_weights)
    n_items = int(item_counts.shape[0])
    span = (ctx_ids.shape[1] + 1) * (float(item_counts.max()) + 1.0) + 1.0 if n_items else 1.0
    subjects = pairs.find(subject_rows.numpy())  # (B,) -1 = no subject / never seen in training

    def scorer(start: int, stop: int) -> torch.Tensor:
        scores = backoff(start, stop).clone()  # (b, N)
        rows = subjects[start:stop]
        queries = np.flatnonzero(rows >= 0)
        owner, cols, counts = pairs.expand(rows[queries])
        scores.index_put_((torch.as_tensor(queries[owner]), torch.as_tensor(cols)),
                          torch.as_tensor(counts * span), accumulate=True)
        return scores

    return scorer


def category_popularity_scorer(item_counts: torch.Tensor, cat_ids: torch.Tensor,
                               cat_weights: torch.Tensor, ctx_ids: torch.Tensor,
                               ctx_weights: torch.Tensor) -> Scorer:
    """Weighted category popularity (see module docstring).

    item_counts (N,), catalog cat_ids/cat_weights (N, Ci), query context ctx_ids/ctx_weights
    (B, C) (-1/0 padding; an empty context falls back to plain popularity).
    """
    members = category_members(cat_ids, cat_weights)
    ctx_rows = members.find(ctx_ids.numpy())  # (B, C) context categories no item has add nothing
    ctx_w = ctx_weights.numpy().astype(np.float64)
    pop = item_counts.to(torch.float64) + 1.0  # (N,)

    def scorer(start: int, stop: int) -> torch.Tensor:
        affinity = torch.zeros(stop - start, len(pop), dtype=torch.float64)  # (b, N)
        rows, weights = ctx_rows[start:stop], ctx_w[start:stop]
        for slot in range(rows.shape[1]):
            queries = np.flatnonzero(rows[:, slot] >= 0)
            owner, cols, item_w = members.expand(rows[queries, slot])
            affinity.index_put_((torch.as_tensor(queries[owner]), torch.as_tensor(cols)),
                                torch.as_tensor(weights[queries[owner], slot] * item_w),
                                accumulate=True)
        return (affinity + _FALLBACK) * pop.unsqueeze(0)  # (b, N)

    return scorer
