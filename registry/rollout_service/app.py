"""The rollout service's FastAPI application: ``create_app(settings)`` builds everything, nothing happens at import.

``service.build_service`` makes the engine and the managers; the routers of ``api/`` (one per resource) call
them through the dependencies of ``api/deps.py``. Domain errors become status codes in one handler
(``api/problems.py``). The background loops (wave scheduler, heartbeat flush, retention, alias watch) run in the
lifespan. Request bodies are bounded before they are read (``api/body_limits.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from registry.mlflow_gateway import MlflowGateway
from registry.rollout_service.api import access, devices, operations, problems, revocations, rollouts
from registry.rollout_service.api.body_limits import BodyLimits, route_limits
from registry.rollout_service.errors import RolloutServiceError
from registry.rollout_service.service import Service, build_service
from registry.rollout_service.settings import ServiceSettings
from registry.rollout_service.webhooks import WEBHOOK_EVENTS, WEBHOOK_NAME, WEBHOOK_PATH

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def create_app(settings: ServiceSettings) -> FastAPI:
    """The ASGI app for ``settings``, with its background loops (scheduler, alias poll, heartbeats, retention)."""
    service = build_service(settings)
    if settings.dev_mode:
        log.warning("dev mode: well-known tokens are accepted where none are configured; never use it in production")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks = [
            asyncio.create_task(_every(settings.scheduler_interval_s, service.rollouts.evaluate_all, "scheduler")),
            asyncio.create_task(_every(settings.heartbeat_flush_s, service.devices.flush_heartbeats, "heartbeats")),
            asyncio.create_task(_every(settings.retention_interval_s, service.retention.prune, "retention")),
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
        responses=problems.APP_RESPONSES,
    )
    app.state.service = service
    app.add_exception_handler(RolloutServiceError, problems.service_error)
    app.add_exception_handler(RequestValidationError, problems.validation_error)
    app.include_router(operations.router)
    app.include_router(devices.router)
    app.include_router(rollouts.router)
    app.include_router(access.router)
    app.include_router(revocations.router)
    app.add_middleware(
        BodyLimits,
        routes=route_limits(settings),
        default_max_bytes=settings.max_body_bytes,
        on_refused=service.metrics.errors.labels("413").inc,
    )
    return app


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
