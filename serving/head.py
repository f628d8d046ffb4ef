"""The online half of the user tower (context layer + demographics + fusion MLP) in plain numpy.

Why: per request the head is a few thousand multiply-adds on one row, yet through torch it costs
~0.5 ms (autograd bookkeeping, dispatcher, a dozen small-tensor allocations), about as much as the
Feast read. ``NumpyHead`` copies the bundle's weights into float32 numpy arrays once at load and
evaluates exactly ``ContextualTwoTower.query_from_state`` in eval mode (dropout off, no
whole-context drop) for every configuration the model supports: concat or cross-attention fusion,
state_len >= 1, context / demographics / subject item / tower skip on or off. Parity with the
torch function is a tested property (tests/serving/test_serving_head.py), not an assumption.

Everything the model learned is read from its modules, never re-derived: hash coefficients and
offsets of the category table are the saved buffers, so the numpy head hashes ids exactly as
training did.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy.special import erf

from models.two_tower import ContextualTwoTower

_PRIME = 2_147_483_647  # models.components.embeddings._PRIME (the hash's modulus)
_LOW_MASK = (1 << 31) - 1
_NORM_EPS = 1e-12  # torch.nn.functional.normalize's default eps


def _np(t) -> np.ndarray:
    """A parameter/buffer as a contiguous numpy copy (float32 for floats, int64 for ints)."""
    arr = t.detach().cpu().numpy()
    return np.ascontiguousarray(arr.astype(np.float32 if arr.dtype.kind == "f" else np.int64))


def _gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, as torch.nn.GELU() with approximate='none'."""
    return 0.5 * x * (1.0 + erf(x * np.float32(1.0 / math.sqrt(2.0))))


def _normalize(x: np.ndarray) -> np.ndarray:
    """(B, D) -> rows of unit L2 norm (torch.nn.functional.normalize, eps 1e-12)."""
    norm = np.sqrt(np.einsum("bd,bd->b", x, x))[:, None]  # (B, 1)
    return x / np.maximum(norm, np.float32(_NORM_EPS))


def _batch_size(*arrays: Optional[np.ndarray]) -> int:
    for t in arrays:
        if t is not None:
            return int(np.shape(t)[0])
    raise ValueError("cannot infer the batch size: state, ctx_ids and age are all None")


@dataclass(frozen=True)
class _Mlp:
    """Linear -> GELU -> Linear (dropout is the identity at serving)."""

    w1: np.ndarray  # (H, in)
    b1: np.ndarray  # (H,)
    w2: np.ndarray  # (D, H)
    b2: np.ndarray  # (D,)

    @classmethod
    def of(cls, seq) -> "_Mlp":
        first, last = seq[0], seq[-1]
        return cls(_np(first.weight), _np(first.bias), _np(last.weight), _np(last.bias))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x (B, in) -> (B, D)."""
        return _gelu(x @ self.w1.T + self.b1) @ self.w2.T + self.b2


@dataclass(frozen=True)
class _HashTable:
    """A MultiHashEmbedding's table and hash functions: ids (B, C) -> summed rows (B, C, D)."""

    table: np.ndarray  # (buckets * H, D)
    coeffs: np.ndarray  # (3, H) a, b, c per hash function
    offsets: np.ndarray  # (H,)
    num_buckets: int

    @classmethod
    def of(cls, emb) -> "_HashTable":
        return cls(_np(emb.table.weight), _np(emb.hash_coeffs), _np(emb.offsets), int(emb.num_buckets))

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        x = np.maximum(ids, 0)[..., None]  # (B, C, 1)
        lo, hi = x & _LOW_MASK, x >> 31
        a, b, c = self.coeffs  # (H,) each
        h = ((a * lo) % _PRIME + (b * hi) % _PRIME + c) % _PRIME  # (B, C, H)
        rows = h % self.num_buckets + self.offsets  # (B, C, H)
        emb = self.table[rows].sum(axis=-2)  # (B, C, D)
        return emb * (ids >= 0)[..., None].astype(np.float32)  # pad -> 0


@dataclass(frozen=True)
class _CrossAttention:
    """CrossAttentionFusion's context-as-query attention over the m cached states."""

    query_bias: np.ndarray  # (D,)
    query_w: np.ndarray  # (D, D)
    query_b: np.ndarray  # (D,)
    in_w: np.ndarray  # (3D, D) q, k, v projections stacked (nn.MultiheadAttention.in_proj_weight)
    in_b: np.ndarray  # (3D,)
    out_w: np.ndarray  # (D, D)
    out_b: np.ndarray  # (D,)
    n_heads: int

    @classmethod
    def of(cls, fusion) -> "_CrossAttention":
        attn = fusion.attn
        return cls(_np(fusion.query_bias), _np(fusion.query_proj.weight), _np(fusion.query_proj.bias),
                   _np(attn.in_proj_weight), _np(attn.in_proj_bias), _np(attn.out_proj.weight),
                   _np(attn.out_proj.bias), int(attn.num_heads))

    def __call__(self, query: np.ndarray, states: np.ndarray) -> np.ndarray:
        """query (B, D) (bias + context + demographics), states (B, m, D) -> attended (B, D)."""
        bsz, m, d = states.shape
        hd = d // self.n_heads
        q = query @ self.query_w.T + self.query_b  # (B, D) query_proj
        wq, wk, wv = np.split(self.in_w, 3)  # (D, D) each
        bq, bk, bv = np.split(self.in_b, 3)  # (D,) each
        q = (q @ wq.T + bq).reshape(bsz, self.n_heads, 1, hd)  # (B, h, 1, hd)
        k = (states @ wk.T + bk).reshape(bsz, m, self.n_heads, hd).transpose(0, 2, 1, 3)  # (B, h, m, hd)
        v = (states @ wv.T + bv).reshape(bsz, m, self.n_heads, hd).transpose(0, 2, 1, 3)  # (B, h, m, hd)
        scores = q @ k.transpose(0, 1, 3, 2) / np.float32(math.sqrt(hd))  # (B, h, 1, m)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        attn = scores / scores.sum(axis=-1, keepdims=True)  # (B, h, 1, m)
        out = (attn @ v).transpose(0, 2, 1, 3).reshape(bsz, d)  # (B, D)
        return out @ self.out_w.T + self.out_b  # (B, D)


