"""Context layer (subject-item categories) and demographic embeddings.

Why the heavy dropout: during training the context is PSEUDO context derived from the label
(its top categories), i.e. it leaks the answer's category. Without strong regularisation the
model would ignore the history and fail at serving, where the real context (the item the user
is viewing) is only correlated with the label. Two mechanisms (seed 000, seed 003 "high dropout
on augmented feature layer"):
- elementwise dropout (``context_dropout``, high, e.g. 0.5) on the context vector;
- whole-context dropout: for a ``context_drop_prob`` share of the training examples the entire
  context vector is zeroed, which is exactly what "no context" looks like at serving time
  (empty category list -> zero vector). It is NOT rescaled, so a present context has the same
  scale in training and serving.
"""
from __future__ import annotations

import torch
from torch import nn

import ctt_contracts as C


def drop_context_slots(weights: torch.Tensor, p: float) -> torch.Tensor:
    """Training augmentation: weights (B, C) (summing to 1 or all 0) -> (B, C), same contract.

    Each present slot except the strongest one of its row is zeroed with probability ``p``, and
    the row is renormalised to sum 1. The strongest slot is kept so that this never turns into
    "no context" (whole-context dropout does that, at its own rate).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"slot drop probability must be in [0, 1), got {p}")
    present = weights > 0  # (B, C)
    strongest = torch.zeros_like(present).scatter_(1, weights.argmax(dim=1, keepdim=True), True)
    keep = present & ((torch.rand_like(weights) >= p) | strongest)  # (B, C)
    kept = weights * keep.to(weights.dtype)  # (B, C)
    total = kept.sum(dim=1, keepdim=True)  # (B, 1)
    return torch.where(total > 0, kept / total.clamp_min(1e-12), kept)  # (B, C)


def swap_context_slots(ids: torch.Tensor, weights: torch.Tensor,
                       p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Training augmentation: ids LongTensor (B, C) (-1 pad), weights (B, C) -> same shapes.

    Why: pseudo-context is the label's own category list, so its secondary categories pin down
    the label far better than a real subject item's do (a subject item usually shares its main
    category with what the user converts on, not its whole category list). Trained on pseudo-
    context alone, the model learns to match exact category combinations and then misreads the
    subject item's other categories at serving time. Each present slot except the strongest is
    replaced with probability ``p`` by the same slot of another example of the batch (a category
    drawn from the data's own distribution, unrelated to this label); where that example has no
    such slot, the slot is dropped and the row renormalised.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"slot swap probability must be in [0, 1], got {p}")
    present = weights > 0  # (B, C)
    strongest = torch.zeros_like(present).scatter_(1, weights.argmax(dim=1, keepdim=True), True)
    swap = present & ~strongest & (torch.rand_like(weights) < p)  # (B, C)
    donor = torch.randperm(ids.shape[0], device=ids.device)  # (B,)
    donor_ids, donor_present = ids[donor], present[donor]  # (B, C), (B, C)
    new_ids = torch.where(swap & donor_present, donor_ids, ids)  # (B, C)
    kept = weights * (~(swap & ~donor_present)).to(weights.dtype)  # (B, C)
    total = kept.sum(dim=1, keepdim=True)  # (B, 1)
    new_weights = torch.where(total > 0, kept / total.clamp_min(1e-12), kept)  # (B, C)
    return torch.where(new_weights > 0, new_ids, torch.full_like(new_ids, -1)), new_weights


class ContextLayer(nn.Module):
    """pooled context category embedding (B, D) -> context vector (B, D) (zero = no context)."""

    def __init__(self, dim: int, context_dropout: float, context_drop_prob: float) -> None:
        super().__init__()
        if not 0.0 <= context_drop_prob < 1.0:
            raise ValueError(f"context_drop_prob must be in [0, 1), got {context_drop_prob}")
        # No bias: the zero vector (no context) must stay zero after the projection.
        self.proj = nn.Linear(dim, dim, bias=False)
        self.dropout = nn.Dropout(context_dropout)
        self.context_drop_prob = context_drop_prob

    def keep_mask(self, batch: int, device: torch.device) -> torch.Tensor:
        """(B, 1) bool: which examples keep their context (whole-context dropout, training only).
        Drawn once per batch so every path of the context (projection and skip) drops together."""
        if self.training and self.context_drop_prob > 0:
            return torch.rand(batch, 1, device=device) >= self.context_drop_prob  # (B, 1)
        return torch.ones(batch, 1, dtype=torch.bool, device=device)

    def forward(self, pooled: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """pooled (B, D), keep (B, 1) bool from ``keep_mask`` (None: draw one) -> (B, D)."""
        ctx = self.dropout(self.proj(pooled))  # (B, D)
        if keep is None:
            keep = self.keep_mask(ctx.shape[0], ctx.device)
        return ctx * keep.to(ctx.dtype)  # (B, D)


class DemographicsEmbedding(nn.Module):
    """(age, country, gender) indices (B,) each -> summed embedding (B, D); index 0 = unknown."""

    def __init__(self, dim: int, country_buckets: int, dropout: float) -> None:
        super().__init__()
        self.age = nn.Embedding(C.AGE_BUCKETS, dim)
        self.country = nn.Embedding(country_buckets, dim)
        self.gender = nn.Embedding(len(C.GENDERS), dim)
        for table in (self.age, self.country, self.gender):
            nn.init.normal_(table.weight, std=0.02)
        self.dropout = nn.Dropout(dropout)

    def forward(self, age: torch.Tensor, country: torch.Tensor, gender: torch.Tensor) -> torch.Tensor:
        """age, country, gender LongTensor (B,) -> (B, D)."""
        return self.dropout(self.age(age) + self.country(country) + self.gender(gender))  # (B, D)
