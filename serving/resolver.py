"""The online resolver: Feast lookup -> version check -> context layer + head -> item index.

This is the online half of the hybrid pattern (seed 003, DESIGN.md section 6). Per request:

1. ONE ``FeatureStore.get_online_features`` call reads the user's cached sequence state
   (``user_sequence_state``: hidden_state, model_version; its event timestamp is the state's age),
   the user's demographics (``user_profile``) and - when a subject item is given - that item's
   categories (``item_categories``). Feast accepts rows that carry several join keys, so
   ``{user_id, item_id}`` in one entity row serves views of both entities in one call.
2. The state's ``model_version`` must equal the loaded head's. A state from another checkpoint
   is refused (``VersionSkewError`` -> HTTP 409) or, with ``skew_policy="cold_start"``, ignored
   and the user served as a cold start *and the response says so*. Never a silent mix.
3. The context layer + fusion MLP (``query_from_state``) turn state + context + demographics into
   the query. By default its numpy twin (``serving.head.NumpyHead``, built from the bundle's
   weights at load, tested for parity) runs it without torch's per-call overhead; a user without
   a state is served with ``state=None`` (the model's learned
   no-history state: context + demographics only) and ``cold_start=True``.
4. The item index (ScaNN, or the exact brute force on request) returns the top-k items.

Hazards are visible in every answer: ``model_version``, ``state_age_seconds`` (refresh
staleness), ``cold_start`` (+ reason), ``context_source`` and per-stage timings.
"""
from __future__ import annotations

import logging
import math
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from models import features
import ctt_contracts as C
from serving.errors import (BadRequestError, OnlineStoreError, StoredFeatureError,
                            UnknownSubjectItemError, VersionSkewError)
from serving.head import NumpyHead
from serving.index import ItemIndex, build_index, load_index
from serving.online_store import OnlineStoreHandle

LOG = logging.getLogger(__name__)

SKEW_REFUSE = "refuse"
SKEW_COLD_START = "cold_start"
SKEW_POLICIES = (SKEW_REFUSE, SKEW_COLD_START)

HEAD_NUMPY = "numpy"  # serving.head.NumpyHead: the same function, ~4x faster per row
HEAD_TORCH = "torch"  # the model's own query_from_state (reference, debugging)
HEAD_BACKENDS = (HEAD_NUMPY, HEAD_TORCH)

CONTEXT_SUBJECT_ITEM = "subject_item"
CONTEXT_EXPLICIT = "explicit"
CONTEXT_NONE = "none"

COLD_START_NO_STATE = "no_state"
COLD_START_VERSION_SKEW = "version_skew"

MAX_K = 1000  # larger answers belong to a batch job, not to a per-request retrieval call
# Category ids are int32 in the lake and in the online store (ctt_contracts.spark_schema, the Feast
# item_categories view): an explicit context id outside that range names no category that exists.
MAX_CATEGORY_ID = 2**31 - 1
DEMOGRAPHIC_KEYS = (C.AGE_BUCKET, C.COUNTRY, C.GENDER)
HEALTH_PROBE_USER_ID = 0  # any id works: the probe measures reachability, not presence

# Feast's `full_feature_names=True` response keys are "<view>__<feature>"; its event timestamps
# come back under "<key>__ts" (feast.online_response.TIMESTAMP_POSTFIX).
_FULL_NAME_SEP = "__"


def _store_errors() -> Tuple[type, ...]:
    """Exceptions that mean "the online store could not be read" (not a bug in the request).

    sqlite3.Error covers a locked/corrupt SQLite file; redis' errors an unreachable or failing
    Redis; OSError/ConnectionError/TimeoutError lower-level socket failures and a missing
    registry file.
    """
    errors: List[type] = [sqlite3.Error, OSError, ConnectionError, TimeoutError]
    try:
        import redis.exceptions as redis_exc

        errors.append(redis_exc.RedisError)
    except ImportError:  # redis client not installed: the SQLite store cannot raise its errors
        pass
    # The registry is part of the store: once its cache expires Feast re-reads registry.db, and a
    # corrupt file raises protobuf's DecodeError, an emptied one FeatureViewNotFoundException
    # (a FeastError). Every Feast error on this path is about the store, never about the request:
    # the feature references are fixed and the entity rows validated before the call.
    from feast.errors import FeastError
    from google.protobuf.message import Error as ProtobufError

    errors += [FeastError, ProtobufError]
    return tuple(errors)


