"""Baselines against hand-computed rankings on a six-item catalog.

Catalog (row: categories with weights; training label count):

    0: 10 (1.0)            5
    1: 10 (0.6), 20 (0.4)  1
    2: 20 (1.0)            3
    3: 30 (1.0)            9
    4: 20 (0.7), 30 (0.3)  0
    5: 30 (1.0)            2

Global popularity order: 3 (9), 0 (5), 2 (3), 5 (2), 1 (1), 4 (0).
"""
from __future__ import annotations

import pytest
import torch

from models import baselines as B
from models.metrics import rank_with_scorer

PAD = -1
CAT_IDS = torch.tensor([[10, PAD], [10, 20], [20, PAD], [30, PAD], [20, 30], [30, PAD]])
CAT_W = torch.tensor([[1.0, 0], [0.6, 0.4], [1.0, 0], [1.0, 0], [0.7, 0.3], [1.0, 0]])
COUNTS = torch.tensor([5.0, 1.0, 3.0, 9.0, 0.0, 2.0])
N = 6


def ranking(scorer, query: int = 0) -> list:
    """Item rows best first for one query (the test data has no ties unless stated)."""
    scores = scorer(query, query + 1)[0]
    return sorted(range(N), key=lambda j: (-float(scores[j]), j))


def ctx(*pairs, slots: int = 3):
    """One query's context tensors (1, slots) from (category, weight) pairs, padded."""
    ids = [c for c, _ in pairs] + [PAD] * (slots - len(pairs))
    w = [w for _, w in pairs] + [0.0] * (slots - len(pairs))
    return torch.tensor([ids]), torch.tensor([w])


def test_popularity():
    assert ranking(B.popularity_scorer(COUNTS)) == [3, 0, 2, 5, 1, 4]


def test_top_category_popularity_tiers_the_context_categories_in_weight_order():
    # context 20 (0.7) then 10 (0.3), given in the wrong slot order on purpose:
    # tier 0 = items of 20 by count: 2 (3), 1 (1), 4 (0); tier 1 = rest of 10: 0 (5);
    # then the rest by popularity: 3 (9), 5 (2)
    ids, w = ctx((10, 0.3), (20, 0.7))
    scorer = B.top_category_popularity_scorer(COUNTS, CAT_IDS, CAT_W, ids, w)
    assert ranking(scorer) == [2, 1, 4, 0, 3, 5]
    # a category no item has is skipped; the next one leads
    ids, w = ctx((99, 0.9), (30, 0.1))
    assert ranking(B.top_category_popularity_scorer(COUNTS, CAT_IDS, CAT_W, ids, w)) == [3, 5, 4, 0, 2, 1]


def test_top_category_popularity_without_context_is_popularity():
    ids, w = ctx()
    scorer = B.top_category_popularity_scorer(COUNTS, CAT_IDS, CAT_W, ids, w)
    assert ranking(scorer) == [3, 0, 2, 5, 1, 4]


def test_ties_within_a_tier_rank_at_the_mid_rank():
    counts = torch.tensor([5.0, 1.0, 1.0, 9.0, 1.0, 2.0])  # 1, 2 and 4 tie in category 20's tier
    ids, w = ctx((20, 1.0))
    scorer = B.top_category_popularity_scorer(counts, CAT_IDS, CAT_W, ids, w)
    ranks, _ = rank_with_scorer(scorer, torch.tensor([2]), N)
    assert (int(ranks.greater[0]), int(ranks.ties[0])) == (0, 2) and float(ranks.mid[0]) == 1.0


# Training pairs (subject row -> converted row): 0 -> 3 twice, 0 -> 4, 2 -> 5; one example
# without a subject (-1 -> 1) that must not count.
TRAIN_SUBJECTS = torch.tensor([0, 0, 0, 2, -1])
TRAIN_LABELS = torch.tensor([3, 3, 4, 5, 1])


def test_cooccurrence_counts():
    pairs = B.cooccurrence_counts(TRAIN_SUBJECTS, TRAIN_LABELS)
    assert pairs.keys.tolist() == [0, 2]
    owner, cols, values = pairs.expand(pairs.find([0, 2]))
    assert sorted(zip(owner.tolist(), cols.tolist(), values.tolist())) == [
        (0, 3, 2.0), (0, 4, 1.0), (1, 5, 1.0)]


