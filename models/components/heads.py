"""Fusion heads (the online half of the user tower) and the item tower.

Both towers end in an L2 normalisation so that retrieval is cosine similarity: the ScaNN index
(dot product) and the full-corpus metrics then rank exactly like the training softmax, whose
temperature alone sets the sharpness.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn


def mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    """Two-layer MLP: Linear -> GELU -> Dropout -> Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, out_dim))


def residual_normalize(out: torch.Tensor, states: torch.Tensor, residual: bool) -> torch.Tensor:
    """The fusion MLP's output (B, D) (+ the last state of states (B, m, D) when ``residual``)
    -> (B, D) unit norm.

    Why the residual: a fusion MLP that must rebuild the sequence state from scratch costs
    next-item quality (the measurements are in configs/movielens_side_info.yaml); with the
    residual the MLP only corrects it."""
    if residual:
        out = out + states[:, -1]  # (B, D)
    return F.normalize(out, dim=-1)  # (B, D)


class ConcatFusion(nn.Module):
    """concat(sequence state, context, demographics) -> MLP -> L2-normalised user embedding.

    The Pinterest design (seed 000): the context layer's output is concatenated with the
    encoder's output and the final MLP derives the user embedding.
    """

    def __init__(self, dim: int, state_len: int, use_context: bool, use_demographics: bool,
                 hidden: int, dropout: float, residual: bool = False) -> None:
        super().__init__()
        in_dim = state_len * dim + dim * int(use_context) + dim * int(use_demographics)
        self.mlp = mlp(in_dim, hidden, dim, dropout)
        self.residual = residual

    def forward(self, states: torch.Tensor, ctx: Optional[torch.Tensor],
                demo: Optional[torch.Tensor]) -> torch.Tensor:
        """states (B, m, D), ctx (B, D) or None, demo (B, D) or None -> (B, D) unit norm."""
        parts: List[torch.Tensor] = [states.flatten(1)]  # (B, m*D)
        parts += [t for t in (ctx, demo) if t is not None]
        return residual_normalize(self.mlp(torch.cat(parts, dim=-1)), states, self.residual)  # (B, D)


class CrossAttentionFusion(nn.Module):
    """Context as the query over the last m cached encoder states, then the concat MLP.

    The "advanced fusion" of seed 002 section 6: the context decides which recent events of the
    history matter (a user viewing a sofa should attend to past furniture conversions). The
    encoder still runs offline; only this attention over the m cached states runs online.
    """

    def __init__(self, dim: int, n_heads: int, state_len: int, use_context: bool,
                 use_demographics: bool, hidden: int, dropout: float, residual: bool = False) -> None:
        super().__init__()
        self.query_bias = nn.Parameter(torch.zeros(dim))  # query when there is no context at all
        self.query_proj = nn.Linear(dim, dim)
        self.attn = nn.MultiheadAttention(dim, n_heads, dropout=dropout, batch_first=True)
        in_dim = 2 * dim + dim * int(use_context) + dim * int(use_demographics)
        self.mlp = mlp(in_dim, hidden, dim, dropout)
        self.residual = residual

    def forward(self, states: torch.Tensor, ctx: Optional[torch.Tensor],
                demo: Optional[torch.Tensor]) -> torch.Tensor:
        """states (B, m, D), ctx (B, D) or None, demo (B, D) or None -> (B, D) unit norm."""
        q = self.query_bias.expand(states.shape[0], -1)  # (B, D)
        for t in (ctx, demo):
            if t is not None:
                q = q + t
        q = self.query_proj(q).unsqueeze(1)  # (B, 1, D)
        attended, _ = self.attn(q, states, states, need_weights=False)  # (B, 1, D)
        parts: List[torch.Tensor] = [attended.squeeze(1), states[:, -1]]  # (B, D) each
        parts += [t for t in (ctx, demo) if t is not None]
        return residual_normalize(self.mlp(torch.cat(parts, dim=-1)), states, self.residual)  # (B, D)


class IdentityFusion(nn.Module):
    """The last encoder state itself, L2-normalised: SASRec's query. No parameters, so nothing
    between the encoder and the dot product (a model without context or demographics)."""

    def forward(self, states: torch.Tensor, ctx: Optional[torch.Tensor],
                demo: Optional[torch.Tensor]) -> torch.Tensor:
        """states (B, 1, D) -> (B, D) unit norm (ctx and demo are None by configuration)."""
        return F.normalize(states.flatten(1), dim=-1)  # (B, D)


class ItemTower(nn.Module):
    """concat(id embedding, pooled category embedding) -> MLP -> L2-normalised item embedding.

    The category half lets a rarely-seen item borrow what its categories learned; the id half
    separates items within a category (e.g. by style).
    """

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.mlp = mlp(2 * dim, hidden, dim, dropout)

    def forward(self, id_emb: torch.Tensor, cat_emb: torch.Tensor) -> torch.Tensor:
        """id_emb (N, D), cat_emb (N, D) -> (N, D) unit norm."""
        return F.normalize(self.mlp(torch.cat([id_emb, cat_emb], dim=-1)), dim=-1)  # (N, D)


class EmbeddingItemTower(nn.Module):
    """id embedding + pooled category embedding, no MLP: the output item vectors are the
    encoder's input vectors (tied, as in SASRec), so every gradient on an item as a target also
    moves it as a history token. ``normalize=False`` keeps their norms, which the dot product
    with the unit-norm query then reads (popular items can grow longer)."""

    def __init__(self, normalize: bool = True) -> None:
        super().__init__()
        self.normalize = normalize

    def forward(self, id_emb: torch.Tensor, cat_emb: torch.Tensor) -> torch.Tensor:
        """id_emb (N, D), cat_emb (N, D) -> (N, D) (unit norm when ``normalize``)."""
        item = id_emb + cat_emb  # (N, D)
        return F.normalize(item, dim=-1) if self.normalize else item
