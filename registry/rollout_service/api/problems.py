"""Error answers: every one is a ``Problem``; domain errors become status codes here, and nowhere else."""

from __future__ import annotations

from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from registry.rollout_service.errors import RolloutServiceError
from registry.rollout_service.schemas import Problem

# What the OpenAPI document lists for every route, and for every /v1 route.
APP_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem},
    413: {"model": Problem, "description": "the body is larger than this route's limit (api/body_limits.py)"},
    422: {"model": Problem},
}
V1_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "the body could not be read (not UTF-8, not JSON)"},
    401: {"model": Problem},
    403: {"model": Problem},
    404: {"model": Problem},
    409: {"model": Problem},
    422: {"model": Problem},
    503: {"model": Problem},
}


async def service_error(request: Request, exc: Exception) -> Response:
    """A ``RolloutServiceError`` as its status, with ``WWW-Authenticate`` on 401 and ``Retry-After`` when retryable."""
    assert isinstance(exc, RolloutServiceError)
    request.app.state.service.metrics.errors.labels(str(exc.status)).inc()
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    if exc.retryable:
        headers = {"Retry-After": "5"}
    return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers)


async def validation_error(request: Request, exc: Exception) -> Response:
    """422 with the first error as one readable line, and every error with where it was."""
    assert isinstance(exc, RequestValidationError)
    errors = [
        {
            "loc": [str(p) for p in e.get("loc", ())],
            "msg": str(e.get("msg", "")).removeprefix("Value error, "),
            "type": str(e.get("type", "")),
        }
        for e in exc.errors()
    ]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(first["loc"]) or "request"
    return JSONResponse({"detail": f"{where}: {first['msg']}", "errors": errors}, status_code=422)