class NumpyHead:
    """``query_from_state`` of one model in numpy: built once per bundle, read-only afterwards."""

    def __init__(self, model: ContextualTwoTower) -> None:
        cfg = model.config
        self.dim = cfg.dim
        self.state_len = cfg.state_len
        self.state_dim = cfg.state_dim
        self.no_history_state = _np(model.no_history_state)  # (state_dim,)
        self.categories = _HashTable.of(model.category_emb) if model.context is not None else None
        self.context_w = _np(model.context.proj.weight) if model.context is not None else None  # (D, D)
        self.subject_w = _np(model.subject_proj.weight) if model.subject_proj is not None else None
        self.user_skip = (np.float32(model.user_skip.detach().item())
                          if model.user_skip is not None else None)
        demo = model.demographics
        self.demo_tables = ((_np(demo.age.weight), _np(demo.country.weight), _np(demo.gender.weight))
                            if demo is not None else None)
        self.identity = cfg.fusion == "identity"
        self.mlp = None if self.identity else _Mlp.of(model.fusion.mlp)
        self.cross = _CrossAttention.of(model.fusion) if cfg.fusion == "cross_attention" else None
        self.residual = cfg.fusion_residual

    def query(self, state: Optional[np.ndarray], ctx_ids: Optional[np.ndarray],
              ctx_weights: Optional[np.ndarray], age: Optional[np.ndarray],
              country: Optional[np.ndarray], gender: Optional[np.ndarray],
              subject_emb: Optional[np.ndarray] = None) -> np.ndarray:
        """The same contract as ``query_from_state`` with numpy arrays: state (B, state_dim) or
        None (cold start), ctx_ids int (B, C) (-1 pad), ctx_weights (B, C), age/country/gender
        int (B,), subject_emb (B, D) or None -> (B, D) unit-norm float32."""
        batch = _batch_size(state, ctx_ids, age)
        if state is None:
            state = np.broadcast_to(self.no_history_state, (batch, self.state_dim))
        state = np.asarray(state, dtype=np.float32)
        if state.shape != (batch, self.state_dim):
            raise ValueError(f"state must be ({batch}, {self.state_dim}), got {state.shape}")
        if self.identity:  # no context, no demographics by configuration
            return _normalize(state)  # (B, D)
        ctx, skip = self._context(batch, ctx_ids, ctx_weights, subject_emb)
        demo = self._demographics(age, country, gender)
        if self.cross is None:
            parts = [state] + [t for t in (ctx, demo) if t is not None]
        else:
            states = state.reshape(batch, self.state_len, self.dim)  # (B, m, D)
            q = np.broadcast_to(self.cross.query_bias, (batch, self.dim))  # (B, D)
            for t in (ctx, demo):
                if t is not None:
                    q = q + t
            parts = [self.cross(q, states), states[:, -1]] + [t for t in (ctx, demo) if t is not None]
        out = self.mlp(np.concatenate(parts, axis=-1))  # (B, D)
        if self.residual:
            out = out + state[:, -self.dim:]  # the last state slot
        user = _normalize(out)  # (B, D)
        if skip is None:
            return user
        return _normalize(user + skip)  # (B, D)

    def _context(self, batch: int, ctx_ids: Optional[np.ndarray], ctx_weights: Optional[np.ndarray],
                 subject_emb: Optional[np.ndarray]):
        """-> context vector (B, D) or None, skip-path vector (B, D) or None."""
        if self.categories is None:
            return None, None
        if ctx_ids is None or ctx_weights is None:
            raise ValueError("this model uses context: pass ctx_ids/ctx_weights (all -1/0 = none)")
        emb = self.categories(np.asarray(ctx_ids, dtype=np.int64))  # (B, C, D)
        pooled = np.einsum("bcd,bc->bd", emb, np.asarray(ctx_weights, dtype=np.float32))  # (B, D)
        raw = pooled
        if self.subject_w is not None and subject_emb is not None:
            subject_emb = np.asarray(subject_emb, dtype=np.float32)  # (B, D)
            pooled = pooled + subject_emb @ self.subject_w.T
            raw = raw + subject_emb
        ctx = pooled @ self.context_w.T  # (B, D)
        skip = self.user_skip * raw if self.user_skip is not None else None
        return ctx, skip

    def _demographics(self, age: Optional[np.ndarray], country: Optional[np.ndarray],
                      gender: Optional[np.ndarray]) -> Optional[np.ndarray]:
        if self.demo_tables is None:
            return None
        if age is None or country is None or gender is None:
            raise ValueError("this model uses demographics: pass age/country/gender (0 = unknown)")
        t_age, t_country, t_gender = self.demo_tables
        return t_age[np.asarray(age)] + t_country[np.asarray(country)] + t_gender[np.asarray(gender)]
