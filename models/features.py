"""The ONE place that turns raw values into model inputs.

Why one module: the trainer (models/data.py), batch inference (pipelines/inference.py) and the
online resolver (serving/) all feed the same network. If any of them padded a history on the
other side, hashed a country differently or forgot to renormalise context weights, the served
embedding would silently differ from the trained one (training/serving skew). Everything here is
pure python/numpy/torch (no Spark) so every caller can import it.

Conventions (also documented in models/README.md):
- histories are LEFT-padded with ``PAD_ITEM`` / timestamp 0 so the newest event is always at the
  last position (the encoder's split point is the last position);
- context and item categories are padded with ``PAD_CATEGORY`` / weight 0 and their weights are
  renormalised to sum to 1 (an empty list = "no context", all padding);
- demographics map unknown/None to index 0.
"""
from __future__ import annotations

import math
import zlib
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

import ctt_contracts as C

PAD_ITEM = -1
PAD_CATEGORY = -1

# Time-gap buckets: 0 = padding, 1 = first event of the history (no previous event),
# 2.. = 2 + floor(log2(1 + gap_minutes)), clamped to the last bucket.
TIME_GAP_PAD = 0
TIME_GAP_FIRST = 1
_TIME_GAP_OFFSET = 2


def _parallel(a: Optional[Sequence], b: Optional[Sequence], a_dtype: type, b_dtype: type,
              what: str) -> Tuple[np.ndarray, np.ndarray]:
    """Two parallel lists (None: empty) as flat arrays of the given dtypes; a length mismatch is
    an error naming `what`, never a silent truncation."""
    x = np.asarray(a if a is not None else [], dtype=a_dtype).reshape(-1)
    y = np.asarray(b if b is not None else [], dtype=b_dtype).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"{what} differ in length: {x.shape[0]} vs {y.shape[0]}")
    return x, y


def pad_history(item_ids: Sequence[int], event_ts: Sequence[int],
                max_len: int) -> Tuple[np.ndarray, np.ndarray]:
    """Left-pad (or keep the newest ``max_len`` of) one history.

    Returns ``(items int64[max_len], ts int64[max_len])`` with ``PAD_ITEM`` / 0 in front so the
    newest event sits at the last position.
    """
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    items, ts = _parallel(item_ids, event_ts, np.int64, np.int64, "item_ids and event_ts")
    if (items < 0).any():
        raise ValueError("history item ids must be non-negative (PAD_ITEM=-1 is reserved for padding)")
    items, ts = items[-max_len:], ts[-max_len:]
    out_items = np.full(max_len, PAD_ITEM, dtype=np.int64)
    out_ts = np.zeros(max_len, dtype=np.int64)
    n = items.shape[0]
    if n:
        out_items[max_len - n:] = items
        out_ts[max_len - n:] = ts
    return out_items, out_ts


def history_lengths(item_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) left-padded histories -> (B,) number of real events."""
    return (item_ids != PAD_ITEM).sum(dim=1)


def pad_context(category_ids: Optional[Sequence[int]], weights: Optional[Sequence[float]],
                max_ctx: int) -> Tuple[np.ndarray, np.ndarray]:
    """Pad a weighted category list to ``max_ctx`` slots (pad id -1, weight 0).

    Keeps the ``max_ctx`` strongest categories in the contract order and renormalises their
    weights to sum to 1 (``C.project_context``, the one projection the build and the resolver
    also apply), because the context layer pools category embeddings by these weights and must
    see the same categories in the same order and scale at training (pseudo context, item
    categories) and serving (real context). Empty input = no context.
    """
    if max_ctx <= 0:
        raise ValueError(f"max_ctx must be positive, got {max_ctx}")
    ids, w = _parallel(category_ids, weights, np.int64, np.float64, "category ids and weights")
    top_ids, top_w = C.project_context(ids.tolist(), w.tolist(), max_ctx)  # (n,), (n,), n <= max_ctx
    out_ids = np.full(max_ctx, PAD_CATEGORY, dtype=np.int64)
    out_w = np.zeros(max_ctx, dtype=np.float32)
    out_ids[:len(top_ids)] = top_ids
    out_w[:len(top_w)] = top_w
    return out_ids, out_w


def encode_demographics(age_bucket: Optional[int], country: Optional[str], gender: Optional[str],
                        country_buckets: int) -> Tuple[int, int, int]:
    """(age, country, gender) raw values -> embedding indices; unknown/None -> 0.

    Country uses crc32 (stable across processes and machines, unlike python's ``hash``) into
    ``[1, country_buckets)`` so new countries need no vocabulary. Invalid values raise: a bad
    demographic must be fixed upstream (validation quarantines it), not silently become "unknown".
    """
    if country_buckets < 2:
        raise ValueError(f"country_buckets must be >= 2, got {country_buckets}")
    if age_bucket is None or (isinstance(age_bucket, float) and math.isnan(age_bucket)):
        age = 0
    else:
        age = int(age_bucket)
        if not 0 <= age < C.AGE_BUCKETS:
            raise ValueError(f"age_bucket must be in [0, {C.AGE_BUCKETS}), got {age_bucket!r}")
    country_idx = 0
    if isinstance(country, str):
        norm = country.strip().upper()
        if norm and norm != C.UNKNOWN_COUNTRY.upper():
            country_idx = 1 + zlib.crc32(norm.encode("utf-8")) % (country_buckets - 1)
    elif country is not None and not (isinstance(country, float) and math.isnan(country)):
        raise ValueError(f"country must be a string or None, got {country!r}")
    gender_idx = 0
    if isinstance(gender, str):
        norm_g = gender.strip().lower()
        if norm_g not in C.GENDERS:
            raise ValueError(f"gender must be one of {C.GENDERS}, got {gender!r}")
        gender_idx = C.GENDERS.index(norm_g)
    elif gender is not None and not (isinstance(gender, float) and math.isnan(gender)):
        raise ValueError(f"gender must be a string or None, got {gender!r}")
    return age, country_idx, gender_idx


def time_gap_buckets(event_ts: torch.Tensor, valid: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """Log-bucketed gap (minutes) from each event to the previous one.

    event_ts: LongTensor (B, L) epoch seconds, valid: BoolTensor (B, L) (False on padding).
    Returns LongTensor (B, L): 0 on padding, 1 on the first event, else
    ``2 + floor(log2(1 + gap_minutes))`` clamped to ``n_buckets - 1``. Log buckets because the
    gaps of a conversion history span minutes to years; a linear scale would waste all buckets.
    """
    prev = torch.roll(event_ts, shifts=1, dims=1)  # (B, L)
    prev_valid = torch.roll(valid, shifts=1, dims=1).clone()  # (B, L)
    prev_valid[:, 0] = False
    gap_min = (event_ts - prev).clamp(min=0).to(torch.float64) / 60.0  # (B, L)
    bucket = _TIME_GAP_OFFSET + torch.floor(torch.log2(1.0 + gap_min)).to(torch.long)
    bucket = bucket.clamp(max=n_buckets - 1)
    first = torch.full_like(bucket, TIME_GAP_FIRST)
    bucket = torch.where(prev_valid, bucket, first)
    return torch.where(valid, bucket, torch.full_like(bucket, TIME_GAP_PAD))  # (B, L)