def test_cooccurrence_ranks_by_pair_counts_then_backs_off_to_top_category():
    pairs = B.cooccurrence_counts(TRAIN_SUBJECTS, TRAIN_LABELS)
    # query 0: subject 0 (category 10): 3 (2 pairs), 4 (1 pair), then top category 10 by
    #   count: 0 (5), 1 (1), then popularity: 2 (3), 5 (2)
    # query 1: subject 1, never a training subject: top category 10 then 20 (its context)
    #   -> 0 (5), 1 (1), 2 (3), 4 (0), then 3 (9), 5 (2)
    # query 2: no subject and no context: popularity
    subjects = torch.tensor([0, 1, -1])
    ids = torch.tensor([[10, PAD], [10, 20], [PAD, PAD]])
    w = torch.tensor([[1.0, 0], [0.6, 0.4], [0, 0]])
    scorer = B.cooccurrence_scorer(pairs, subjects, COUNTS, CAT_IDS, CAT_W, ids, w)
    assert ranking(scorer, 0) == [3, 4, 0, 1, 2, 5]
    assert ranking(scorer, 1) == [0, 1, 2, 4, 3, 5]
    assert ranking(scorer, 2) == [3, 0, 2, 5, 1, 4]
    # the same through the ranking: target 4 for query 0 sits right behind item 3
    ranks, _ = rank_with_scorer(scorer, torch.tensor([4, 4, 4]), N, chunk_size=2)
    assert ranks.greater.tolist() == [1, 3, 5] and ranks.ties.tolist() == [0, 0, 0]


def test_cooccurrence_lets_a_strong_pair_beat_any_category_item():
    """One training pair outranks the most popular item of the subject's top category."""
    pairs = B.cooccurrence_counts(torch.tensor([2]), torch.tensor([3]))  # 2 -> 3 once
    ids, w = ctx((20, 1.0), slots=2)
    scorer = B.cooccurrence_scorer(pairs, torch.tensor([2]), COUNTS, CAT_IDS, CAT_W, ids, w)
    assert ranking(scorer) == [3, 2, 1, 4, 0, 5]


def test_weighted_category_popularity():
    # context 20 (0.7), 10 (0.3): affinity = 0.3*w10 + 0.7*w20
    #   0: 0.3, 1: 0.3*0.6 + 0.7*0.4 = 0.46, 2: 0.7, 3: 0, 4: 0.7*0.7 = 0.49, 5: 0
    # score = (affinity + 1e-6) * (count + 1)
    ids, w = ctx((20, 0.7), (10, 0.3))
    scores = B.category_popularity_scorer(COUNTS, CAT_IDS, CAT_W, ids, w)(0, 1)[0]
    affinity = torch.tensor([0.3, 0.46, 0.7, 0.0, 0.49, 0.0], dtype=torch.float64)
    expected = (affinity + 1e-6) * (COUNTS.double() + 1)
    assert torch.allclose(scores, expected, rtol=1e-6)
    assert ranking(B.category_popularity_scorer(COUNTS, CAT_IDS, CAT_W, ids, w)) == [2, 0, 1, 4, 3, 5]
    ids, w = ctx()
    assert ranking(B.category_popularity_scorer(COUNTS, CAT_IDS, CAT_W, ids, w)) == [3, 0, 2, 5, 1, 4]


def test_scorers_chunk_like_the_whole():
    """Scoring queries in chunks gives the rows of scoring them at once."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(-1, 40, (9, 3), generator=g)
    w = torch.rand(9, 3, generator=g) * (ids >= 0)
    subjects = torch.randint(-1, N, (9,), generator=g)
    pairs = B.cooccurrence_counts(torch.randint(-1, N, (30,), generator=g),
                                  torch.randint(0, N, (30,), generator=g))
    ids[0] = torch.tensor([10, 20, 30])
    for scorer in (B.top_category_popularity_scorer(COUNTS, CAT_IDS, CAT_W, ids, w),
                   B.category_popularity_scorer(COUNTS, CAT_IDS, CAT_W, ids, w),
                   B.cooccurrence_scorer(pairs, subjects, COUNTS, CAT_IDS, CAT_W, ids, w)):
        whole = scorer(0, 9)
        assert torch.equal(torch.cat([scorer(0, 4), scorer(4, 9)]), whole)
        assert whole.shape == (9, N) and whole.dtype == torch.float64


@pytest.mark.parametrize("keys", [[], [7]])
def test_sparse_rows_find_unknown_keys(keys):
    rows = B.SparseRows.from_triples(keys, [0] * len(keys), [1.0] * len(keys))
    assert rows.find([3, -1]).tolist() == [-1, -1]