STORE_ERRORS = _store_errors()


def _key(view: str, feat: str) -> str:
    return f"{view}{_FULL_NAME_SEP}{feat}"


USER_FEATURES: Tuple[Tuple[str, str], ...] = (
    (C.FV_USER_SEQUENCE_STATE, C.HIDDEN_STATE),
    (C.FV_USER_SEQUENCE_STATE, C.MODEL_VERSION),
    (C.FV_USER_PROFILE, C.AGE_BUCKET),
    (C.FV_USER_PROFILE, C.COUNTRY),
    (C.FV_USER_PROFILE, C.GENDER),
)
ITEM_FEATURES: Tuple[Tuple[str, str], ...] = (
    (C.FV_ITEM_CATEGORIES, C.CATEGORY_IDS),
    (C.FV_ITEM_CATEGORIES, C.CATEGORY_WEIGHTS),
)
USER_REFS: List[str] = [C.feature_ref(v, f) for v, f in USER_FEATURES]
USER_ITEM_REFS: List[str] = USER_REFS + [C.feature_ref(v, f) for v, f in ITEM_FEATURES]


@dataclass
class Response:
    """One retrieval answer with everything a caller needs to judge it."""

    items: List[Tuple[int, float]]  # (item_id, score), best first
    model_version: str  # version of the head + index that scored the items
    state_model_version: Optional[str]  # version of the cached state read (None: no state)
    state_age_seconds: Optional[float]  # now - state timestamp (None: no state used)
    cold_start: bool
    cold_start_reason: Optional[str]  # "no_state" | "version_skew" | None
    context_source: str  # "subject_item" | "explicit" | "none"
    index_backend: str  # "scann" | "brute_force" (exact)
    timings: Dict[str, float] = field(default_factory=dict)  # ms: feast, head, search, total

    def to_dict(self) -> Dict[str, Any]:
        """A plain dict (fields are flat: a shallow copy; dataclasses.asdict's deep walk over the
        item pairs costs ~0.25 ms per answer)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["items"] = list(self.items)
        out["timings"] = dict(self.timings)
        return out


@dataclass
class _Lookup:
    """The parsed result of the one Feast call of a request."""

    state: Optional[np.ndarray]
    state_version: Optional[str]
    state_ts: Optional[float]  # epoch seconds
    age: Optional[int]
    country: Optional[str]
    gender: Optional[str]
    item_found: bool
    item_category_ids: Optional[List[int]]
    item_category_weights: Optional[List[float]]


class Resolver:
    """Serves `recommend()` from a model bundle, an item index and a Feast feature store."""

    def __init__(self, bundle: Any, index: ItemIndex, feature_store: Any,
                 skew_policy: str = SKEW_REFUSE, check_feature_service: bool = True,
                 head: str = HEAD_NUMPY) -> None:
        if skew_policy not in SKEW_POLICIES:
            raise ValueError(f"skew_policy must be one of {SKEW_POLICIES}, got {skew_policy!r}")
        if head not in HEAD_BACKENDS:
            raise ValueError(f"head must be one of {HEAD_BACKENDS}, got {head!r}")
        if index.manifest.model_version != bundle.model_version:
            raise ValueError(f"index is for {index.manifest.model_version!r}, bundle is "
                             f"{bundle.model_version!r}")
        self.bundle = bundle
        self.model = bundle.model.eval()
        self.config = bundle.config
        self.model_version: str = bundle.model_version
        # the k the training contexts were projected with (the bundle's manifest records it)
        self.context_top_k: int = bundle.context_top_k
        self.index = index
        self.head_backend = head
        self._numpy_head = NumpyHead(self.model) if head == HEAD_NUMPY else None
        self._online = OnlineStoreHandle(feature_store)
        self.skew_policy = skew_policy
        if check_feature_service:
            self._check_feature_service()

    @property
    def store(self) -> Any:
        """The Feast store currently in use (a new object after its SQLite file was replaced)."""
        return self._online.store

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_paths(cls, bundle_dir: Path | str, index_dir: Optional[Path | str],
                   feature_repo_dir: Path | str, skew_policy: str = SKEW_REFUSE,
                   head: str = HEAD_NUMPY) -> "Resolver":
        """Load a bundle folder, its index folder and a Feast repo (after `feast apply`).

        `index_dir` None builds a fresh index in a temporary folder (convenient for notebooks and
        tests; a server should load the one `ctt-build-index` wrote next to the bundle).
        """
        from models.export import load_bundle

        bundle = load_bundle(Path(bundle_dir))
        return cls(bundle, _index_for(bundle, index_dir), _feature_store(feature_repo_dir),
                   skew_policy=skew_policy, head=head)

    @classmethod
    def from_mlflow(cls, run_id: Optional[str] = None, model_name: Optional[str] = None,
                    version: Optional[str] = None, *, index_dir: Optional[Path | str] = None,
                    feature_repo_dir: Path | str, tracking_uri: Optional[str] = None,
                    skew_policy: str = SKEW_REFUSE, head: str = HEAD_NUMPY) -> "Resolver":
        """Load the bundle logged by an MLflow run (or a registered model version)."""
        from models.export import load_bundle_from_mlflow

        bundle = load_bundle_from_mlflow(run_id=run_id, model_name=model_name, version=version,
                                         tracking_uri=tracking_uri)
        return cls(bundle, _index_for(bundle, index_dir), _feature_store(feature_repo_dir),
                   skew_policy=skew_policy, head=head)

    def after_fork(self) -> None:
        """Called in each worker process forked from the one that loaded this resolver: the
        bundle, head and index are shared read-only (copy-on-write pages), the online-store
        connection is the worker's own."""
        self._online.after_fork()

    # ------------------------------------------------------------------ request path
    def recommend(self, user_id: int, subject_item_id: Optional[int] = None,
                  categories: Optional[Sequence[Tuple[int, float]]] = None,
                  demographics: Optional[Mapping[str, Any]] = None, k: int = 100,
                  exact: bool = False) -> Response:
        """Top-k items for a user in a context. Raises ServingError subclasses on visible failures."""
        return self.recommend_with_query(user_id, subject_item_id, categories, demographics, k,
                                         exact)[0]

    def recommend_with_query(self, user_id: int, subject_item_id: Optional[int] = None,
                             categories: Optional[Sequence[Tuple[int, float]]] = None,
                             demographics: Optional[Mapping[str, Any]] = None, k: int = 100,
                             exact: bool = False) -> Tuple[Response, np.ndarray]:
        """`recommend` and the query vector (D,) it searched with (replay scores other items
        with it)."""
        t_start = time.perf_counter()
        user_id = _check_id(user_id, C.USER_ID)
        k = _check_k(k)
        if subject_item_id is not None and categories is not None:
            raise BadRequestError("give either subject_item_id or categories, not both")
        if subject_item_id is not None:
            subject_item_id = _check_id(subject_item_id, C.SUBJECT_ITEM_ID)
        overrides = _check_demographics(demographics)

        t0 = time.perf_counter()
        look = self._lookup(user_id, subject_item_id)
        t1 = time.perf_counter()

        query, state, cold_reason, context_source = self.head_stage(look, subject_item_id,
                                                                    categories, overrides)
        t2 = time.perf_counter()

        ids, scores = self.index.search(query, k, exact=exact)
        t3 = time.perf_counter()

        age_s = None
        if state is not None and look.state_ts is not None:
            age_s = max(0.0, time.time() - look.state_ts)
        return Response(
            items=list(zip(ids.tolist(), scores.tolist())),  # python ints and floats
            model_version=self.model_version, state_model_version=look.state_version,
            state_age_seconds=age_s, cold_start=state is None, cold_start_reason=cold_reason,
            context_source=context_source,
            index_backend="brute_force" if exact else self.index.backend,
            timings={"feast": _ms(t0, t1), "head": _ms(t1, t2), "search": _ms(t2, t3),
                     "total": _ms(t_start, t3)}), query

    def head_stage(self, look: _Lookup, subject_item_id: Optional[int],
                   categories: Optional[Sequence[Tuple[int, float]]],
                   overrides: Dict[str, Any]) -> Tuple[np.ndarray, Optional[np.ndarray],
                                                       Optional[str], str]:
        """Everything between the Feast read and the search (the "head" timing): context,
        demographics, state/skew check, query. -> (query (D,), state used or None, cold-start
        reason or None, context source)."""
        ctx_ids, ctx_w, context_source = self._context(subject_item_id, categories, look)
        demo = self._demographics(look, overrides)
        state, cold_reason = self._state(look)
        query = self._query(state, ctx_ids, ctx_w, demo, subject_item_id)  # (D,)
        return query, state, cold_reason, context_source

    def query_embedding(self, user_id: int, subject_item_id: Optional[int] = None,
                        categories: Optional[Sequence[Tuple[int, float]]] = None,
                        demographics: Optional[Mapping[str, Any]] = None) -> np.ndarray:
        """The query vector `recommend` would search with (D,); for parity checks and debugging."""
        user_id = _check_id(user_id, C.USER_ID)
        look = self._lookup(user_id, subject_item_id)
        ctx_ids, ctx_w, _ = self._context(subject_item_id, categories, look)
        state, _ = self._state(look)
        return self._query(state, ctx_ids, ctx_w,
                           self._demographics(look, _check_demographics(demographics)), subject_item_id)

    def health(self) -> Dict[str, Any]:
        """Online-store reachability (one real read), model version and index facts."""
        t0 = time.perf_counter()
        store: Dict[str, Any] = {"reachable": True, "error": None}
        try:
            self._read([{C.USER_ID: HEALTH_PROBE_USER_ID}], USER_REFS)
        except OnlineStoreError as exc:
            store = {"reachable": False, "error": str(exc)}
        store["latency_ms"] = _ms(t0, time.perf_counter())
        store["reopened"] = self._online.reopens  # times a replaced/rewritten file was reopened
        m = self.index.manifest
        return {
            "status": "ok" if store["reachable"] else "degraded",
            "online_store": store,
            "model_version": self.model_version,
            "skew_policy": self.skew_policy,
            "index": {"backend": self.index.backend, "size": self.index.size,
                      "dim": self.index.dim, "recall_at_k": m.recall_at_k, "recall_k": m.recall_k,
                      "built_at": m.created_at},
        }

    def version(self) -> Dict[str, Any]:
        manifest = getattr(self.bundle, "manifest", {}) or {}
        return {"model_version": self.model_version, "state_dim": int(self.model.state_dim),
                "dim": int(self.config.dim), "fusion": self.config.fusion,
                "bundle_created_at": manifest.get(C.BUNDLE_CREATED_AT),
                "index_backend": self.index.backend, "index_size": self.index.size,
                "index_shards": len(self.index.searchers),
                "search_threads": self.index.search_threads,
                "head": self.head_backend, "feature_service": C.FEATURE_SERVICE}

    # ------------------------------------------------------------------ steps
    def _read(self, entity_rows: List[Dict[str, int]], refs: List[str]) -> Dict[str, List[Any]]:
        store = self._online.current()  # OnlineStoreError (503) when its SQLite file is gone
        try:
            resp = store.get_online_features(features=refs, entity_rows=entity_rows,
                                             full_feature_names=True)
            return resp.to_dict(include_event_timestamps=True)
        except STORE_ERRORS as exc:
            raise OnlineStoreError(f"online feature store unavailable: {type(exc).__name__}: "
                                   f"{exc}") from exc

    def _lookup(self, user_id: int, subject_item_id: Optional[int]) -> _Lookup:
        row: Dict[str, int] = {C.USER_ID: user_id}
        refs = USER_REFS
        if subject_item_id is not None:
            row[C.ITEM_ID] = subject_item_id
            refs = USER_ITEM_REFS
        got = self._read([row], refs)

        def val(view: str, feat: str) -> Any:
            return got[_key(view, feat)][0]

        state_raw = val(C.FV_USER_SEQUENCE_STATE, C.HIDDEN_STATE)
        ts_key = _key(C.FV_USER_SEQUENCE_STATE, C.HIDDEN_STATE) + "__ts"
        state_ts = float(got[ts_key][0]) if state_raw is not None and got.get(ts_key) else None
        item_ids = item_w = None
        if subject_item_id is not None:
            item_ids = val(C.FV_ITEM_CATEGORIES, C.CATEGORY_IDS)
            item_w = val(C.FV_ITEM_CATEGORIES, C.CATEGORY_WEIGHTS)
        return _Lookup(
            state=None if state_raw is None else np.asarray(state_raw, dtype=np.float32),
            state_version=val(C.FV_USER_SEQUENCE_STATE, C.MODEL_VERSION) if state_raw is not None
            else None,
            state_ts=state_ts,
            age=val(C.FV_USER_PROFILE, C.AGE_BUCKET),
            country=val(C.FV_USER_PROFILE, C.COUNTRY),
            gender=val(C.FV_USER_PROFILE, C.GENDER),
            item_found=item_ids is not None,
            item_category_ids=item_ids, item_category_weights=item_w)

    def _context(self, subject_item_id: Optional[int],
                 categories: Optional[Sequence[Tuple[int, float]]],
                 look: _Lookup) -> Tuple[np.ndarray, np.ndarray, str]:
        max_ctx = self.config.max_ctx
        if subject_item_id is not None:
            if not look.item_found:
                raise UnknownSubjectItemError(
                    f"subject item {subject_item_id} has no categories in the online store "
                    f"(unknown item, or item_categories not materialized)")
            ids, w = look.item_category_ids, look.item_category_weights
            source = CONTEXT_SUBJECT_ITEM
        elif categories is not None:
            ids, w = _check_categories(categories)
            source = CONTEXT_EXPLICIT if ids else CONTEXT_NONE
        else:
            ids, w, source = [], [], CONTEXT_NONE
        # the training contexts' projection (context_rows), then the trainer's padding
        try:
            top_ids, top_w = features.pad_context(
                *C.project_context(ids, w, min(self.context_top_k, max_ctx)), max_ctx)  # (C,), (C,)
        except ValueError as exc:
            if source == CONTEXT_SUBJECT_ITEM:
                raise StoredFeatureError(f"stored categories of item {subject_item_id} are invalid: "
                                         f"{exc}") from exc
            raise BadRequestError(f"bad context categories: {exc}") from exc
        return top_ids, top_w, source

    def _demographics(self, look: _Lookup, overrides: Dict[str, Any]) -> Tuple[int, int, int]:
        age = overrides.get(C.AGE_BUCKET, look.age)
        country = overrides.get(C.COUNTRY, look.country)
        gender = overrides.get(C.GENDER, look.gender)
        try:
            return features.encode_demographics(age, country, gender, self.config.country_buckets)
        except ValueError as exc:
            if any(key in overrides for key in DEMOGRAPHIC_KEYS):
                raise BadRequestError(f"bad demographics: {exc}") from exc
            raise StoredFeatureError(f"stored user_profile is invalid: {exc}") from exc

    def _state(self, look: _Lookup) -> Tuple[Optional[np.ndarray], Optional[str]]:
        """The cached state to use, or None (cold start) with the reason."""
        if look.state is None:
            return None, COLD_START_NO_STATE
        problem = None
        if look.state_version != self.model_version:
            problem = (f"cached state of model_version {look.state_version!r} but the loaded head is "
                       f"{self.model_version!r} (re-run batch inference + feast materialize for "
                       f"this model, or serve with skew_policy=cold_start)")
        elif look.state.shape != (self.model.state_dim,):
            problem = (f"cached state has {look.state.shape[0]} values, the head expects "
                       f"{self.model.state_dim}")
        if problem is None:
            return look.state, None
        if self.skew_policy == SKEW_REFUSE:
            raise VersionSkewError(problem)
        LOG.warning("serving as cold start: %s", problem)
        return None, COLD_START_VERSION_SKEW

    def _subject_embedding(self, subject_item_id: Optional[int]) -> Optional[np.ndarray]:
        """(1, D) item-tower embedding of the subject item as exported in the bundle (the one the
        model was trained with, id gate included); zeros for an item outside the bundle's catalog;
        None when the model does not read the subject item or there is none."""
        if subject_item_id is None or not self.config.use_subject_item:
            return None
        ids = self.bundle.item_ids  # (N,) sorted
        pos = int(np.searchsorted(ids, subject_item_id))
        if pos < len(ids) and int(ids[pos]) == subject_item_id:
            return self.bundle.item_embeddings[pos:pos + 1]  # (1, D)
        return np.zeros((1, self.config.dim), dtype=np.float32)

    def _query(self, state: Optional[np.ndarray], ctx_ids: np.ndarray, ctx_w: np.ndarray,
               demo: Tuple[int, int, int], subject_item_id: Optional[int] = None) -> np.ndarray:
        """The query vector (D,) from the head this resolver was built with."""
        age, country, gender = demo
        subject = self._subject_embedding(subject_item_id)  # (1, D) or None
        if self._numpy_head is None:
            return self._query_torch(state, ctx_ids, ctx_w, demo, subject)
        q = self._numpy_head.query(
            None if state is None else state[None, :],  # (1, state_dim)
            ctx_ids[None, :], ctx_w[None, :],  # (1, C) each
            np.array([age]), np.array([country]), np.array([gender]),  # (1,) each
            subject)
        return q[0]  # (D,)

    @torch.inference_mode()
    def _query_torch(self, state: Optional[np.ndarray], ctx_ids: np.ndarray, ctx_w: np.ndarray,
                     demo: Tuple[int, int, int], subject: Optional[np.ndarray]) -> np.ndarray:
        age, country, gender = demo
        st = None if state is None else torch.from_numpy(state).unsqueeze(0)  # (1, state_dim)
        q = self.model.query_from_state(
            st,
            torch.from_numpy(ctx_ids).unsqueeze(0),  # (1, C)
            torch.from_numpy(ctx_w).unsqueeze(0),  # (1, C)
            torch.tensor([age]), torch.tensor([country]), torch.tensor([gender]),  # (1,) each
            None if subject is None else torch.from_numpy(subject))  # (1, D)
        return q[0].numpy()  # (D,)

    def _check_feature_service(self) -> None:
        """Fail at start-up if the applied FeatureService lacks a feature the resolver reads."""
        try:
            service = self.store.get_feature_service(C.FEATURE_SERVICE)
        except STORE_ERRORS as exc:
            raise OnlineStoreError(f"cannot read FeatureService {C.FEATURE_SERVICE!r} from the "
                                   f"Feast registry (was `feast apply` run on this repo?): "
                                   f"{type(exc).__name__}: {exc}") from exc
        served = {C.feature_ref(p.name, f.name) for p in service.feature_view_projections
                  for f in p.features}
        missing = sorted(set(USER_ITEM_REFS) - served)
        if missing:
            raise ValueError(f"FeatureService {C.FEATURE_SERVICE!r} lacks {missing}; the resolver "
                             f"and feature_repo/ disagree on feature names")


