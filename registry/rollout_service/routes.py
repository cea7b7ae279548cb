"""The REST routes (DESIGN.md section 6). Each authenticates, calls a manager, and shapes the answer."""

# No "from __future__ import annotations": FastAPI must see the route-local Annotated aliases as objects.

from typing import TYPE_CHECKING, Annotated

import anyio
import sqlalchemy as sa
from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from registry.rollout_service import dashboard
from registry.rollout_service.auth import bearer, check_device
from registry.rollout_service.db import AuditRecord, Promotion
from registry.rollout_service.errors import InvalidRequestError
from registry.rollout_service.progress import arm_telemetry, wave_progress
from registry.rollout_service.promotions import WEBHOOK_PATH, verify_webhook
from registry.rollout_service.records import RolloutView
from registry.rollout_service.rollouts import CONTROL_ACTIONS
from registry.rollout_service.schemas import (
    AuditEntry,
    AuditList,
    DesiredState,
    DeviceDetail,
    DeviceEnroll,
    DeviceEnrolled,
    DeviceId,
    DeviceList,
    DeviceReport,
    Problem,
    PromotionList,
    PromotionPublic,
    ReportAccepted,
    RolloutAction,
    RolloutCreate,
    RolloutDetail,
    RolloutList,
    RolloutPublic,
    RolloutState,
    RolloutTelemetryPublic,
    VersionText,
)
from registry.rollout_service.telemetry import recent_windows

if TYPE_CHECKING:  # app.py imports this module; the name is only needed for the annotation
    from registry.rollout_service.app import Service

__all__ = ["Problem", "install"]

_MAX_WEBHOOK_BYTES = 64 << 10


