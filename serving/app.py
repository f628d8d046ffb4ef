"""HTTP front of the resolver: POST /recommend, GET /health, GET /version, GET /metrics (FastAPI).

Why so thin: all behaviour lives in `Resolver`; the app only validates the request shape
(pydantic -> 422 with the offending field), maps each `ServingError` to its status code and never
leaks a stack trace. Request field names come from `ctt_contracts` (built with
`create_model`) so the HTTP API cannot drift from the table/feature names.

Every error answer has ONE JSON shape (`serving.errors.error_body`: error code, detail, fields),
whichever layer refused: body limit (413), unparsable or invalid body (422), a `ServingError`
(400/404/409/503), routing (404/405) or a bug (500). Two pure ASGI middlewares sit between
Starlette's server-error layer and the routes:
- `BodyLimit` answers 413 from the Content-Length header, or as soon as a chunked body passes
  the limit, before anything is parsed (a 30 MB body would otherwise cost seconds of CPU and
  hundreds of MB before validation rejects it);
- `InternalErrors` turns an unexpected exception into a complete 500 answer and does NOT re-raise
  it. Starlette's own handler for `Exception` re-raises after answering, and uvicorn then closes
  the keep-alive connection, so the client's next request on it fails.
Outside both, `Observe` counts every answer by status and outcome (the error code of the body)
and times it for /metrics (serving.metrics). Recommendations are answered with orjson (~80x
faster than the standard encoder on 100 (id, score) pairs) and, when a request log is
configured, a sampled share is written to it (serving.request_log).
"""
from __future__ import annotations

import abc
import json
import logging
import math
import time
from typing import Annotated, Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, create_model, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import ctt_contracts as C
from serving.errors import (HTTP_ERROR_CODES, INTERNAL_ERROR, INVALID_REQUEST, REQUEST_TOO_LARGE,
                            ServingError, error_body)
from serving.metrics import OUTCOME_OK, ServingMetrics, build_labels
from serving.request_log import RequestLog, make_record
from serving.resolver import MAX_CATEGORY_ID, MAX_K, Resolver

LOG = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 64 * 1024  # a full request (32 categories, demographics) is < 2 KB

_STRICT = ConfigDict(extra="forbid")

DemographicsIn = create_model(
    "DemographicsIn", __config__=_STRICT,
    **{C.AGE_BUCKET: (Optional[StrictInt], Field(None, ge=0, lt=C.AGE_BUCKETS)),
       C.COUNTRY: (Optional[str], Field(None, min_length=1, max_length=64)),
       C.GENDER: (Optional[Literal[C.GENDERS]], None)},  # type: ignore[valid-type]
)

CategoryId = Annotated[StrictInt, Field(ge=0, le=MAX_CATEGORY_ID)]
# JSON's `NaN`, `Infinity` and `1e999` all parse to non-finite floats.
Weight = Annotated[float, Field(allow_inf_nan=False)]


class _RecommendBase(BaseModel):
    model_config = _STRICT

    categories: Optional[List[Tuple[CategoryId, Weight]]] = Field(
        None, max_length=C.MAX_CATEGORIES_PER_ITEM,
        description="explicit context: [[category_id, confidence_weight], ...]")
    demographics: Optional[DemographicsIn] = None  # type: ignore[valid-type]
    k: StrictInt = Field(100, ge=1, le=MAX_K)
    exact: StrictBool = Field(False, description="brute-force oracle instead of ScaNN")

    @model_validator(mode="after")
    def _one_context(self) -> "_RecommendBase":
        if getattr(self, C.SUBJECT_ITEM_ID) is not None and self.categories is not None:
            raise ValueError(f"give either {C.SUBJECT_ITEM_ID} or categories, not both")
        return self

    @model_validator(mode="after")
    def _finite_weight_sum(self) -> "_RecommendBase":
        # Finite weights can still sum to inf; the context would be normalised to all-zero.
        if self.categories and not math.isfinite(sum(w for _, w in self.categories)):
            raise ValueError("category weights overflow when summed; send relative confidences "
                             "(e.g. in [0, 1])")
        return self


RecommendRequest = create_model(
    "RecommendRequest", __base__=_RecommendBase,
    **{C.USER_ID: (StrictInt, Field(..., ge=0, le=C.MAX_ID)),
       C.SUBJECT_ITEM_ID: (Optional[StrictInt], Field(None, ge=0, le=C.MAX_ID))},
)


def _error(status: int, code: str, detail: str,
           fields: Sequence[Mapping[str, Any]] = ()) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(code, detail, fields))


def _field_errors(exc: RequestValidationError) -> List[Dict[str, Any]]:
    """pydantic's errors without their `input` (it may be huge, or NaN that JSON cannot carry)."""
    fields = []
    for e in exc.errors():
        msg = str(e.get("msg", ""))
        reason = (e.get("ctx") or {}).get("error")
        if e.get("type") == "json_invalid" and reason:
            msg = f"{msg}: {reason}"
        fields.append({"loc": [str(x) for x in e.get("loc", ())], "msg": msg})
    return fields


class HttpMiddleware(abc.ABC):
    """An ASGI middleware that acts on HTTP requests only (``http``); lifespan and websocket
    scopes go to the wrapped app untouched, as Starlette expects of every layer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.http(scope, receive, send)

    @abc.abstractmethod
    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one HTTP request."""


