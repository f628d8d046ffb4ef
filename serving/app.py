"""HTTP front of the resolver: POST /recommend, GET /health, GET /version (FastAPI).

Why so thin: all behaviour lives in `Resolver`; the app only validates the request shape
(pydantic -> 422 with the offending field), maps each `ServingError` to its status code with a
JSON message (409 skew, 503 online store down, 400/404 bad ids) and never leaks a stack trace.
Request field names come from `pipelines.contracts` (built with `create_model`) so the HTTP API
cannot drift from the table/feature names.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Literal, Optional, Tuple

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, create_model, model_validator

from pipelines import contracts as C
from serving.errors import ServingError
from serving.resolver import MAX_K, Resolver

LOG = logging.getLogger(__name__)

_STRICT = ConfigDict(extra="forbid")

DemographicsIn = create_model(
    "DemographicsIn", __config__=_STRICT,
    **{C.AGE_BUCKET: (Optional[StrictInt], Field(None, ge=0, lt=C.AGE_BUCKETS)),
       C.COUNTRY: (Optional[str], Field(None, min_length=1, max_length=64)),
       C.GENDER: (Optional[Literal[C.GENDERS]], None)},  # type: ignore[valid-type]
)


class _RecommendBase(BaseModel):
    model_config = _STRICT

    categories: Optional[List[Tuple[StrictInt, float]]] = Field(
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


RecommendRequest = create_model(
    "RecommendRequest", __base__=_RecommendBase,
    **{C.USER_ID: (StrictInt, Field(..., ge=0, le=C.MAX_ID)),
       C.SUBJECT_ITEM_ID: (Optional[StrictInt], Field(None, ge=0, le=C.MAX_ID))},
)


def create_app(resolver: Resolver) -> FastAPI:
    """An app bound to one loaded resolver (one model version per process)."""
    app = FastAPI(title="contextual two-tower retrieval", version=resolver.model_version)

    @app.exception_handler(ServingError)
    async def _serving_error(_: Request, exc: ServingError) -> JSONResponse:
        return JSONResponse(status_code=exc.http_status,
                            content={"error": exc.code, "detail": str(exc)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        return JSONResponse(status_code=422, content={"error": "invalid_request", "detail": errors})

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        LOG.exception("unhandled error")  # the trace goes to the server log, not to the client
        return JSONResponse(status_code=500, content={"error": "internal_error",
                                                      "detail": f"{type(exc).__name__}: {exc}"})

    @app.post("/recommend")
    def recommend(req: RecommendRequest) -> JSONResponse:  # type: ignore[valid-type]
        body = req.model_dump()  # type: ignore[attr-defined]
        demo = body["demographics"]
        resp = resolver.recommend(
            body[C.USER_ID], subject_item_id=body[C.SUBJECT_ITEM_ID],
            categories=body["categories"],
            demographics={key: v for key, v in demo.items() if v is not None} if demo else None,
            k=body["k"], exact=body["exact"])
        # JSONResponse directly: FastAPI's generic encoder walks the 100 (id, score) pairs one by
        # one and costs more than the whole ScaNN search.
        return JSONResponse(content=resp.to_dict())

    @app.get("/health")
    def health() -> JSONResponse:
        report = resolver.health()
        return JSONResponse(status_code=200 if report["status"] == "ok" else 503, content=report)

    @app.get("/version")
    def version() -> Dict[str, Any]:
        return resolver.version()

    return app
