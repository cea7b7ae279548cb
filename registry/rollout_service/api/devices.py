"""Device routes: enrollment, the poll for the desired state, reports, and what operators see of devices."""

# No "from __future__ import annotations": FastAPI reads the route annotations as objects.

from typing import Annotated

import anyio
from fastapi import APIRouter, Path, Query, Request, Response

from registry.rollout_service.api.deps import CurrentDevice, CurrentOperator, ServiceDep, service_of
from registry.rollout_service.api.problems import V1_RESPONSES
from registry.rollout_service.auth import bearer, check_device
from registry.rollout_service.errors import InvalidRequestError
from registry.rollout_service.report_schemas import DeviceReport, ReportAccepted
from registry.rollout_service.schemas import (
    DesiredState,
    DeviceDetail,
    DeviceEnroll,
    DeviceEnrolled,
    DeviceId,
    DeviceList,
    DeviceStatus,
    VersionText,
)

router = APIRouter(prefix="/v1", tags=["devices"], responses=V1_RESPONSES)

# The poll's headers, read by hand below, as the OpenAPI document shows them.
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


# First among the routes: it is the one every device calls every poll interval.
@router.get(
    "/devices/{device_id}/desired",
    response_model=DesiredState,
    responses={304: {"description": "unchanged since the ETag given in If-None-Match"}},
    openapi_extra={"parameters": _DESIRED_HEADERS},
)
async def desired(device_id: Annotated[DeviceId, Path()], request: Request) -> Response:
    # Headers are read by hand rather than declared as parameters, and the service is taken from the request
    # rather than through a dependency: this is the hot path, and FastAPI's per-parameter machinery costs more
    # than the rest of the unchanged answer. The headers are documented above.
    svc = service_of(request)
    token = bearer(request.headers.get("authorization"))
    if not svc.devices.is_cached_token(device_id, token):
        await anyio.to_thread.run_sync(check_device, svc.devices, device_id, token)
    svc.devices.seen(device_id)
    choice = svc.desired.cached_choice(device_id)
    if choice is None:
        choice = await anyio.to_thread.run_sync(svc.desired.choice, device_id)
    etag = svc.desired.etag(choice)
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None and etag in _etags(if_none_match):
        svc.metrics.polls_304.inc()
        return Response(status_code=304, headers={"ETag": etag})
    state = await anyio.to_thread.run_sync(svc.desired.state, device_id, choice)
    svc.metrics.polls_200.inc()
    return Response(state.model_dump_json(), media_type="application/json", headers={"ETag": state.etag})


@router.post(
    "/devices/enroll",
    responses={202: {"model": DeviceEnrolled, "description": "waits for an operator: no token yet"}},
)
def enroll(body: DeviceEnroll, service: ServiceDep, request: Request, response: Response) -> DeviceEnrolled:
    """Open (no operator token): the body is signed by the device's key; a new id also needs an enrollment token.
    A device enrolled before it had a key shows its current device token as ``Authorization: Bearer``."""
    authorization = request.headers.get("authorization")
    current = bearer(authorization) if authorization else None
    outcome = service.identity.enroll(body, bearer_token=current)
    if outcome.token is None:
        response.status_code = 202
    return DeviceEnrolled(
        device_id=body.device_id,
        status=outcome.status,
        device_token=outcome.token,
        poll_interval_s=service.settings.poll_interval_s,
        reason=outcome.reason,
        state_key=service.signer.public_key,
    )


@router.post("/devices/{device_id}/reports")
def report(device: CurrentDevice, body: DeviceReport, service: ServiceDep) -> ReportAccepted:
    service.devices.report(device.device_id, body)
    service.metrics.reports.inc()
    for event in body.events:
        service.metrics.report_events.labels(event.state.value, str(event.ok).lower()).inc()
    return ReportAccepted(events=len(body.events), telemetry=body.telemetry is not None)


@router.get("/devices")
def list_devices(
    operator: CurrentOperator,
    service: ServiceDep,
    label: Annotated[list[str] | None, Query(description="key=value; repeat to require several")] = None,
    status: Annotated[DeviceStatus | None, Query()] = None,
    waiting: Annotated[bool, Query(description="only devices waiting for an operator's decision")] = False,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> DeviceList:
    devices, total = service.devices.list(
        label=_label_filter(label or []), status=status, waiting=waiting, limit=limit, offset=offset
    )
    return DeviceList(devices=devices, total=total)


@router.get("/devices/{device_id}")
def device_detail(
    operator: CurrentOperator,
    service: ServiceDep,
    device_id: Annotated[DeviceId, Path()],
    model: Annotated[str | None, Query(max_length=256, description="with version: can it run this?")] = None,
    version: Annotated[VersionText | None, Query()] = None,
) -> DeviceDetail:
    if (model is None) != (version is None):
        raise InvalidRequestError("give both model and version to check compatibility, or neither")
    return service.devices.detail(device_id, model=model, version=version)


def _label_filter(items: list[str]) -> dict[str, str]:
    """``["line=3", "site=a"]`` as ``{"line": "3", "site": "a"}``; 422 for an item that is not key=value."""
    wanted: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidRequestError(f"label filter {item!r} is not key=value")
        wanted[key] = value
    return wanted


def _etags(header: str) -> set[str]:
    return {part.strip().removeprefix("W/") for part in header.split(",")}
