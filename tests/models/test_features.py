"""models/features.py: the one raw-value -> model-input conversion shared by all callers."""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from models import features as F
import ctt_contracts as C


def test_pad_history_left_pads_and_keeps_newest():
    items, ts = F.pad_history([5, 6, 7], [10, 20, 30], max_len=5)
    assert items.tolist() == [F.PAD_ITEM, F.PAD_ITEM, 5, 6, 7]
    assert ts.tolist() == [0, 0, 10, 20, 30]
    assert items.dtype == np.int64 and ts.dtype == np.int64
    items, ts = F.pad_history([1, 2, 3, 4], [1, 2, 3, 4], max_len=2)
    assert items.tolist() == [3, 4] and ts.tolist() == [3, 4]
    items, _ = F.pad_history([], [], max_len=3)
    assert items.tolist() == [F.PAD_ITEM] * 3


def test_pad_history_rejects_bad_input():
    with pytest.raises(ValueError, match="differ in length"):
        F.pad_history([1, 2], [1], 4)
    with pytest.raises(ValueError, match="non-negative"):
        F.pad_history([-1], [1], 4)
    with pytest.raises(ValueError, match="positive"):
        F.pad_history([1], [1], 0)


def test_pad_context_keeps_highest_weights_and_renormalises():
    ids, w = F.pad_context([3, 9, 4], [0.2, 0.6, 0.2], max_ctx=2)
    assert ids.tolist() == [9, 3]  # highest first, ties by category id (the contract order)
    ids, w = F.pad_context([4, 9, 3], [0.2, 0.6, 0.2], max_ctx=2)
    assert ids.tolist() == [9, 3]  # whatever order the source listed them in
    np.testing.assert_allclose(w, [0.75, 0.25], rtol=1e-6)
    ids, w = F.pad_context([1], [0.5], max_ctx=3)
    assert ids.tolist() == [1, F.PAD_CATEGORY, F.PAD_CATEGORY]
    np.testing.assert_allclose(w, [1.0, 0.0, 0.0])
    ids, w = F.pad_context([], [], max_ctx=2)  # no context
    assert ids.tolist() == [F.PAD_CATEGORY] * 2 and w.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("ids, weights, match", [
    ([1, 2], [0.5], "differ in length"),
    ([1], [-0.1], "finite and >= 0"),
    ([1], [float("nan")], "finite and >= 0"),
    ([1, 2], [0.0, 0.0], "sum to 0"),
    ([-3], [1.0], "non-negative"),
])
def test_pad_context_rejects_bad_input(ids, weights, match):
    with pytest.raises(ValueError, match=match):
        F.pad_context(ids, weights, 3)


def test_encode_demographics_unknowns_and_stable_country_hash():
    assert F.encode_demographics(None, None, None, 64) == (0, 0, 0)
    assert F.encode_demographics(0, C.UNKNOWN_COUNTRY, "unknown", 64) == (0, 0, 0)
    age, country, gender = F.encode_demographics(3, "fr", "F", 64)
    assert age == 3 and gender == C.GENDERS.index("f")
    assert country == 1 + zlib.crc32(b"FR") % 63  # stable across processes, never 0
    assert F.encode_demographics(3, " FR ", "f", 64)[1] == country


@pytest.mark.parametrize("age, country, gender", [(8, "US", "f"), (-1, "US", "f"), (1, "US", "woman"),
                                                  (1, 12, "f")])
def test_encode_demographics_rejects_invalid(age, country, gender):
    with pytest.raises(ValueError):
        F.encode_demographics(age, country, gender, 64)


def test_time_gap_buckets():
    ts = torch.tensor([[0, 0, 1000, 1000 + 60, 1000 + 60 + 3 * 60, 10**9]])
    valid = torch.tensor([[False, False, True, True, True, True]])
    b = F.time_gap_buckets(ts, valid, n_buckets=8)
    # pad, pad, first, 1 min -> 2+floor(log2 2)=3, 3 min -> 2+2=4, huge gap -> clamped to 7
    assert b.tolist() == [[0, 0, 1, 3, 4, 7]]
