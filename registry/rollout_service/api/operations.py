"""Routes for running the service: health, metrics, the dashboard's files, the audit log, promotions, and the
webhook MLflow calls when an alias moves.
"""

# No "from __future__ import annotations": FastAPI reads the route annotations as objects.

from typing import Annotated

import anyio
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import RedirectResponse
from prometheus_client import CONTENT_TYPE_LATEST

from registry.rollout_service import dashboard
from registry.rollout_service.api.deps import CurrentOperator, ServiceDep
from registry.rollout_service.api.problems import V1_RESPONSES
from registry.rollout_service.errors import InvalidRequestError
from registry.rollout_service.schemas import AuditList, PromotionList
from registry.rollout_service.webhooks import DELIVERY_HEADER, WEBHOOK_PATH, verify_webhook

router = APIRouter()
_v1 = APIRouter(prefix="/v1", responses=V1_RESPONSES)


# -- open: no token --------------------------------------------------------------------------------------------


@router.get("/healthz", tags=["service"])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics", tags=["service"], response_class=Response)
def metrics(service: ServiceDep) -> Response:
    return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/ui", include_in_schema=False)
def dashboard_root() -> Response:
    # Relative, so that the page's relative asset and API paths also work behind a path-prefix proxy.
    return RedirectResponse("ui/", status_code=307)


@router.get("/ui/", include_in_schema=False)
def dashboard_page() -> Response:
    return dashboard.asset("index.html")


@router.get("/ui/{name}", include_in_schema=False)
def dashboard_asset(name: str) -> Response:
    return dashboard.asset(name)


# -- operators -------------------------------------------------------------------------------------------------


@_v1.get("/audit", tags=["rollouts"])
def audit_log(
    operator: CurrentOperator,
    service: ServiceDep,
    rollout_id: Annotated[int | None, Query(ge=1, le=2**62)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 200,
) -> AuditList:
    return service.queries.audit(rollout_id=rollout_id, limit=limit)


@_v1.get("/promotions", tags=["rollouts"])
def promotions(
    operator: CurrentOperator, service: ServiceDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> PromotionList:
    return service.queries.promotions(limit=limit)


# -- MLflow ----------------------------------------------------------------------------------------------------


@_v1.post(WEBHOOK_PATH.removeprefix("/v1"), tags=["service"], include_in_schema=False)
async def mlflow_webhook(request: Request, service: ServiceDep) -> dict[str, str]:
    """Authenticated by its HMAC signature, not by a token: MLflow holds the shared secret. Its size is bounded
    before it is read (``max_webhook_bytes``, api/body_limits.py)."""
    secret = service.settings.webhook_key
    if secret is None:
        service.metrics.webhooks.labels("refused").inc()
        raise InvalidRequestError("webhooks are not configured here")
    body = await request.body()
    try:
        payload = verify_webhook(secret, request.headers, body)
    except Exception:
        service.metrics.webhooks.labels("bad_signature").inc()
        raise
    try:
        await anyio.to_thread.run_sync(service.promotions.remember_delivery, request.headers[DELIVERY_HEADER])
    except Exception:
        service.metrics.webhooks.labels("replayed").inc()
        raise
    outcome = await anyio.to_thread.run_sync(service.promotions.on_webhook, payload)
    service.metrics.webhooks.labels("accepted").inc()
    return {"outcome": outcome}


router.include_router(_v1)
