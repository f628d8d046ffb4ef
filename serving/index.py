"""Item index for retrieval: ScaNN (tree + asymmetric hashing + exact reorder) and the exact oracle.

Why this module looks the way it does:
- The item tower is run ONCE per model version over the whole catalog (the bundle's
  ``item_embeddings.npy``); the index is a derived artifact of that bundle, so its manifest records
  the bundle's ``model_version``, dims, item count and the sha256 of the id array, and loading
  refuses an index that belongs to another bundle (seed 003: "batch embedding for index
  consistency" - a head from model B querying item vectors of model A returns garbage silently).
- Recall is a *measured* property, not a hope: the build tunes ScaNN's search-time knobs
  (leaves to search, pre-reorder candidates) on one half of a query sample until recall@k against
  brute force reaches the target, then reports recall on the *other* half in the manifest.
  Among the settings that reach it (the fewest leaves with the fewest candidates, and a few
  settings with more leaves but fewer candidates), the one with the lowest median one-query
  latency is kept - the way the resolver searches - and the manifest records every candidate
  with its recall and latency, and the chosen one's search p50/p99.
- Large catalogs are split into row-range shards, one ScaNN searcher each, searched in parallel
  threads (ScaNN releases the GIL) and merged by score: one query's latency is then that of the
  largest shard instead of the whole catalog's (at 1M near-random items, 2 shards on 2 cores
  measured 0.71 ms p50 against 1.35 ms searched one after the other). The shard count is fixed at
  build; the threads are chosen where the index is served.
- Brute force (numpy matmul + argpartition) is both the oracle (``exact=True``) and the backend for
  catalogs so small that a tree cannot beat one matmul.
- Positions, not ids, live inside ScaNN. Its optional docid mapping is a pickle
  (``scann_docids.pkl``) that ``scann_ops_pybind.load_searcher`` unpickles whenever the file is
  present, so a file dropped into the folder would run code at server start. We never pass doc
  ids to ScaNN and never call ``load_searcher``: the doc ids are our own ``item_ids.npy`` (row
  ``i`` of the index is ``item_ids[i]``, loaded with ``allow_pickle=False`` and checked equal to
  the bundle's), and the searcher is built from its protobuf + .npy assets directly.
- Nothing is loaded from a folder that holds more than what the build wrote: the manifest lists
  every file with its sha256, and the loader refuses any file it does not list and any pickle
  (by suffix), before reading anything but the manifest.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

import ctt_contracts as C
from ctt_contracts.files import replacing_dir
from models.manifest import sha256_file
from serving.errors import IndexMismatchError

LOG = logging.getLogger(__name__)

BACKEND_SCANN = "scann"
BACKEND_BRUTE_FORCE = "brute_force"
BACKENDS = (BACKEND_SCANN, BACKEND_BRUTE_FORCE)

# Below this many items one (N, D) matmul costs microseconds and is exact; a ScaNN tree would need
# partitions of a handful of points and buys nothing.
BRUTE_FORCE_MAX_ITEMS = 2_000
DEFAULT_K = 100
DEFAULT_TARGET_RECALL = 0.95
DEFAULT_N_QUERIES = 1_000  # half tunes the search knobs, half measures the reported recall
# Tune to a little above the target so the held-out half (a different query sample) still meets it.
TUNE_MARGIN = 0.01
# v2: every file listed by its path relative to the index folder, doc ids in item_ids.npy.
# v3: ScaNN assets per shard, under scann/<shard>/.
MANIFEST_VERSION = 3
# Catalogs of at least this many items per shard are split (choose_scann_params): below it one
# searcher answers in well under a millisecond and a thread hand-off would cost more than it saves.
SHARD_MIN_ITEMS = 250_000
MAX_DEFAULT_SHARDS = 2
SCANN_ASSETS = "scann_assets.pbtxt"  # ScaNN's list of its asset files (text protobuf)
# Formats that execute code when loaded (pickle, and torch / joblib files, which are pickles).
PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".pt", ".pth", ".ckpt")

# Search-time grid, cheapest first. Fractions of the leaves to visit x multiples of k to reorder.
# Fine steps where near-random catalogs land (a fifth to a third of the leaves: one step of the
# grid is a step of the search latency).
_LEAF_FRACTIONS: Tuple[float, ...] = (0.01, 0.02, 0.03, 0.04, 0.05, 0.07, 0.1, 0.12, 0.15, 0.18,
                                      0.21, 0.25, 0.3, 0.37, 0.45, 0.55, 0.7, 1.0)
_REORDER_MULTIPLES: Tuple[int, ...] = (2, 5, 10, 20, 40)
# After the first leaf fraction that reaches the target, this many larger fractions are tried too
# (each with its own smallest sufficient reorder): more leaves can need far fewer candidates.
_EXTRA_FRACTIONS = 2
_LATENCY_QUERIES = 200  # one-query searches timed per candidate setting (each on its own query)


# --------------------------------------------------------------------------------------
# Exact oracle
# --------------------------------------------------------------------------------------
def brute_force_topk(embeddings: np.ndarray, queries: np.ndarray,
                     k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-k by dot product: ``(positions int64 (B, k), scores float32 (B, k))``, best first.

    argpartition keeps it O(N) per query instead of a full O(N log N) sort.
    """
    q = np.atleast_2d(np.asarray(queries, dtype=np.float32))  # (B, D)
    n = embeddings.shape[0]
    k = min(k, n)
    scores = q @ embeddings.T  # (B, N)
    if k < n:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (B, k) unordered
    else:
        part = np.broadcast_to(np.arange(n), (q.shape[0], n)).copy()
    part_scores = np.take_along_axis(scores, part, axis=1)  # (B, k)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    pos = np.take_along_axis(part, order, axis=1).astype(np.int64)
    return pos, np.take_along_axis(part_scores, order, axis=1).astype(np.float32)


