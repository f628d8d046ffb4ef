"""Multi-hash id embeddings and confidence-weighted category pooling.

Why multi-hash: item and category vocabularies grow every day; a table with one row per id
would need a vocabulary file shared by training, batch inference and serving and would break on
every new id. Instead each raw int64 id is hashed by ``n_hashes`` independent universal hash
functions, each into its own block of ``num_buckets`` rows, and the rows are summed (Uber's
multi-hash trick, seed 002). Two ids collide only if they collide under every hash.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

_PRIME = 2_147_483_647  # 2^31 - 1; a*x with a, x < 2^31 fits in int64 without overflow
_LOW_MASK = (1 << 31) - 1


class MultiHashEmbedding(nn.Module):
    """Sum of ``n_hashes`` hashed rows per id; id -1 (padding) -> zero vector.

    The hash coefficients are buffers, so they are saved with the weights: a bundle can never
    be served with hash functions other than the ones it was trained with.
    """

    def __init__(self, num_buckets: int, dim: int, n_hashes: int = 2, seed: int = 0,
                 init_std: float | None = None) -> None:
        super().__init__()
        if num_buckets < 2 or n_hashes < 1:
            raise ValueError(f"need num_buckets >= 2 and n_hashes >= 1, got {num_buckets}, {n_hashes}")
        self.num_buckets = num_buckets
        self.n_hashes = n_hashes
        self.table = nn.Embedding(num_buckets * n_hashes, dim)
        # Default: the summed vector has about unit norm.
        std = init_std if init_std is not None else dim ** -0.5 / n_hashes ** 0.5
        nn.init.normal_(self.table.weight, std=std)
        rng = np.random.RandomState(seed)
        coeffs = rng.randint(1, _PRIME, size=(3, n_hashes)).astype(np.int64)  # a, b, c per hash
        self.register_buffer("hash_coeffs", torch.from_numpy(coeffs))  # (3, H)
        self.register_buffer("offsets", torch.arange(n_hashes, dtype=torch.long) * num_buckets)  # (H,)

    def bucket_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...,) int64 >= 0 -> rows (..., H): ((a*lo + b*hi + c) mod p) mod buckets + offset."""
        x = ids.clamp(min=0).unsqueeze(-1)  # (..., 1)
        lo, hi = x & _LOW_MASK, x >> 31  # both < 2^31 for ids < 2^62
        a, b, c = self.hash_coeffs  # (H,) each
        h = ((a * lo) % _PRIME + (b * hi) % _PRIME + c) % _PRIME  # (..., H)
        return h % self.num_buckets + self.offsets  # (..., H)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids LongTensor (...,) with -1 for padding -> (..., D)."""
        rows = self.bucket_ids(ids)  # (..., H)
        emb = self.table(rows).sum(dim=-2)  # (..., D)
        return emb * (ids >= 0).unsqueeze(-1).to(emb.dtype)  # pad -> 0


def weighted_pool(emb: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Confidence-weighted sum of category embeddings.

    emb (..., C, D), weights (..., C) (0 on padding, summing to 1 or all 0) -> (..., D).
    All-zero weights (no categories / no context) give the zero vector.
    """
    return torch.einsum("...cd,...c->...d", emb, weights.to(emb.dtype))
