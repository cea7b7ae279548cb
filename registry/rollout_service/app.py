"""The rollout service's FastAPI application: ``create_app(settings)`` builds everything, nothing happens at import.

Routes are thin: they authenticate, then call the managers (``rollouts``, ``devices``, ``promotions``,
``desired``), which call the database. Domain errors become status codes in one handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import sqlalchemy as sa
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from registry.mlflow_gateway import MlflowGateway
from registry.resolver import BundleResolver
from registry.rollout_service import routes
from registry.rollout_service.auth import OperatorTokens
from registry.rollout_service.bundles import BundleCatalog
from registry.rollout_service.db import make_engine, migrate, session_factory
from registry.rollout_service.desired import DesiredIndex
from registry.rollout_service.devices import DeviceRegistry
from registry.rollout_service.errors import RolloutServiceError
from registry.rollout_service.metrics import ServiceMetrics
from registry.rollout_service.promotions import WEBHOOK_EVENTS, WEBHOOK_NAME, WEBHOOK_PATH, PromotionWatcher
from registry.rollout_service.rollouts import RolloutManager
from registry.rollout_service.settings import ServiceSettings

log = logging.getLogger(__name__)


@dataclass
class Service:
    """Everything a request handler may need, built once per app."""

    settings: ServiceSettings
    operators: OperatorTokens
    devices: DeviceRegistry
    desired: DesiredIndex
    rollouts: RolloutManager
    promotions: PromotionWatcher
    catalog: BundleCatalog
    metrics: ServiceMetrics
    engine: sa.Engine


def build_service(settings: ServiceSettings) -> Service:
    """Engine, migrations, and the managers over them."""
    engine = make_engine(settings.database)
    migrate(engine)
    sessions = session_factory(engine)
    mlflow_uri = settings.mlflow_uri
    resolver_factory: Callable[[], BundleResolver] | None = None
    gateway_factory: Callable[[], MlflowGateway] | None = None
    if mlflow_uri:
        presign = None
        if settings.s3_endpoint_url:
            from registry.s3 import s3_presigner

            presign = s3_presigner(endpoint_url=settings.s3_endpoint_url)

        def resolver_factory() -> BundleResolver:
            return BundleResolver(mlflow_uri, timeout_s=10, max_retries=1, presign=presign)

        gateways: list[MlflowGateway] = []

        def gateway_factory() -> MlflowGateway:
            # Built on first use: importing mlflow takes seconds, and the REST API should answer before that.
            if not gateways:
                gateways.append(MlflowGateway(mlflow_uri, max_retries=1, timeout_s=10))
            return gateways[0]

    catalog = BundleCatalog(sessions, resolver_factory, ttl_s=settings.bundle_cache_ttl_s)
    desired = DesiredIndex(sessions, catalog, settings)
    rollouts = RolloutManager(sessions, catalog, settings, fleet=desired.fleet, on_change=desired.invalidate)
    operators = OperatorTokens(sessions)
    operators.install(settings.operator_token_list)
    return Service(
        settings=settings,
        operators=operators,
        devices=DeviceRegistry(sessions, catalog, desired, settings),
        desired=desired,
        rollouts=rollouts,
        promotions=PromotionWatcher(sessions, catalog, rollouts, gateway_factory, settings),
        catalog=catalog,
        metrics=ServiceMetrics(sessions),
        engine=engine,
    )


def create_app(settings: ServiceSettings) -> FastAPI:
    """The ASGI app for ``settings``, with its background loops (scheduler, alias poll, heartbeats)."""
    service = build_service(settings)
    if settings.dev_mode:
        log.warning("dev mode: well-known tokens are accepted where none are configured; never use it in production")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks = [
            asyncio.create_task(_every(settings.scheduler_interval_s, service.rollouts.evaluate_all, "scheduler")),
            asyncio.create_task(_every(settings.heartbeat_flush_s, service.devices.flush_heartbeats, "heartbeats")),
        ]
        if settings.mlflow_uri:
            tasks.append(asyncio.create_task(_watch_aliases(service)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await anyio.to_thread.run_sync(service.devices.flush_heartbeats)
            service.engine.dispose()

    app = FastAPI(
        title="yolo-ota rollout service",
        version="1",
        summary="Devices, canary waves and A/B tests for YOLO bundles registered in MLflow",
        lifespan=lifespan,
        responses={401: {"model": routes.Problem}, 422: {"model": routes.Problem}},
    )
    app.state.service = service
    app.add_exception_handler(RolloutServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    routes.install(app, service)
    return app


async def _service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RolloutServiceError)
    request.app.state.service.metrics.errors.labels(str(exc.status)).inc()
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    if exc.retryable:
        headers = {"Retry-After": "5"}
    return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers)


async def _validation_error(request: Request, exc: Exception) -> Response:
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


async def _every(interval_s: float, step: Callable[[], Any], name: str) -> None:
    """Run ``step`` in a worker thread every ``interval_s``; a failure is logged and the loop goes on."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await anyio.to_thread.run_sync(step)
        except Exception:
            log.exception("%s: step failed", name)


async def _watch_aliases(service: Service) -> None:
    """Register the MLflow webhook (until it works), then poll aliases as the fallback."""
    settings = service.settings
    registered = not (settings.public_url and settings.webhook_key)
    while True:
        if not registered:
            registered = await _register_webhook(service)
        try:
            await anyio.to_thread.run_sync(service.promotions.poll)
        except Exception:
            log.exception("alias poll failed")
        await asyncio.sleep(settings.alias_poll_interval_s)


async def _register_webhook(service: Service) -> bool:
    settings = service.settings
    assert settings.public_url and settings.webhook_key and settings.mlflow_uri
    url = settings.public_url.rstrip("/") + WEBHOOK_PATH
    secret = settings.webhook_key
    mlflow_uri = settings.mlflow_uri

    def register() -> str:
        return MlflowGateway(mlflow_uri, max_retries=1, timeout_s=10).ensure_webhook(
            WEBHOOK_NAME, url, secret, WEBHOOK_EVENTS
        )

    try:
        await anyio.to_thread.run_sync(register)
    except Exception as exc:
        log.warning("could not register the MLflow webhook (%s); polling aliases meanwhile", exc)
        return False
    return True
