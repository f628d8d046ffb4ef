"""The contextual sequential two-tower model, split at the encoder's last hidden state(s).

Hybrid inference (seed 003): ``encode_user_state`` is the heavy offline half (multi-hash item
embeddings + causal Transformer), run in batch and cached per user in Feast;
``query_from_state`` is the light online half (context layer + demographics + fusion MLP) run
per request on the cached state and the real-time context. ``forward`` is literally their
composition, so the split can never drift from the trained function.

Cold start: a user without a cached state is served with ``state=None``; the model then uses
its learned ``no_history_state`` vector (trained by dropping the whole history for a small
share of training examples, see ``system.py``). An all-padding history given to
``encode_user_state`` also maps to that vector, so "no history" means one thing everywhere.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from models import features
from models.components.context import (ContextLayer, DemographicsEmbedding, drop_context_slots,
                                       swap_context_slots)
from models.components.embeddings import MultiHashEmbedding, weighted_pool
from models.components.encoder import CausalSequenceEncoder
from models.components.heads import (ConcatFusion, CrossAttentionFusion, EmbeddingItemTower,
                                     IdentityFusion, ItemTower)

FUSIONS = ("concat", "cross_attention", "identity")
ITEM_TOWERS = ("mlp", "embedding", "embedding_dot")
CATEGORY_POOLS = ("weighted", "mean")
# encode_user_state runs batches larger than this as length-sorted chunks of this many rows.
STATE_CHUNK_ROWS = 128


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters; serialised to the bundle's config.json (immutable: the
    same object is the default of the CLI and the record of a trained model)."""

    dim: int = 64
    n_layers: int = 2
    n_heads: int = 2
    max_len: int = 50  # history length seen by the encoder (newest events kept)
    item_buckets: int = 16384  # rows per hash function of the item id table
    category_buckets: int = 1024  # rows per hash function of the category table
    n_hashes: int = 2
    hash_seed: int = 0
    country_buckets: int = 64
    max_ctx: int = 5  # context categories kept (highest confidence first)
    max_item_categories: int = 8  # categories per item seen by the item tower
    n_time_buckets: int = 24
    mlp_hidden: int = 128
    dropout: float = 0.1
    attention_dropout: Optional[float] = None  # on the encoder's attention probabilities; None = dropout
    context_dropout: float = 0.5  # elementwise dropout on the context vector
    context_drop_prob: float = 0.5  # share of training examples whose whole context is zeroed
    context_slot_drop_prob: float = 0.0  # training: chance to drop each non-strongest context category
    context_slot_swap_prob: float = 0.0  # training: chance to swap it for another example's category
    # "concat" | "cross_attention" | "identity" (the user embedding is the normalised last state:
    # SASRec's query, for a model without context or demographics)
    fusion: str = "concat"
    # concat / cross_attention: the fusion MLP's output is added to the last encoder state before
    # the normalisation, so the MLP learns a correction of SASRec's query rather than replacing it.
    fusion_residual: bool = False
    state_len: int = 1  # m: number of last encoder states cached per user (1 = last hidden state)
    use_context: bool = True
    use_demographics: bool = True
    use_subject_item: bool = False  # the subject item's own item-tower embedding joins the context
    tower_skip: bool = False  # raw category (+ subject, id) embeddings added to both towers' outputs
    use_item_categories: bool = True  # False: the item tower reads the item id only
    use_time_gaps: bool = True  # False: the encoder reads item ids and positions only
    # How the item tower pools an item's categories: "weighted" by the catalog's weights (a
    # taxonomy's leaf dominates), "mean" = each listed category counts the same, so an item
    # sharing only the parent with the context keeps a score well above an unrelated one.
    item_category_pool: str = "weighted"
    # "mlp": the item tower's MLP over (id, categories); "embedding": the item is its normalised
    # id (+ pooled category) embedding, the very vectors the encoder reads (SASRec's tied output);
    # "embedding_dot": the same vectors unnormalised, so an item's norm can carry its popularity
    # (the score is a dot product with the unit-norm query).
    item_tower: str = "mlp"

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} must be divisible by n_heads {self.n_heads}")
        if not 1 <= self.state_len <= self.max_len:
            raise ValueError(f"state_len must be in [1, max_len={self.max_len}], got {self.state_len}")
        if self.n_time_buckets < 3:
            raise ValueError("n_time_buckets must be >= 3 (padding, first event, >= 1 gap bucket)")
        if self.item_category_pool not in CATEGORY_POOLS:
            raise ValueError(f"item_category_pool must be one of {CATEGORY_POOLS}, "
                             f"got {self.item_category_pool!r}")
        if self.item_tower not in ITEM_TOWERS:
            raise ValueError(f"item_tower must be one of {ITEM_TOWERS}, got {self.item_tower!r}")
        if self.fusion == "identity" and self.fusion_residual:
            raise ValueError("fusion_residual adds the fusion MLP's output to the state; fusion "
                             "'identity' has no MLP")
        if self.fusion == "identity" and (self.use_context or self.use_demographics
                                          or self.state_len != 1):
            raise ValueError("fusion 'identity' has no MLP to combine context or demographics "
                             "with the state: it needs use_context=False, use_demographics=False "
                             "and state_len=1")
        if self.use_subject_item and not self.use_context:
            raise ValueError("use_subject_item needs use_context (the subject is part of the context)")

    @property
    def state_dim(self) -> int:
        return self.state_len * self.dim

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        return cls(**values)


