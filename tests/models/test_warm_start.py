"""Co-occurrence warm start: the SVD recovers planted item groups, writes exactly the item rows
of the multi-hash table, and is deterministic."""
from __future__ import annotations

import numpy as np
import torch

from models import features
from models.data import Catalog
from models.two_tower import ContextualTwoTower, ModelConfig
from models.warm_start import cooccurrence_vectors, user_item_matrix


def catalog_of(item_ids) -> Catalog:
    """A Catalog over these sorted raw ids (categories are not used by the warm start)."""
    n = len(item_ids)
    return Catalog(torch.as_tensor(np.asarray(item_ids, dtype=np.int64)),
                   torch.full((n, 1), -1, dtype=torch.long), torch.zeros(n, 1))


def matrix_of(user_ids, histories, label_rows, item_ids):
    """user_item_matrix with the history ids mapped to rows the way the system maps them."""
    return user_item_matrix(np.asarray(user_ids), catalog_of(item_ids).find_rows(np.asarray(histories)),
                            np.asarray(label_rows), len(item_ids))


def planted_groups(n_users: int = 200, n_items: int = 40, seed: int = 0):
    """Users of group g (= user % 2) convert only on items of the same parity."""
    rng = np.random.RandomState(seed)
    user_ids, histories, labels = [], [], []
    for u in range(n_users):
        items = rng.choice(np.arange(u % 2, n_items, 2), size=4, replace=False)
        user_ids.append(u)
        histories.append(np.r_[[features.PAD_ITEM] * 2, items[:3]])
        labels.append(items[3])
    return np.array(user_ids), np.array(histories), np.array(labels), np.arange(n_items)


def test_user_item_matrix_counts_each_pair_once_and_skips_padding():
    # Two examples of user 7 are prefixes of one sequence: item 2 appears in both.
    histories = np.array([[features.PAD_ITEM, 2], [2, 3]])
    m = matrix_of([7, 7], histories, [3, 4], np.arange(10))
    assert m.shape == (1, 10)
    assert m.toarray()[0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]


def test_unknown_history_ids_are_skipped_not_mapped_to_a_neighbour():
    assert catalog_of([1, 5, 9]).find_rows(np.array([[5, 99, -1]])).tolist() == [[1, -1, -1]]
    m = matrix_of([0], [[5, 99]], [0], [1, 5, 9])
    assert m.toarray()[0].tolist() == [1, 1, 0]  # rows of ids 1 and 5; 99 is not item 9


def test_vectors_separate_planted_groups_and_are_deterministic():
    users, hist, labels, catalog = planted_groups()
    matrix = matrix_of(users, hist, labels, catalog)
    v = cooccurrence_vectors(matrix, dim=4)  # (40, 4)
    assert torch.allclose(v, cooccurrence_vectors(matrix, dim=4))
    assert torch.allclose(v.norm(dim=1), torch.ones(40), atol=1e-5)
    sim = v @ v.T  # (40, 40)
    same = torch.tensor([[i % 2 == j % 2 for j in range(40)] for i in range(40)])
    assert sim[same].mean() > sim[~same].mean() + 0.5


def test_items_without_data_get_zero_vectors_and_keep_their_random_rows():
    matrix = matrix_of([0, 1, 2], [[0], [1], [0]], [1, 0, 1], np.arange(5))
    v = cooccurrence_vectors(matrix, dim=8)  # more factors than the data has: zero-padded
    assert v.shape == (5, 8) and torch.all(v[2:] == 0)
    model = ContextualTwoTower(ModelConfig(dim=8, n_heads=2, item_buckets=64))
    ids = torch.arange(5)
    before = model.item_emb(ids).detach().clone()
    model.warm_start_item_embeddings(ids, v)
    after = model.item_emb(ids).detach()
    assert torch.allclose(after[:2], v[:2], atol=1e-6)  # summed hash rows == the vector
    assert torch.equal(after[2:], before[2:])