def recall_at_k(approx: np.ndarray, exact: np.ndarray, queries: Optional[np.ndarray] = None,
                embeddings: Optional[np.ndarray] = None, tol: float = 1e-5) -> float:
    """Mean fraction of each exact top-k row found in the approximate row (both (B, k)).

    With ``queries`` (B, D) and ``embeddings`` (N, D), ties count: a returned item is a hit when
    its exact score reaches the row's k-th exact score (within ``tol``). Items represented by
    their categories alone (never converted in training) share one vector per category set, so
    dozens can tie at the k-th score; which of them the exact top-k lists is arbitrary, and an
    index returning another of them has lost nothing.
    """
    if approx.shape[0] != exact.shape[0]:
        raise ValueError(f"row count differs: {approx.shape[0]} vs {exact.shape[0]}")
    k = exact.shape[1]
    if queries is None or embeddings is None:
        hits = [len(np.intersect1d(a[a >= 0], e, assume_unique=False)) for a, e in zip(approx, exact)]
        return float(np.mean(hits) / k)
    kth = np.einsum("bd,bd->b", queries, embeddings[exact[:, -1]])  # (B,) k-th exact score
    found = np.einsum("bd,bkd->bk", queries, embeddings[np.clip(approx, 0, None)])  # (B, k')
    hit = (approx >= 0) & (found >= kth[:, None] - tol)  # (B, k')
    return float(np.mean(np.minimum(hit.sum(axis=1), k)) / k)


def sample_queries(embeddings: np.ndarray, n: int, seed: int = 0,
                   noise: float = 1.0) -> np.ndarray:
    """Model-free recall queries: random catalog vectors plus isotropic noise, L2-normalised.

    With ``noise`` = 1.0 the query's cosine to its seed item is about 0.7 - similar to what a
    trained user tower produces for its best item, and harder than querying with the items
    themselves (which would trivially find the seed and its cluster). Callers with a model pass
    real user-tower queries to :func:`build_index` instead or in addition.
    """
    rng = np.random.default_rng(seed)
    base = embeddings[rng.integers(0, embeddings.shape[0], n)].astype(np.float32)  # (n, D)
    g = rng.standard_normal(base.shape).astype(np.float32)
    g *= noise / np.linalg.norm(g, axis=1, keepdims=True)
    q = base + g
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask; a container's CPU quota is not visible)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # platforms without sched_getaffinity
        return os.cpu_count() or 1


def shard_bounds(n_items: int, shards: int) -> np.ndarray:
    """Row ranges of the shards: (shards + 1,) int64, shard i holds rows [b[i], b[i + 1])."""
    if not 1 <= shards <= n_items:
        raise ValueError(f"shards must be in [1, {n_items}], got {shards}")
    return np.array([i * n_items // shards for i in range(shards + 1)], dtype=np.int64)


def shard_dir(shard: int) -> str:
    """Folder of one shard's ScaNN assets, relative to the index folder."""
    return f"{C.INDEX_DIR}/{shard}"


def merge_topk(positions: Sequence[np.ndarray], scores: Sequence[np.ndarray],
               k: int) -> Tuple[np.ndarray, np.ndarray]:
    """The best `k` of several shards' answers: rows (B, k_i) each, positions already global.
    -> (positions int64 (B, <=k), scores float32 (B, <=k)), best first."""
    pos = np.concatenate(positions, axis=1)  # (B, sum k_i)
    sc = np.concatenate(scores, axis=1)  # (B, sum k_i)
    order = np.argsort(-sc, axis=1, kind="stable")[:, :k]  # (B, k)
    return np.take_along_axis(pos, order, axis=1), np.take_along_axis(sc, order, axis=1)


def sha256_array(arr: np.ndarray) -> str:
    """Content hash of an array's bytes (C order, with dtype and shape) - the id-array fingerprint."""
    a = np.ascontiguousarray(arr)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# Parameters and manifest
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScannParams:
    """ScaNN build parameters (fixed at build) + search parameters (tuned at build, used at search)."""

    num_leaves: int
    training_sample_size: int
    dims_per_block: int
    anisotropic_quantization_threshold: float
    soar_lambda: Optional[float]
    num_neighbors: int
    leaves_to_search: int  # per shard
    pre_reorder_num_neighbors: int  # per shard
    shards: int = 1  # row-range shards, one searcher each (num_leaves is per shard)

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, object]) -> "ScannParams":
        return cls(**d)  # type: ignore[arg-type]