def trim_left_padding(item_ids: torch.Tensor, event_ts: torch.Tensor,
                      keep: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the leading columns that are padding in EVERY row (but keep >= ``keep`` columns).

    Why: conversion histories are short (a handful of events) while max_len is sized for heavy
    users, so most of a (B, max_len) batch is padding and attention costs O(L^2). The encoder is
    invariant to left padding (recency positions, masked pad keys), so trimming changes nothing
    but the cost. item_ids/event_ts (B, L) -> (B, L').
    """
    valid_cols = (item_ids != features.PAD_ITEM).any(dim=0)  # (L,)
    if valid_cols.any():
        first = int(valid_cols.nonzero()[0, 0])
    else:
        first = item_ids.shape[1]
    first = max(0, min(first, item_ids.shape[1] - keep))
    return item_ids[:, first:], event_ts[:, first:]


def length_sorted_chunks(item_ids: torch.Tensor, chunk_rows: int) -> tuple[torch.Tensor, list]:
    """item_ids (B, L) left-padded -> (order (B,), the rows sorted by history length (stable);
    chunks: consecutive runs of ``chunk_rows`` of ``order``, each a LongTensor of row indices)."""
    order = torch.argsort(features.history_lengths(item_ids), stable=True)  # (B,)
    return order, list(order.split(chunk_rows))


class ContextualTwoTower(nn.Module):
    """User tower (encoder -> state -> context/demographics fusion) and item tower."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d = config.dim
        # Shared by the history encoder and the item tower (SASRec-style tied item embeddings),
        # and by the context layer and the item tower (context categories live in the same space
        # as item categories, which is what makes pseudo context learnable quickly).
        self.item_emb = MultiHashEmbedding(config.item_buckets, d, config.n_hashes, config.hash_seed)
        self.category_emb = MultiHashEmbedding(config.category_buckets, d, config.n_hashes,
                                               config.hash_seed + 1)
        self.encoder = CausalSequenceEncoder(d, config.n_layers, config.n_heads, config.max_len,
                                             config.n_time_buckets, config.dropout,
                                             config.use_time_gaps, config.attention_dropout)
        self.pad_slot = nn.Parameter(torch.zeros(d))  # state slot of a history shorter than m
        self.no_history_state = nn.Parameter(torch.randn(config.state_dim) * 0.02)  # cold start
        self.context = (ContextLayer(d, config.context_dropout, config.context_drop_prob)
                        if config.use_context else None)
        # No bias: "no subject" (a zero embedding) must add nothing to the context.
        self.subject_proj = nn.Linear(d, d, bias=False) if config.use_subject_item else None
        self.demographics = (DemographicsEmbedding(d, config.country_buckets, config.dropout)
                             if config.use_demographics else None)
        if config.fusion == "concat":
            self.fusion: nn.Module = ConcatFusion(d, config.state_len, config.use_context,
                                                  config.use_demographics, config.mlp_hidden,
                                                  config.dropout, config.fusion_residual)
        elif config.fusion == "cross_attention":
            self.fusion = CrossAttentionFusion(d, config.n_heads, config.state_len, config.use_context,
                                               config.use_demographics, config.mlp_hidden,
                                               config.dropout, config.fusion_residual)
        else:
            self.fusion = IdentityFusion()
        self.item_tower = (ItemTower(d, config.mlp_hidden, config.dropout)
                           if config.item_tower == "mlp"
                           else EmbeddingItemTower(normalize=config.item_tower == "embedding"))
        # Skip paths (see tower_skip in query_from_state / item_embeddings): learned scales, start at 1.
        self.user_skip = nn.Parameter(torch.ones(())) if config.tower_skip and config.use_context else None
        self.item_skip = nn.Parameter(torch.ones(())) if config.tower_skip else None

    @property
    def state_dim(self) -> int:
        return self.config.state_dim

    # ---------------------------------------------------------------- offline half
    def encode_user_state(self, item_ids: torch.Tensor, event_ts: torch.Tensor) -> torch.Tensor:
        """item_ids LongTensor (B, L) left-padded with PAD_ITEM, event_ts LongTensor (B, L) epoch s
        -> state (B, state_dim): the last ``state_len`` encoder outputs, flattened.

        A batch of more than ``STATE_CHUNK_ROWS`` rows is encoded as chunks of rows of similar
        length (``length_sorted_chunks``), each trimmed to its own longest history, and put back in
        the input order. Why: evaluation and batch inference take the rows in their stored order,
        and one long history would pad the whole batch to it (attention is quadratic in the
        length). Validation of MovieLens-1M (2,999 users, 3 batches of 1,024, 2 threads): 2.2 s
        -> 1.35 s per epoch.
        The states are the same as unchunked up to float rounding (left padding changes nothing).
        """
        if item_ids.shape[0] <= STATE_CHUNK_ROWS:
            return self._encode_state(item_ids, event_ts)
        order, chunks = length_sorted_chunks(item_ids, STATE_CHUNK_ROWS)
        parts = [self._encode_state(item_ids[rows], event_ts[rows]) for rows in chunks]  # (b, S) each
        return torch.cat(parts)[torch.argsort(order)]  # (B, S) in the input order

    def _encode_state(self, item_ids: torch.Tensor, event_ts: torch.Tensor) -> torch.Tensor:
        """``encode_user_state`` of one chunk: (B, L), (B, L) -> (B, state_dim)."""
        m, d = self.config.state_len, self.config.dim
        item_ids, event_ts = trim_left_padding(item_ids, event_ts, keep=m)  # (B, L') L' <= L
        hidden, valid = self.encode_positions(item_ids, event_ts)  # (B, L', D), (B, L')
        if hidden.shape[1] < m:  # shorter input than the state: pad slots in front
            short = m - hidden.shape[1]
            hidden = torch.cat([hidden.new_zeros(hidden.shape[0], short, d), hidden], dim=1)
            valid = torch.cat([valid.new_zeros(valid.shape[0], short), valid], dim=1)
        last, last_valid = hidden[:, -m:], valid[:, -m:]  # (B, m, D), (B, m)
        slots = torch.where(last_valid.unsqueeze(-1), last, self.pad_slot.expand_as(last))  # (B, m, D)
        state = slots.flatten(1)  # (B, m*D)
        has_history = valid.any(dim=1, keepdim=True)  # (B, 1)
        return torch.where(has_history, state, self.no_history_state.expand_as(state))  # (B, m*D)

    def encode_positions(self, item_ids: torch.Tensor,
                         event_ts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """item_ids LongTensor (B, L) left-padded, event_ts LongTensor (B, L) -> the encoder output
        at EVERY position (B, L, D) and the validity mask (B, L).

        Position t is a function of events <= t only (causal). Its recency embedding counts from
        the newest event of the whole row, so position t equals ``encode_user_state`` of the
        prefix up to t only at the last position; the all-positions objective trains the earlier
        positions the way SASRec does (one causal pass per sequence, fixed slot positions).
        """
        valid = item_ids != features.PAD_ITEM  # (B, L)
        tokens = self.item_emb(item_ids)  # (B, L, D)
        gaps = (features.time_gap_buckets(event_ts, valid, self.config.n_time_buckets)
                if self.config.use_time_gaps else None)  # (B, L)
        return self.encoder(tokens, gaps, valid), valid  # (B, L, D), (B, L)

    def cold_start_state(self, batch_size: int) -> torch.Tensor:
        """The learned state of a user with no history: (B, state_dim)."""
        return self.no_history_state.unsqueeze(0).expand(batch_size, -1)

    # ---------------------------------------------------------------- online half
    def query_from_state(self, state: Optional[torch.Tensor], ctx_ids: Optional[torch.Tensor],
                         ctx_weights: Optional[torch.Tensor], age: Optional[torch.Tensor],
                         country: Optional[torch.Tensor], gender: Optional[torch.Tensor],
                         subject_emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        """state (B, state_dim) or None (cold start), ctx_ids LongTensor (B, C) (-1 pad),
        ctx_weights (B, C), age/country/gender LongTensor (B,), subject_emb (B, D) the subject
        item's item-tower embedding (zero rows or None = no subject item) -> user embedding
        (B, D), unit norm.

        Inputs the configuration does not use (context when use_context=False, demographics when
        use_demographics=False, the subject when use_subject_item=False) may be None and are
        ignored.
        """
        batch = self._batch_size(state, ctx_ids, age)
        if state is None:
            state = self.cold_start_state(batch)
        if state.shape != (batch, self.state_dim):
            raise ValueError(f"state must be ({batch}, {self.state_dim}), got {tuple(state.shape)}")
        states = state.reshape(batch, self.config.state_len, self.config.dim)  # (B, m, D)
        ctx, skip = None, None
        if self.context is not None:
            if ctx_ids is None or ctx_weights is None:
                raise ValueError("this model uses context: pass ctx_ids/ctx_weights (all -1/0 = none)")
            if self.training and self.config.context_slot_swap_prob > 0:
                ctx_ids, ctx_weights = swap_context_slots(ctx_ids, ctx_weights,
                                                          self.config.context_slot_swap_prob)
            if self.training and self.config.context_slot_drop_prob > 0:
                ctx_weights = drop_context_slots(ctx_weights, self.config.context_slot_drop_prob)
            pooled = weighted_pool(self.category_emb(ctx_ids), ctx_weights)  # (B, D)
            raw = pooled  # (B, D) what the skip path carries: the context in the item space
            if self.subject_proj is not None and subject_emb is not None:
                subject_emb = subject_emb.to(pooled.dtype)
                pooled = pooled + self.subject_proj(subject_emb)  # (B, D)
                raw = raw + subject_emb
            keep = self.context.keep_mask(batch, pooled.device)  # (B, 1) whole-context dropout
            ctx = self.context(pooled, keep)  # (B, D)
            if self.user_skip is not None:
                skip = self.user_skip * raw * keep.to(raw.dtype)  # (B, D)
        demo = None
        if self.demographics is not None:
            if age is None or country is None or gender is None:
                raise ValueError("this model uses demographics: pass age/country/gender (0 = unknown)")
            demo = self.demographics(age, country, gender)  # (B, D)
        user = self.fusion(states, ctx, demo)  # (B, D) unit norm
        if skip is None:
            return user
        # Why the skip: the raw context lives in the item tower's space, so "items of the subject's
        # categories, and the subject itself" score high from the first step, for categories and
        # items seen too rarely for the MLP to have learned them (most of a real catalogue).
        return F.normalize(user + skip, dim=-1)  # (B, D)

    def forward(self, item_ids: torch.Tensor, event_ts: torch.Tensor, ctx_ids: Optional[torch.Tensor],
                ctx_weights: Optional[torch.Tensor], age: Optional[torch.Tensor],
                country: Optional[torch.Tensor], gender: Optional[torch.Tensor],
                subject_emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Full user tower: (B, L) history + context + demographics -> (B, D)."""
        state = self.encode_user_state(item_ids, event_ts)  # (B, state_dim)
        return self.query_from_state(state, ctx_ids, ctx_weights, age, country, gender, subject_emb)

    # ---------------------------------------------------------------- item tower
    @torch.no_grad()
    def warm_start_item_embeddings(self, item_ids: torch.Tensor, vectors: torch.Tensor) -> None:
        """item_ids (N,) raw ids, vectors (N, D) -> each item's summed id embedding becomes its
        vector (every hash row gets vector / n_hashes). All-zero vectors (items without data) keep
        their random rows. See models/warm_start.py for why."""
        if vectors.shape != (item_ids.shape[0], self.config.dim):
            raise ValueError(f"vectors must be ({item_ids.shape[0]}, {self.config.dim}), "
                             f"got {tuple(vectors.shape)}")
        has_vector = vectors.abs().sum(dim=1) > 0  # (N,)
        rows = self.item_emb.bucket_ids(item_ids[has_vector])  # (N', H)
        share = vectors[has_vector] / self.item_emb.n_hashes  # (N', D)
        for h in range(rows.shape[1]):
            self.item_emb.table.weight[rows[:, h]] = share.to(self.item_emb.table.weight.dtype)

    def item_embeddings(self, item_ids: torch.Tensor, cat_ids: torch.Tensor,
                        cat_weights: torch.Tensor, id_gate: Optional[torch.Tensor] = None) -> torch.Tensor:
        """item_ids (N,), cat_ids LongTensor (N, C) (-1 pad), cat_weights (N, C), id_gate (N,) in
        [0, 1] or None (= 1) -> (N, D) unit norm. Categories are ignored with
        ``use_item_categories=False``.

        ``id_gate`` scales each item's id embedding: an item the training data never showed has
        an id vector that is either its random initial rows or, through hash collisions, other
        items' rows; gating it towards 0 lets such an item be represented by its categories
        alone (see ``id_gate`` in models/system.py).
        """
        ids = self.item_emb(item_ids)  # (N, D)
        if self.config.use_item_categories:
            cat = weighted_pool(self.category_emb(cat_ids), self._pool_weights(cat_ids, cat_weights))  # (N, D)
        else:  # a zero category vector: the tower's MLP sees the id alone
            cat = torch.zeros_like(ids)  # (N, D)
        if id_gate is not None:
            ids = ids * id_gate.to(ids.dtype).unsqueeze(-1)  # (N, D)
        item = self.item_tower(ids, cat)  # (N, D) unit norm
        if self.item_skip is None:
            return item
        return F.normalize(item + self.item_skip * (cat + ids), dim=-1)  # (N, D)

    def _pool_weights(self, cat_ids: torch.Tensor, cat_weights: torch.Tensor) -> torch.Tensor:
        """(N, C) weights of an item's categories under ``item_category_pool``."""
        if self.config.item_category_pool == "weighted":
            return cat_weights
        present = (cat_ids >= 0).to(cat_weights.dtype)  # (N, C)
        return present / present.sum(dim=1, keepdim=True).clamp(min=1.0)  # (N, C)

    @staticmethod
    def _batch_size(state: Optional[torch.Tensor], ctx_ids: Optional[torch.Tensor],
                    age: Optional[torch.Tensor]) -> int:
        for t in (state, ctx_ids, age):
            if t is not None:
                return int(t.shape[0])
        raise ValueError("cannot infer the batch size: state, ctx_ids and age are all None")