class BodyLimit(HttpMiddleware):
    """413 for a request body above `max_bytes`, decided before anything parses it.

    A declared Content-Length above the limit is refused without reading a byte; a chunked body
    is read up to the limit and refused as soon as it passes it. An accepted body (at most
    `max_bytes`) is handed to the app unchanged.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        super().__init__(app)
        self.max_bytes = max_bytes

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send, declared)
            return
        chunks: List[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left; nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, None)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # later messages: the disconnect notice
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send,
                      declared: Optional[int]) -> None:
        size = f"{declared} bytes" if declared is not None else "the body"
        await _error(413, REQUEST_TOO_LARGE,
                     f"request body too large: {size} > limit of {self.max_bytes} bytes "
                     f"(ctt-serve --max-body-bytes)")(scope, receive, send)


def _content_length(scope: Scope) -> Optional[int]:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class InternalErrors(HttpMiddleware):
    """The last line before the server: an unexpected exception becomes a complete 500 answer.

    Not re-raised (unlike Starlette's `Exception` handler), so uvicorn keeps the keep-alive
    connection open for the client's next request. The trace goes to the server log only.
    """

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # every bug: answered, logged, connection kept
            LOG.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:  # half an answer is already out; only closing the connection is honest
                raise
            await _error(500, INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")(scope, receive, send)


class FastJSONResponse(JSONResponse):
    """JSON rendered by orjson (numbers exactly as the standard encoder writes them)."""

    def render(self, content: Any) -> bytes:
        import orjson

        return orjson.dumps(content)


class Observe(HttpMiddleware):
    """Outermost layer: every answer counted by endpoint, status and outcome, and timed.

    The outcome of an error is read from its body (every error of the app has the one shape of
    `serving.errors.error_body`), so the counters use the same codes the clients see. An
    exception that escapes (a half-sent answer) counts as `internal_error` and is re-raised.
    """

    def __init__(self, app: ASGIApp, metrics: ServingMetrics) -> None:
        super().__init__(app)
        self.metrics = metrics

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        status = 500
        error_chunks: List[bytes] = []

        async def observing_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status >= 400:
                error_chunks.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, observing_send)
        except Exception:
            self.metrics.observe_request(scope["path"], 500, INTERNAL_ERROR, time.perf_counter() - t0)
            raise
        outcome = OUTCOME_OK if status < 400 else _error_code(b"".join(error_chunks), status)
        self.metrics.observe_request(scope["path"], status, outcome, time.perf_counter() - t0)


def _error_code(body: bytes, status: int) -> str:
    try:
        code = json.loads(body).get("error")
    except (ValueError, AttributeError):
        code = None
    return code if isinstance(code, str) else f"http_{status}"


def create_app(resolver: Resolver, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               metrics: Optional[ServingMetrics] = None,
               request_log: Optional[RequestLog] = None) -> FastAPI:
    """An app bound to one loaded resolver (one model version per process).

    `metrics` None: a fresh `ServingMetrics` (multi-process when PROMETHEUS_MULTIPROC_DIR is
    set). `request_log` None or with sample rate 0: no request log.
    """
    app = FastAPI(title="contextual two-tower retrieval", version=resolver.model_version)
    metrics = metrics if metrics is not None else ServingMetrics()
    metrics.set_build_info(build_labels(resolver.model_version, resolver.index.manifest,
                                        resolver.head_backend))
    app.state.metrics = metrics
    app.state.request_log = request_log
    # add_middleware puts the last one added outermost: Observe wraps InternalErrors wraps BodyLimit.
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(InternalErrors)
    app.add_middleware(Observe, metrics=metrics)

    @app.exception_handler(ServingError)
    async def _serving_error(_: Request, exc: ServingError) -> JSONResponse:
        return _error(exc.http_status, exc.code, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        fields = _field_errors(exc)
        detail = "; ".join(f"{'.'.join(f['loc'])}: {f['msg']}" for f in fields)
        return _error(422, INVALID_REQUEST, f"invalid request: {detail}", fields)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # The app raises no HTTPException itself; FastAPI raises this 400 when the body is
            # not decodable text (its JSON syntax errors are validation errors, 422). Both are an
            # unparsable body: one status, one code.
            return _error(422, INVALID_REQUEST, f"invalid request: body: {exc.detail}",
                          [{"loc": ["body"], "msg": str(exc.detail)}])
        return _error(exc.status_code, HTTP_ERROR_CODES.get(exc.status_code, "http_error"),
                      str(exc.detail))

    # `async def`: the resolver runs on the worker's event loop, one request at a time in arrival
    # order. As a plain `def` it ran in a thread pool where up to 40 requests interleave under
    # the GIL, which multiplied the tail under concurrent load; a request costs ~1 ms of CPU, so
    # the loop is never blocked for long. Concurrency comes from worker processes (--workers).
    @app.post("/recommend")
    async def recommend(req: RecommendRequest) -> JSONResponse:  # type: ignore[valid-type]
        body = req.model_dump()  # type: ignore[attr-defined]
        demo = body["demographics"]
        body["demographics"] = {key: v for key, v in demo.items() if v is not None} if demo else None
        resp = resolver.recommend(
            body[C.USER_ID], subject_item_id=body[C.SUBJECT_ITEM_ID],
            categories=body["categories"], demographics=body["demographics"],
            k=body["k"], exact=body["exact"])
        metrics.observe_recommendation(resp.timings, resp.cold_start_reason, resp.state_age_seconds)
        out = resp.to_dict()
        if request_log is not None and request_log.sampled():
            request_log.write(make_record(body, out, resolver.index.manifest))
        # A response class directly: FastAPI's generic encoder walks the 100 (id, score) pairs
        # one by one and costs more than the whole ScaNN search.
        return FastJSONResponse(content=out)

    @app.get("/health")
    def health() -> JSONResponse:
        report = resolver.health()
        return JSONResponse(status_code=200 if report["status"] == "ok" else 503, content=report)

    @app.get("/version")
    def version() -> Dict[str, Any]:
        return resolver.version()

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        body, content_type = metrics.exposition()
        return Response(content=body, media_type=content_type)

    return app
