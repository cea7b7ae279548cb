"""Access routes (the ``admin`` scope): operator tokens, enrollment tokens, and the decisions on devices.

A token is shown once, in the answer that makes it; the service keeps only its sha256. A revocation or a
decommission bumps the state generation, so it takes effect on every replica within the state-check interval.
"""

# No "from __future__ import annotations": FastAPI reads the route annotations as objects.

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Path

from registry.rollout_service.access_schemas import (
    DeviceDecision,
    EnrollmentTokenCreate,
    EnrollmentTokenList,
    EnrollmentTokenPublic,
    OperatorTokenCreate,
    OperatorTokenList,
    OperatorTokenPublic,
    TokenCreated,
    TokenName,
)
from registry.rollout_service.api.deps import AdminOperator, ServiceDep
from registry.rollout_service.api.problems import V1_RESPONSES
from registry.rollout_service.schemas import DeviceId

router = APIRouter(prefix="/v1", tags=["access"], responses=V1_RESPONSES)
NamePath = Annotated[TokenName, Path()]


@router.get("/tokens")
def list_operator_tokens(operator: AdminOperator, service: ServiceDep) -> OperatorTokenList:
    views = service.operators.views()
    return OperatorTokenList(tokens=[OperatorTokenPublic(**asdict(t), active=t.active) for t in views])


@router.post("/tokens", status_code=201)
def create_operator_token(operator: AdminOperator, service: ServiceDep, body: OperatorTokenCreate) -> TokenCreated:
    token = service.operators.create(body.name, body.scope, actor=operator.actor, expires_in_s=body.expires_in_s)
    return TokenCreated(name=body.name, token=token)


@router.post("/tokens/{name}/revoke")
def revoke_operator_token(operator: AdminOperator, service: ServiceDep, name: NamePath) -> dict[str, int]:
    return {"revoked": service.operators.revoke(name, actor=operator.actor)}


@router.get("/enrollment-tokens")
def list_enrollment_tokens(operator: AdminOperator, service: ServiceDep) -> EnrollmentTokenList:
    views = service.enrollment_tokens.views()
    return EnrollmentTokenList(tokens=[EnrollmentTokenPublic(**asdict(t), active=t.active) for t in views])


@router.post("/enrollment-tokens", status_code=201)
def create_enrollment_token(operator: AdminOperator, service: ServiceDep, body: EnrollmentTokenCreate) -> TokenCreated:
    token = service.enrollment_tokens.create(
        body.name, actor=operator.actor, auto_accept=body.auto_accept, expires_in_s=body.expires_in_s
    )
    return TokenCreated(name=body.name, token=token)


@router.post("/enrollment-tokens/{name}/revoke")
def revoke_enrollment_token(operator: AdminOperator, service: ServiceDep, name: NamePath) -> dict[str, int]:
    service.enrollment_tokens.revoke(name, actor=operator.actor)
    return {"revoked": 1}


_DECISIONS = ("accept", "reject", "decommission")


def _decision_route(action: str) -> None:
    """``POST /v1/devices/{device_id}/<action>``: one route (and one OpenAPI operation) per decision."""

    def decision(
        operator: AdminOperator, service: ServiceDep, device_id: Annotated[DeviceId, Path()]
    ) -> DeviceDecision:
        identity = service.identity
        decide = {"accept": identity.accept, "reject": identity.reject, "decommission": identity.decommission}[action]
        return DeviceDecision(device_id=device_id, action=action, done=decide(device_id, actor=operator.actor))

    decision.__name__ = f"{action}_device"
    router.post(f"/devices/{{device_id}}/{action}", name=f"{action}_device")(decision)


for _action in _DECISIONS:
    _decision_route(_action)