def install(app: FastAPI, service: "Service") -> None:

    svc = service

    def operator(authorization: Annotated[str | None, Header()] = None) -> str:
        return svc.operators.actor(bearer(authorization))

    def device(device_id: Annotated[DeviceId, Path()], authorization: Annotated[str | None, Header()] = None) -> str:
        check_device(svc.devices, device_id, bearer(authorization))
        return device_id

    Operator = Annotated[str, Depends(operator)]
    CurrentDevice = Annotated[str, Depends(device)]
    RolloutId = Annotated[int, Path(ge=1, le=2**62)]
    errors = {
        400: {"model": Problem, "description": "the body could not be read (not UTF-8, not JSON)"},
        401: {"model": Problem},
        403: {"model": Problem},
        404: {"model": Problem},
        409: {"model": Problem},
        422: {"model": Problem},
        503: {"model": Problem},
    }

    @app.get("/healthz", tags=["service"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", tags=["service"], response_class=Response)
    def metrics() -> Response:
        return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    dashboard.install(app)

    v1 = APIRouter(prefix="/v1", responses=errors)  # type: ignore[arg-type]

    # -- devices ---------------------------------------------------------------------------------------------

    # First among the routes: it is the one every device calls every poll interval.
    @v1.get(
        "/devices/{device_id}/desired",
        tags=["devices"],
        response_model=DesiredState,
        responses={304: {"description": "unchanged since the ETag given in If-None-Match"}},
        openapi_extra={"parameters": _DESIRED_HEADERS},
    )
    async def desired(device_id: Annotated[DeviceId, Path()], request: Request) -> Response:
        # Headers are read by hand rather than declared as parameters: this is the hot path, and FastAPI's
        # per-parameter machinery costs more than the rest of the unchanged answer. They are documented above.
        token = bearer(request.headers.get("authorization"))
        if not svc.devices.is_cached_token(device_id, token):
            await anyio.to_thread.run_sync(check_device, svc.devices, device_id, token)
        svc.devices.seen(device_id)
        choice = svc.desired.cached_choice(device_id)
        if choice is None:
            choice = await anyio.to_thread.run_sync(svc.desired.choice, device_id)
        if_none_match = request.headers.get("if-none-match")
        if if_none_match is not None and choice.etag in _etags(if_none_match):
            svc.metrics.polls_304.inc()
            return Response(status_code=304, headers={"ETag": choice.etag})
        state = await anyio.to_thread.run_sync(svc.desired.state, choice)
        svc.metrics.polls_200.inc()
        return Response(state.model_dump_json(), media_type="application/json", headers={"ETag": choice.etag})

    @v1.post("/devices/enroll", tags=["devices"])
    def enroll(body: DeviceEnroll) -> DeviceEnrolled:
        token = svc.devices.enroll(body)
        return DeviceEnrolled(
            device_id=body.device_id, device_token=token, poll_interval_s=svc.settings.poll_interval_s
        )

    @v1.post("/devices/{device_id}/reports", tags=["devices"])
    def report(device_id: CurrentDevice, body: DeviceReport) -> ReportAccepted:
        svc.devices.report(device_id, body)
        svc.metrics.reports.inc()
        for event in body.events:
            svc.metrics.report_events.labels(event.state.value, str(event.ok).lower()).inc()
        return ReportAccepted(events=len(body.events), telemetry=body.telemetry is not None)

    @v1.get("/devices", tags=["devices"])
    def list_devices(
        actor: Operator,
        label: Annotated[list[str] | None, Query(description="key=value; repeat to require several")] = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
        offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
    ) -> DeviceList:
        wanted: dict[str, str] = {}
        for item in label or []:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise InvalidRequestError(f"label filter {item!r} is not key=value")
            wanted[key] = value
        devices, total = svc.devices.list(label=wanted, limit=limit, offset=offset)
        return DeviceList(devices=devices, total=total)

    @v1.get("/devices/{device_id}", tags=["devices"])
    def device_detail(
        actor: Operator,
        device_id: Annotated[DeviceId, Path()],
        model: Annotated[str | None, Query(max_length=256, description="with version: can it run this?")] = None,
        version: Annotated[VersionText | None, Query()] = None,
    ) -> DeviceDetail:
        if (model is None) != (version is None):
            raise InvalidRequestError("give both model and version to check compatibility, or neither")
        return svc.devices.detail(device_id, model=model, version=version)

    # -- rollouts --------------------------------------------------------------------------------------------

    @v1.post("/rollouts", tags=["rollouts"], status_code=201)
    def create_rollout(actor: Operator, body: RolloutCreate) -> RolloutDetail:
        return _detail(svc.rollouts.create(body, actor=actor))

    @v1.get("/rollouts", tags=["rollouts"])
    def list_rollouts(
        actor: Operator,
        model: Annotated[str | None, Query(max_length=256)] = None,
        state: Annotated[RolloutState | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> RolloutList:
        found = svc.rollouts.find(model=model, state=state.value if state else None, limit=limit)
        return RolloutList(rollouts=[_public(r) for r in found])

    @v1.get("/rollouts/{rollout_id}", tags=["rollouts"])
    def show_rollout(actor: Operator, rollout_id: RolloutId) -> RolloutDetail:
        return _detail(svc.rollouts.get(rollout_id))

    @v1.get("/rollouts/{rollout_id}/telemetry", tags=["rollouts"])
    def rollout_telemetry(
        actor: Operator,
        rollout_id: RolloutId,
        limit: Annotated[int, Query(ge=1, le=1000, description="windows per arm, newest first")] = 200,
    ) -> RolloutTelemetryPublic:
        rollout = svc.rollouts.get(rollout_id)
        with svc.rollouts.session() as session:
            return recent_windows(session, rollout, limit=limit)

    def control_route(action: str) -> None:
        def control(actor: Operator, rollout_id: RolloutId, body: RolloutAction | None = None) -> RolloutDetail:
            reason = body.reason if body else ""
            return _detail(svc.rollouts.control(rollout_id, action, actor=actor, reason=reason))

        control.__name__ = f"{action}_rollout"
        v1.post(f"/rollouts/{{rollout_id}}/{action}", tags=["rollouts"], name=f"{action}_rollout")(control)

    for action in CONTROL_ACTIONS:
        control_route(action)

    @v1.get("/audit", tags=["rollouts"])
    def audit_log(
        actor: Operator,
        rollout_id: Annotated[int | None, Query(ge=1, le=2**62)] = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 200,
    ) -> AuditList:
        query = sa.select(AuditRecord).order_by(AuditRecord.id.desc()).limit(limit)
        if rollout_id is not None:
            query = query.where(AuditRecord.rollout_id == rollout_id)
        with svc.rollouts.session() as session:
            rows = session.execute(query).scalars().all()
            return AuditList(entries=[AuditEntry.model_validate(r, from_attributes=True) for r in rows])

    @v1.get("/promotions", tags=["rollouts"])
    def promotions(actor: Operator, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> PromotionList:
        with svc.rollouts.session() as session:
            rows = session.execute(sa.select(Promotion).order_by(Promotion.id.desc()).limit(limit)).scalars().all()
            return PromotionList(promotions=[PromotionPublic.model_validate(r, from_attributes=True) for r in rows])

    @v1.post(WEBHOOK_PATH.removeprefix("/v1"), tags=["service"], include_in_schema=False)
    async def mlflow_webhook(request: Request) -> dict[str, str]:
        secret = svc.settings.webhook_key
        body = await request.body()
        if secret is None or len(body) > _MAX_WEBHOOK_BYTES:
            svc.metrics.webhooks.labels("refused").inc()
            raise InvalidRequestError(
                "webhooks are not configured here" if secret is None else "webhook body too large"
            )
        try:
            payload = verify_webhook(secret, request.headers, body)
        except Exception:
            svc.metrics.webhooks.labels("bad_signature").inc()
            raise
        outcome = await anyio.to_thread.run_sync(svc.promotions.on_webhook, payload)
        svc.metrics.webhooks.labels("accepted").inc()
        return {"outcome": outcome}

    app.include_router(v1)

    def _public(rollout: RolloutView) -> RolloutPublic:
        return RolloutPublic.model_validate(
            {name: getattr(rollout, name) for name in RolloutPublic.model_fields}, from_attributes=False
        )

    def _detail(rollout: RolloutView) -> RolloutDetail:
        with svc.rollouts.session() as session:
            progress = svc.rollouts.progress(session, rollout)
            arms = arm_telemetry(session, rollout, progress)
        halted = rollout.current_wave if rollout.state == RolloutState.halted else None
        return RolloutDetail(
            **_public(rollout).model_dump(),
            targeted=progress.targeted,
            skipped_incompatible=sum(progress.skipped.values()),
            incompatible_reasons=dict(progress.skipped),
            wave_progress=wave_progress(rollout, progress, halted),
            arms=arms if rollout.strategy == "ab" or rollout.control_version else arms[:1],
        )


_DESIRED_HEADERS = [
    {
        "name": "authorization",
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": "Bearer <device token>",
    },
    {
        "name": "if-none-match",
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": "the ETag of the last answer: 304 when nothing changed",
    },
]


def _etags(header: str) -> set[str]:
    return {part.strip().removeprefix("W/") for part in header.split(",")}