def default_shards(n_items: int) -> int:
    """One shard per SHARD_MIN_ITEMS items, at most MAX_DEFAULT_SHARDS: a query fans out to one
    thread per shard, and more shards than a serving box has cores only add hand-offs."""
    return int(max(1, min(MAX_DEFAULT_SHARDS, n_items // SHARD_MIN_ITEMS)))


def choose_scann_params(n_items: int, dim: int, k: int = DEFAULT_K,
                        shards: Optional[int] = None) -> ScannParams:
    """Size-dependent starting point (ScaNN's guidance: ~sqrt(N) leaves, AH with 2 dims/block).

    - shards: :func:`default_shards` unless given; every other figure is per shard (N = the
      shard's item count);
    - num_leaves ~ 2 sqrt(N): partitions of ~sqrt(N)/2 points keep per-leaf scoring cheap;
    - SOAR spilling (each point also stored in a second, orthogonal-residual leaf) raises recall at
      a given number of visited leaves for dot-product search;
    - AH 2 dims/block with LUT16 is ScaNN's default speed/accuracy point for dims <= 256;
    - the search knobs start at 10% of the leaves and 10k reorder candidates and are then tuned.
    """
    if n_items < 2:
        raise ValueError("ScaNN needs at least 2 items")
    shards = default_shards(n_items) if shards is None else int(shards)
    if not 1 <= shards <= n_items // 2:
        raise ValueError(f"shards must be in [1, {n_items // 2}] (2 items per shard at least), "
                         f"got {shards}")
    n_items = n_items // shards  # the smallest shard
    num_leaves = int(min(max(8, round(2 * math.sqrt(n_items))), max(8, n_items // 20)))
    return ScannParams(
        shards=shards,
        num_leaves=num_leaves,
        training_sample_size=int(min(n_items, 250_000)),
        dims_per_block=2 if dim % 2 == 0 else 1,
        anisotropic_quantization_threshold=0.2,
        soar_lambda=1.5,
        num_neighbors=int(min(k, n_items)),
        leaves_to_search=max(1, num_leaves // 10),
        pre_reorder_num_neighbors=int(min(n_items, 10 * k)),
    )


@dataclass
class IndexManifest:
    """What `index_manifest.json` records; loading checks the first four against the bundle."""

    model_version: str
    n_items: int
    dim: int
    item_ids_sha256: str
    backend: str
    scann: Optional[Dict[str, object]]
    build_seconds: float
    recall_k: int
    recall_at_k: float  # measured on held-out queries, vs brute force
    recall_tune_at_k: Optional[float]  # on the tuning half (ScaNN only)
    n_recall_queries: int
    query_source: str
    created_at: str
    scann_version: str
    files_sha256: Dict[str, str] = field(default_factory=dict)  # path relative to the folder
    manifest_version: int = MANIFEST_VERSION
    # ScaNN only: one-query search latency of the chosen setting at build (ms: p50, p99, mean)
    # and every setting that reached the tuning target ({leaves, reorder, recall, p50/p99/mean}).
    search_ms: Optional[Dict[str, float]] = None
    tuning_candidates: Optional[List[Dict[str, float]]] = None
    search_threads: Optional[int] = None  # threads the latencies above were measured with

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "IndexManifest":
        return cls(**json.loads(text))


# --------------------------------------------------------------------------------------
# The index
# --------------------------------------------------------------------------------------
class ItemIndex:
    """Top-k retrieval over the catalog: ScaNN when built, brute force otherwise or on request.

    A sharded index searches its shards in `search_threads` threads (the calling one included);
    the pool is made on first use in each process, so a server that forks workers after loading
    gives each worker threads of its own.
    """

    def __init__(self, item_ids: np.ndarray, embeddings: np.ndarray, manifest: IndexManifest,
                 searchers: Sequence[object] = (), search_threads: Optional[int] = None) -> None:
        self.item_ids = np.asarray(item_ids, dtype=np.int64)  # (N,)
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)  # (N, D)
        self.manifest = manifest
        self.searchers = list(searchers)  # scann ScannSearcher per shard; empty: brute force
        self.params = ScannParams.from_dict(manifest.scann) if manifest.scann else None
        self.bounds = shard_bounds(self.size, len(self.searchers)) if self.searchers else None
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pool_pid = -1
        self.search_threads = 1
        self.use_threads(search_threads)

    @property
    def size(self) -> int:
        return int(self.item_ids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def backend(self) -> str:
        return BACKEND_SCANN if self.searchers else BACKEND_BRUTE_FORCE

    def use_threads(self, threads: Optional[int]) -> None:
        """Search threads per query: None = one per shard, up to the cores this process may use."""
        n_shards = max(1, len(self.searchers))
        if threads is None:
            threads = min(n_shards, usable_cores())
        if threads < 1:
            raise ValueError(f"search threads must be >= 1, got {threads}")
        self.close()
        self.search_threads = int(min(threads, n_shards))

    def close(self) -> None:
        """Stop this process's search threads (they are made again on the next search)."""
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.shutdown(wait=False)
        self._pool = None

    def search_positions(self, query: np.ndarray, k: int,
                         exact: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """One query (D,) -> (positions int64 (k,), scores float32 (k,)), best first."""
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(-1)  # (D,)
        if q.shape[0] != self.dim:
            raise ValueError(f"query has {q.shape[0]} dims, index has {self.dim}")
        k = int(min(k, self.size))
        if exact or not self.searchers:
            pos, scores = brute_force_topk(self.embeddings, q[None, :], k)
            return pos[0], scores[0]
        p = self.params
        return self.search_with(q, k, p.leaves_to_search, p.pre_reorder_num_neighbors)

    def search_with(self, query: np.ndarray, k: int, leaves: int,
                    reorder: int) -> Tuple[np.ndarray, np.ndarray]:
        """One query (D,) float32 through ScaNN with these search knobs (per shard), shards in
        parallel -> (positions int64 (<=k,), scores float32 (<=k,)), best first."""
        def shard(i: int) -> Tuple[np.ndarray, np.ndarray]:
            pos, scores = self.searchers[i].search(
                query, final_num_neighbors=k, pre_reorder_num_neighbors=max(k, reorder),
                leaves_to_search=leaves)
            return np.asarray(pos, dtype=np.int64) + self.bounds[i], np.asarray(scores, np.float32)

        if len(self.searchers) == 1:
            return shard(0)
        pool = self._executor()
        if pool is None:
            parts = [shard(i) for i in range(len(self.searchers))]
        else:
            # Shards dealt to the threads round-robin; the calling thread takes the first group.
            groups = [range(t, len(self.searchers), self.search_threads)
                      for t in range(self.search_threads)]
            futures = [pool.submit(lambda g: [shard(i) for i in g], g) for g in groups[1:]]
            parts = [shard(i) for i in groups[0]] + [p for f in futures for p in f.result()]
        pos, scores = merge_topk([p[None, :] for p, _ in parts], [s[None, :] for _, s in parts], k)
        return pos[0], scores[0]

    def search(self, query: np.ndarray, k: int,
               exact: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """One query (D,) -> (item ids int64 (k,), scores float32 (k,)), best first."""
        pos, scores = self.search_positions(query, k, exact=exact)
        return self.item_ids[pos], scores

    def search_batch_positions(self, queries: np.ndarray, k: int, exact: bool = False,
                               leaves_to_search: Optional[int] = None,
                               pre_reorder: Optional[int] = None) -> np.ndarray:
        """Many queries (B, D) -> positions (B, k); used for tuning and recall measurement."""
        q = np.ascontiguousarray(queries, dtype=np.float32)  # (B, D)
        k = int(min(k, self.size))
        if exact or not self.searchers:
            return brute_force_topk(self.embeddings, q, k)[0]
        p = self.params
        positions, scores = [], []
        for start, searcher in zip(self.bounds, self.searchers):
            pos, sc = searcher.search_batched(
                q, final_num_neighbors=k,
                pre_reorder_num_neighbors=max(k, pre_reorder or p.pre_reorder_num_neighbors),
                leaves_to_search=leaves_to_search or p.leaves_to_search)
            sc = np.asarray(sc, dtype=np.float32)  # (B, k)
            # ScaNN pads a row that found fewer than k with position 0 and score NaN: a miss.
            pos = np.where(np.isnan(sc), -1, np.asarray(pos, dtype=np.int64) + start)
            positions.append(pos)  # (B, k)
            scores.append(np.where(np.isnan(sc), -np.inf, sc))
        if len(self.searchers) == 1:
            return positions[0]
        return merge_topk(positions, scores, k)[0]

    def _executor(self) -> Optional[ThreadPoolExecutor]:
        """This process's pool, made on first use: threads do not survive a fork, so a pool made
        before gunicorn forks its workers would hand the workers' searches to nobody."""
        if self.search_threads < 2:
            return None
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(self.search_threads - 1, thread_name_prefix="search")
            self._pool_pid = os.getpid()
        return self._pool


# --------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------
def _validate_catalog(item_ids: np.ndarray, embeddings: np.ndarray) -> None:
    if item_ids.ndim != 1 or embeddings.ndim != 2:
        raise ValueError(f"want item_ids (N,) and embeddings (N, D); got {item_ids.shape}, "
                         f"{embeddings.shape}")
    if item_ids.shape[0] != embeddings.shape[0]:
        raise ValueError(f"{item_ids.shape[0]} ids but {embeddings.shape[0]} embeddings")
    if item_ids.shape[0] == 0:
        raise ValueError("empty catalog: nothing to index")
    if np.unique(item_ids).shape[0] != item_ids.shape[0]:
        raise ValueError("duplicate item ids in the catalog")
    if not np.isfinite(embeddings).all():
        raise ValueError("item embeddings contain NaN/inf")


def _build_scann(embeddings: np.ndarray, params: ScannParams) -> List[object]:
    """One ScaNN searcher per row-range shard (:func:`shard_bounds`)."""
    import scann

    bounds = shard_bounds(embeddings.shape[0], params.shards)
    searchers = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        builder = scann.scann_ops_pybind.builder(embeddings[lo:hi], params.num_neighbors,
                                                 "dot_product")
        builder = builder.set_n_training_threads(usable_cores())
        builder = builder.tree(
            num_leaves=params.num_leaves, num_leaves_to_search=params.leaves_to_search,
            training_sample_size=min(params.training_sample_size, int(hi - lo)),
            soar_lambda=params.soar_lambda)
        builder = builder.score_ah(
            params.dims_per_block,
            anisotropic_quantization_threshold=params.anisotropic_quantization_threshold)
        builder = builder.reorder(params.pre_reorder_num_neighbors)
        searchers.append(builder.build())
    return searchers


def _time_searches(index: ItemIndex, queries: np.ndarray, k: int,
                   settings: List[Tuple[int, int]]) -> List[Dict[str, float]]:
    """One query at a time, as the resolver searches (shards in the index's threads): per
    setting {p50, p99, mean} ms.

    The settings take turns (a burst of load on a shared machine hits them all alike), and each
    turn searches a query of its own: the queries are dealt round-robin, so no setting is timed
    on a query another setting has just searched. Timed on the same query one after another,
    the later settings found that query's leaves in the CPU caches: at 1M near-random items 360
    leaves timed faster than 300 (0.85 vs 0.88 ms p50, where distinct queries gave 1.11 vs 0.98;
    both on a machine busy with another job),
    and a trained bundle's recorded latency was half what the serving benchmark then measured
    (0.39 vs 0.76 ms p50). Serving searches queries the index has not just seen."""
    n = len(settings)
    rounds = max(1, min(_LATENCY_QUERIES, len(queries) // n))
    samples: List[List[float]] = [[] for _ in settings]
    for r in range(rounds):
        for i, (leaves, reorder) in enumerate(settings):
            q = queries[(r * n + i) % len(queries)]  # (D,) a query repeats only when Q < n
            t0 = time.perf_counter()
            index.search_with(q, k, leaves, reorder)
            samples[i].append((time.perf_counter() - t0) * 1e3)
    out = []
    for s in samples:
        a = np.asarray(s)
        out.append({"p50": round(float(np.percentile(a, 50)), 4),
                    "p99": round(float(np.percentile(a, 99)), 4), "mean": round(float(a.mean()), 4)})
    return out


def _smallest_reorder(index: ItemIndex, queries: np.ndarray, exact_pos: np.ndarray, k: int,
                      leaves: int, target: float) -> Tuple[Optional[int], float]:
    """The fewest pre-reorder candidates on the grid reaching `target` with `leaves` leaves:
    (reorder or None, the recall of the last setting tried)."""
    rec = 0.0
    for mult in _REORDER_MULTIPLES:
        reorder = int(min(index.size, mult * k))
        pos = index.search_batch_positions(queries, k, leaves_to_search=leaves, pre_reorder=reorder)
        rec = recall_at_k(pos, exact_pos, queries, index.embeddings)
        LOG.info("tune leaves=%d reorder=%d recall@%d=%.4f", leaves, reorder, k, rec)
        if rec >= target:
            return reorder, rec
    return None, rec


def tune_search(index: ItemIndex, queries: np.ndarray, exact_pos: np.ndarray, k: int,
                target: float) -> Tuple[ScannParams, float, List[Dict[str, float]]]:
    """The fastest (leaves_to_search, pre_reorder) reaching `target` recall on `queries`.

    Candidates: the smallest leaf fraction of the grid that reaches the target (with its
    smallest sufficient reorder), and the next `_EXTRA_FRACTIONS` fractions (with theirs). Each
    is timed one query at a time; the lowest median latency wins. Returns (params, its recall, all
    candidates with recall and latency). The grid ends at all leaves x 40 k candidates, which is
    near-exact; if even that misses the target the build fails loudly rather than shipping a
    worse index.
    """
    p = index.params
    best_miss: Tuple[float, int] = (-1.0, 0)
    candidates: List[Dict[str, float]] = []
    extra_left: Optional[int] = None
    seen_leaves = set()
    for frac in _LEAF_FRACTIONS:
        leaves = max(1, int(round(frac * p.num_leaves)))
        if leaves in seen_leaves:
            continue
        seen_leaves.add(leaves)
        reorder, rec = _smallest_reorder(index, queries, exact_pos, k, leaves, target)
        if reorder is None:
            best_miss = max(best_miss, (rec, leaves))
        else:
            candidates.append({"leaves_to_search": leaves, "pre_reorder_num_neighbors": reorder,
                               "recall": round(rec, 4)})
            extra_left = _EXTRA_FRACTIONS if extra_left is None else extra_left - 1
        if extra_left == 0:
            break
    if not candidates:
        raise RuntimeError(f"ScaNN could not reach recall@{k} >= {target} (best {best_miss[0]:.4f} "
                           f"at leaves={best_miss[1]} with the most reorder candidates); use "
                           f"--backend brute_force")
    timed = _time_searches(index, queries, k, [(int(c["leaves_to_search"]),
                                                int(c["pre_reorder_num_neighbors"])) for c in candidates])
    for c, t in zip(candidates, timed):
        c.update(t)
    # The median: robust to the stalls a shared machine adds; ties go to fewer leaves.
    chosen = min(candidates, key=lambda c: (c["p50"], c["leaves_to_search"]))
    LOG.info("tuned: %s (of %d settings reaching recall %.3f)", chosen, len(candidates), target)
    tuned = ScannParams(**{**p.to_dict(), "leaves_to_search": int(chosen["leaves_to_search"]),
                           "pre_reorder_num_neighbors": int(chosen["pre_reorder_num_neighbors"])})
    return tuned, float(chosen["recall"]), candidates


def _scann_version() -> str:
    try:
        return metadata.version("scann")
    except metadata.PackageNotFoundError:
        return "not-installed"


def build_index(item_ids: np.ndarray, embeddings: np.ndarray, model_version: str,
                out_dir: Optional[Path | str], *, queries: Optional[np.ndarray] = None,
                query_source: str = "perturbed_catalog", k: int = DEFAULT_K,
                target_recall: float = DEFAULT_TARGET_RECALL, backend: Optional[str] = None,
                params: Optional[ScannParams] = None, n_queries: int = DEFAULT_N_QUERIES,
                seed: int = 0, shards: Optional[int] = None) -> ItemIndex:
    """Build, tune and measure the index of one bundle's catalog; save it under `out_dir`.

    `backend` None = chosen by size (brute force up to BRUTE_FORCE_MAX_ITEMS items); `shards`
    None = :func:`default_shards` (ignored when `params` are given). Raises
    (and writes nothing) when the held-out recall@k misses `target_recall`. `out_dir` None keeps
    the index in memory only (benchmarks).
    """
    item_ids = np.ascontiguousarray(item_ids, dtype=np.int64)  # (N,)
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)  # (N, D)
    _validate_catalog(item_ids, embeddings)
    n, dim = embeddings.shape
    k_eff = int(min(k, n))
    backend = backend or (BACKEND_BRUTE_FORCE if n <= BRUTE_FORCE_MAX_ITEMS else BACKEND_SCANN)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if queries is None:
        queries = sample_queries(embeddings, n_queries, seed=seed)
    queries = np.ascontiguousarray(queries, dtype=np.float32)  # (Q, D)
    if queries.ndim != 2 or queries.shape[1] != dim or queries.shape[0] < 2:
        raise ValueError(f"recall queries must be (Q >= 2, {dim}); got {queries.shape}")
    half = queries.shape[0] // 2
    tune_q, eval_q = queries[:half], queries[half:]  # tune on one half, report the other

    t0 = time.perf_counter()
    manifest = IndexManifest(
        model_version=model_version, n_items=n, dim=dim, item_ids_sha256=sha256_array(item_ids),
        backend=backend, scann=None, build_seconds=0.0, recall_k=k_eff, recall_at_k=float("nan"),
        recall_tune_at_k=None, n_recall_queries=int(eval_q.shape[0]), query_source=query_source,
        created_at=datetime.now(timezone.utc).isoformat(), scann_version=_scann_version())
    if shards is not None and (backend != BACKEND_SCANN or params is not None):
        LOG.warning("shards=%d ignored: %s", shards, "the given params set the shards"
                    if params is not None else f"the {backend} backend has no shards")
    searchers: List[object] = []
    if backend == BACKEND_SCANN:
        p = params or choose_scann_params(n, dim, k_eff, shards)
        searchers = _build_scann(embeddings, p)
        manifest.scann = p.to_dict()
        untuned = ItemIndex(item_ids, embeddings, manifest, searchers)
        tuned, manifest.recall_tune_at_k, manifest.tuning_candidates = tune_search(
            untuned, tune_q, brute_force_topk(embeddings, tune_q, k_eff)[0], k_eff,
            min(1.0, target_recall + TUNE_MARGIN))
        manifest.scann = tuned.to_dict()
        chosen = next(c for c in manifest.tuning_candidates
                      if c["leaves_to_search"] == tuned.leaves_to_search
                      and c["pre_reorder_num_neighbors"] == tuned.pre_reorder_num_neighbors)
        manifest.search_ms = {key: chosen[key] for key in ("p50", "p99", "mean")}
        manifest.search_threads = untuned.search_threads
        untuned.close()
    manifest.build_seconds = round(time.perf_counter() - t0, 3)
    index = ItemIndex(item_ids, embeddings, manifest, searchers)
    manifest.recall_at_k = recall_at_k(index.search_batch_positions(eval_q, k_eff),
                                       brute_force_topk(embeddings, eval_q, k_eff)[0], eval_q,
                                       embeddings)
    LOG.info("index %s: %d items, held-out recall@%d=%.4f, %.1fs", backend, n, k_eff,
             manifest.recall_at_k, manifest.build_seconds)
    if manifest.recall_at_k < target_recall:
        raise RuntimeError(f"held-out recall@{k_eff} {manifest.recall_at_k:.4f} < target "
                           f"{target_recall}; nothing written (pass real --queries, or use "
                           f"--backend brute_force)")
    if out_dir is not None:
        save_index(index, Path(out_dir))
    return index


def save_index(index: ItemIndex, out_dir: Path) -> None:
    """Write ``item_ids.npy``, ``scann/<shard>/`` (ScaNN assets, absent for brute force) and the manifest
    listing every file with its sha256, atomically.

    Written into a sibling temp folder and swapped in, so a rerun replaces the previous index and
    a crash never leaves a half-written one.
    """
    with replacing_dir(out_dir) as tmp:
        np.save(tmp / C.INDEX_ITEM_IDS, index.item_ids, allow_pickle=False)
        for i, searcher in enumerate(index.searchers):
            scann_dir = tmp / shard_dir(i)
            scann_dir.mkdir(parents=True)
            searcher.serialize(str(scann_dir), relative_path=True)
        files = _files_under(tmp) - {C.INDEX_MANIFEST}
        pickles = _pickle_names(files)
        if pickles:  # ScaNN pickles its doc ids only when given some, which we never do
            raise RuntimeError(f"the index build wrote pickle files {pickles}; refusing to save")
        index.manifest.files_sha256 = {name: sha256_file(tmp / name) for name in sorted(files)}
        (tmp / C.INDEX_MANIFEST).write_text(index.manifest.to_json())


# --------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------
def read_manifest(index_dir: Path | str) -> IndexManifest:
    path = Path(index_dir) / C.INDEX_MANIFEST
    if not path.is_file():
        raise IndexMismatchError(f"no {C.INDEX_MANIFEST} in {index_dir}: not an index folder "
                                 f"(build one with ctt-build-index / jobs/build_index.py)")
    try:
        manifest = IndexManifest.from_json(path.read_text())
    except (json.JSONDecodeError, TypeError) as exc:
        raise IndexMismatchError(f"{path} is not a valid index manifest: {exc}") from exc
    if manifest.manifest_version != MANIFEST_VERSION:
        raise IndexMismatchError(
            f"{path}: index format v{manifest.manifest_version}, this server reads "
            f"v{MANIFEST_VERSION}; rebuild it with ctt-build-index --bundle <bundle> --out <index>")
    files = manifest.files_sha256
    if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and _is_plain_relative(k)
            for k, v in files.items()):
        raise IndexMismatchError(f"{path}: files_sha256 must map relative paths inside the "
                                 f"index folder to sha256 digests")
    return manifest


def check_manifest(manifest: IndexManifest, model_version: str, item_ids: np.ndarray,
                   embeddings: np.ndarray) -> None:
    """Refuse an index that was not built from exactly this bundle's catalog."""
    problems: List[str] = []
    if manifest.model_version != model_version:
        problems.append(f"model_version: index {manifest.model_version!r} != bundle {model_version!r}")
    if manifest.dim != embeddings.shape[1]:
        problems.append(f"dims: index {manifest.dim} != bundle {embeddings.shape[1]}")
    if manifest.n_items != item_ids.shape[0]:
        problems.append(f"item count: index {manifest.n_items} != bundle {item_ids.shape[0]}")
    elif manifest.item_ids_sha256 != sha256_array(np.asarray(item_ids, dtype=np.int64)):
        problems.append("item id array sha256 differs from the bundle's")
    if problems:
        raise IndexMismatchError(
            "index does not belong to the loaded bundle (" + "; ".join(problems)
            + "); rebuild it with ctt-build-index --bundle <bundle> --out <index>")


def load_index(index_dir: Path | str, model_version: str, item_ids: np.ndarray,
               embeddings: np.ndarray, verify_files: bool = True,
               search_threads: Optional[int] = None) -> ItemIndex:
    """Load an index for a bundle's catalog; nothing in it is ever unpickled.

    Order: manifest -> folder listing (any pickle, any file the manifest does not list, any
    listed file missing: refused) -> bundle identity -> file hashes (skipped with
    ``verify_files=False``) -> doc ids -> ScaNN assets.
    """
    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir)
    check_listing(index_dir, manifest.files_sha256)
    item_ids = np.asarray(item_ids, dtype=np.int64)
    check_manifest(manifest, model_version, item_ids, embeddings)
    if verify_files:
        _verify_hashes(index_dir, manifest.files_sha256)
    doc_ids = _load_doc_ids(index_dir, manifest.files_sha256, item_ids)
    searchers: List[object] = []
    if manifest.backend == BACKEND_SCANN:
        shards = _manifest_shards(manifest, index_dir)
        bounds = shard_bounds(manifest.n_items, shards)
        for i in range(shards):
            searcher = _load_scann(index_dir, shard_dir(i), manifest.files_sha256)
            if searcher.size() != bounds[i + 1] - bounds[i]:
                raise IndexMismatchError(f"ScaNN shard {i} holds {searcher.size()} points, the "
                                         f"manifest's rows {bounds[i]}..{bounds[i + 1]}")
            searchers.append(searcher)
    elif manifest.backend != BACKEND_BRUTE_FORCE:
        raise IndexMismatchError(f"unknown backend {manifest.backend!r} in {index_dir}")
    return ItemIndex(doc_ids, embeddings, manifest, searchers, search_threads)


def _manifest_shards(manifest: IndexManifest, index_dir: Path) -> int:
    """The shard count a ScaNN manifest records, which must name exactly the shard folders it
    lists (scann/0 .. scann/<shards - 1>)."""
    shards = manifest.scann.get("shards") if isinstance(manifest.scann, dict) else None
    if not isinstance(shards, int) or not 1 <= shards <= manifest.n_items:
        raise IndexMismatchError(f"{index_dir}: the manifest's scann.shards must be an integer in "
                                 f"[1, {manifest.n_items}], got {shards!r}; rebuild the index")
    paths = [PurePosixPath(name).parts for name in manifest.files_sha256]
    listed = {parts[1] for parts in paths if len(parts) > 2 and parts[0] == C.INDEX_DIR}
    expected = {str(i) for i in range(shards)}
    if listed != expected:
        raise IndexMismatchError(f"{index_dir}: the manifest records {shards} shard(s) but lists "
                                 f"the folders {sorted(listed)} under {C.INDEX_DIR}/; rebuild "
                                 f"the index")
    return shards


def check_listing(index_dir: Path, listed: Dict[str, str]) -> None:
    """Refuse a folder holding a pickle, a file the manifest does not list, or missing a listed one.

    A pickle is refused even when the manifest lists it: no file of an index is meant to be
    unpickled, so one that looks like a pickle is an intrusion or a foreign tool's output.
    """
    present = _files_under(index_dir) - {C.INDEX_MANIFEST}
    pickles = _pickle_names(present | set(listed))
    if pickles:
        raise IndexMismatchError(
            f"index folder {index_dir} holds pickle files {pickles}: refused (nothing in an index "
            f"is ever unpickled; loading one would run its code). Remove them or rebuild the index")
    unlisted = sorted(present - set(listed))
    if unlisted:
        raise IndexMismatchError(
            f"index folder {index_dir} holds files its manifest does not list: {unlisted[:10]}; "
            f"refused (only what the build wrote is loaded). Remove them or rebuild the index")
    missing = sorted(set(listed) - present)
    if missing:
        raise IndexMismatchError(f"index files missing in {index_dir}: {', '.join(missing)}")


def _files_under(folder: Path) -> Set[str]:
    """Every non-directory entry below `folder` (symlinks included, not followed), as relative
    POSIX paths."""
    found: Set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=False):
        rel = Path(root).relative_to(folder)
        linked_dirs = [d for d in dirs if os.path.islink(os.path.join(root, d))]
        for name in files + linked_dirs:
            found.add((rel / name).as_posix())
    return found


def _pickle_names(names: Set[str]) -> List[str]:
    return sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES))


def _is_plain_relative(name: str) -> bool:
    path = PurePosixPath(name)
    return not path.is_absolute() and all(part not in ("", ".", "..") for part in path.parts)


def _verify_hashes(folder: Path, expected: Dict[str, str]) -> None:
    for name, digest in sorted(expected.items()):
        if sha256_file(folder / name) != digest:
            raise IndexMismatchError(f"index file {folder / name} is corrupt (sha256 differs from "
                                     f"the manifest); rebuild the index")


def _load_doc_ids(index_dir: Path, listed: Dict[str, str], item_ids: np.ndarray) -> np.ndarray:
    """The index's own row -> item id array (never pickled), which must equal the bundle's."""
    if C.INDEX_ITEM_IDS not in listed:
        raise IndexMismatchError(f"{index_dir}: the manifest lists no {C.INDEX_ITEM_IDS}")
    path = index_dir / C.INDEX_ITEM_IDS
    try:
        doc_ids = np.load(path, allow_pickle=False)
    except ValueError as exc:  # numpy's refusal of an object (pickled) array, or a bad header
        raise IndexMismatchError(f"{path} is not a plain int64 array: {exc}") from exc
    if doc_ids.dtype != np.int64 or doc_ids.shape != item_ids.shape \
            or not np.array_equal(doc_ids, item_ids):
        raise IndexMismatchError(f"{path} ({doc_ids.dtype} {doc_ids.shape}) differs from the "
                                 f"bundle's item ids; rebuild the index")
    return doc_ids


def _load_scann(index_dir: Path, shard: str, listed: Dict[str, str]) -> object:
    """A ScaNN searcher from its assets (text protobuf + .npy/.pb files read by ScaNN's C++),
    built the way ``load_searcher`` builds it minus its ``pickle.load`` of scann_docids.pkl.

    Every asset the protobuf names must be a plain file name listed in the manifest, so the
    assets file cannot point the C++ loader outside the folder.
    """
    from google.protobuf import text_format
    from scann.scann_ops import scann_assets_pb2
    from scann.scann_ops.py import scann_ops_pybind

    scann_dir = index_dir / shard
    prefix = shard + "/"
    if prefix + SCANN_ASSETS not in listed:
        raise IndexMismatchError(f"manifest says scann but lists no {prefix}{SCANN_ASSETS}")
    text = (scann_dir / SCANN_ASSETS).read_text()
    try:
        assets = text_format.Parse(text, scann_assets_pb2.ScannAssets())
    except text_format.ParseError as exc:
        raise IndexMismatchError(f"{scann_dir / SCANN_ASSETS} does not parse: {exc}") from exc
    for asset in assets.assets:
        name = asset.asset_path
        if PurePosixPath(name).name != name or prefix + name not in listed:
            raise IndexMismatchError(f"{scann_dir / SCANN_ASSETS} names asset {name!r}, which is "
                                     f"not a file of this index listed in the manifest")
    try:
        native = scann_ops_pybind.scann_pybind.ScannNumpy(str(scann_dir), text)
    except RuntimeError as exc:
        raise IndexMismatchError(f"ScaNN could not load {scann_dir}: {exc}") from exc
    return scann_ops_pybind.ScannSearcher(native)  # no doc ids: rows are positions