# ---------------------------------------------------------------------- helpers
def _ms(a: float, b: float) -> float:
    return round((b - a) * 1000.0, 4)


def _check_id(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise BadRequestError(f"{name} must be an integer, got {value!r}")
    if not 0 <= int(value) <= C.MAX_ID:
        raise BadRequestError(f"{name} must be in [0, {C.MAX_ID}], got {value}")
    return int(value)


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= MAX_K:
        raise BadRequestError(f"k must be an integer in [1, {MAX_K}], got {k!r}")
    return int(k)


def _check_categories(categories: Sequence[Tuple[int, float]]) -> Tuple[List[int], List[float]]:
    """Explicit context pairs -> (ids, weights), refusing numbers the head would silently mangle.

    An id beyond int32 is no category (and beyond int64 overflows the id tensor); a weight sum
    that overflows float64 normalises every weight to 0 and would drop the context without a
    word while the answer still says ``context_source: explicit``.
    """
    try:
        ids = [int(c) for c, _ in categories]
        w = [float(x) for _, x in categories]
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadRequestError(f"categories must be a list of (id, weight) pairs: {exc}") from exc
    bad_ids = [c for c in ids if not 0 <= c <= MAX_CATEGORY_ID]
    if bad_ids:
        raise BadRequestError(f"category ids must be in [0, {MAX_CATEGORY_ID}], got {bad_ids[:5]}")
    if not all(math.isfinite(x) for x in w) or not math.isfinite(sum(w)):
        raise BadRequestError(f"category weights must be finite with a finite sum, got {w[:5]}")
    return ids, w


def _check_demographics(demographics: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    if demographics is None:
        return {}
    unknown = sorted(set(demographics) - set(DEMOGRAPHIC_KEYS))
    if unknown:
        raise BadRequestError(f"unknown demographics keys {unknown}; allowed: {list(DEMOGRAPHIC_KEYS)}")
    return {key: v for key, v in demographics.items() if v is not None}


def _feature_store(feature_repo_dir: Path | str) -> Any:
    import yaml
    from feast import FeatureStore
    from feast.errors import FeastError

    try:
        return FeatureStore(repo_path=str(feature_repo_dir))
    except (OSError, yaml.YAMLError, ValueError, FeastError) as exc:
        raise ValueError(f"feature repo {feature_repo_dir} does not load (a folder with a valid "
                         f"feature_store.yaml is needed): {type(exc).__name__}: {exc}") from exc


def _index_for(bundle: Any, index_dir: Optional[Path | str]) -> ItemIndex:
    if index_dir is not None:
        return load_index(index_dir, bundle.model_version, bundle.item_ids, bundle.item_embeddings)
    tmp = Path(tempfile.mkdtemp(prefix="ctt-index-")) / "index"
    LOG.warning("no index folder given: building one in %s", tmp)
    return build_index(bundle.item_ids, bundle.item_embeddings, bundle.model_version, tmp)
