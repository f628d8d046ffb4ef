"""Errors of the online serving path, each mapped to one HTTP status by `serving/app.py`.

Why a small hierarchy instead of bare exceptions: every hazard of the hybrid pattern (seed 003)
must surface *visibly* - as a specific status code with a message a caller can act on - and never
as a 500 stack trace or, worse, a silently wrong answer. The app maps `ServingError.http_status`
directly, so adding a hazard means adding a subclass here, not another `except` in the app.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence


class ServingError(Exception):
    """Base class: a request or artifact problem the serving layer reports with a status code."""

    http_status: int = 500
    code: str = "serving_error"


class BadRequestError(ServingError):
    """The request is well-formed JSON but semantically unusable (unknown ids, inconsistent lists)."""

    http_status = 400
    code = "bad_request"


class VersionSkewError(ServingError):
    """The user's cached sequence state was produced by another model version than the loaded head.

    Mixing a state from checkpoint A with a head from checkpoint B produces a plausible-looking
    but meaningless embedding, so the default policy refuses (HTTP 409 Conflict).
    """

    http_status = 409
    code = "version_skew"


class OnlineStoreError(ServingError):
    """The Feast online store could not be read (down, locked, unreachable)."""

    http_status = 503
    code = "online_store_unavailable"


class IndexMismatchError(ServingError):
    """The ANN index on disk is missing, corrupt or does not belong to the loaded model bundle
    (other model_version, dims, or item-id array than the bundle)."""

    http_status = 500
    code = "index_mismatch"


class UnknownSubjectItemError(ServingError):
    """The subject item has no categories in the online store (unknown or not materialized).

    Refusing is better than silently serving the request without its context.
    """

    http_status = 404
    code = "unknown_subject_item"


class StoredFeatureError(ServingError):
    """A value read from the online store is invalid (e.g. a demographic outside its vocabulary).

    An upstream data bug, not the caller's fault: 500, but with a message instead of a trace.
    """

    http_status = 500
    code = "bad_stored_feature"


# ---------------------------------------------------------------------- the one error shape
# Codes of the errors the HTTP layer raises itself (the ServingError codes are above).
INVALID_REQUEST = "invalid_request"  # 422: body not JSON, wrong shape, field out of range
REQUEST_TOO_LARGE = "request_too_large"  # 413: body above the configured limit, not read
INTERNAL_ERROR = "internal_error"  # 500: a bug; the trace goes to the server log
HTTP_ERROR_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed",
                    413: REQUEST_TOO_LARGE, 422: INVALID_REQUEST}


def error_body(code: str, detail: str, fields: Sequence[Mapping[str, Any]] = ()) -> Dict[str, Any]:
    """Every error answer of the app: ``{"error": code, "detail": message, "fields": [...]}``.

    ``error`` is a stable machine-readable code, ``detail`` one human-readable sentence, ``fields``
    the offending request fields (``{"loc": [...], "msg": ...}``; empty unless the body failed
    validation). One shape, so a client parses errors without knowing which layer refused.
    """
    return {"error": code, "detail": detail, "fields": [dict(f) for f in fields]}
