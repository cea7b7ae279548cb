"""Rollout routes: create, list and show rollouts, their telemetry windows, and the operator's controls."""

# No "from __future__ import annotations": FastAPI reads the route annotations as objects.

from typing import Annotated

from fastapi import APIRouter, Query

from registry.rollout_service.analysis.public import AnalysisReport
from registry.rollout_service.api.deps import CurrentOperator, OperatingOperator, RolloutId, ServiceDep
from registry.rollout_service.api.problems import V1_RESPONSES
from registry.rollout_service.rollouts import CONTROL_ACTIONS
from registry.rollout_service.schemas import (
    RolloutAction,
    RolloutCreate,
    RolloutDetail,
    RolloutList,
    RolloutState,
    RolloutTelemetryPublic,
)

router = APIRouter(prefix="/v1", tags=["rollouts"], responses=V1_RESPONSES)


@router.post("/rollouts", status_code=201)
def create_rollout(operator: OperatingOperator, service: ServiceDep, body: RolloutCreate) -> RolloutDetail:
    return service.queries.detail(service.rollouts.create(body, actor=operator.actor))


@router.get("/rollouts")
def list_rollouts(
    operator: CurrentOperator,
    service: ServiceDep,
    model: Annotated[str | None, Query(max_length=256)] = None,
    state: Annotated[RolloutState | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> RolloutList:
    return service.queries.rollouts(model=model, state=state, limit=limit)


@router.get("/rollouts/{rollout_id}")
def show_rollout(operator: CurrentOperator, service: ServiceDep, rollout_id: RolloutId) -> RolloutDetail:
    return service.queries.rollout(rollout_id)


@router.get("/rollouts/{rollout_id}/telemetry")
def rollout_telemetry(
    operator: CurrentOperator,
    service: ServiceDep,
    rollout_id: RolloutId,
    limit: Annotated[int, Query(ge=1, le=1000, description="windows per arm, newest first")] = 200,
) -> RolloutTelemetryPublic:
    return service.queries.telemetry(rollout_id, limit=limit)


@router.get("/rollouts/{rollout_id}/analysis")
def rollout_analysis(
    operator: CurrentOperator,
    service: ServiceDep,
    rollout_id: RolloutId,
    limit: Annotated[int, Query(ge=1, le=1000, description="stored verdicts, newest first")] = 50,
) -> AnalysisReport:
    return service.queries.analysis(rollout_id, limit=limit)


def _control_route(action: str) -> None:
    """``POST /v1/rollouts/{rollout_id}/<action>``, one route (and one OpenAPI operation) per control."""

    def control(
        operator: OperatingOperator, service: ServiceDep, rollout_id: RolloutId, body: RolloutAction | None = None
    ) -> RolloutDetail:
        reason = body.reason if body else ""
        changed = service.rollouts.control(rollout_id, action, actor=operator.actor, reason=reason)
        return service.queries.detail(changed)

    control.__name__ = f"{action}_rollout"
    router.post(f"/rollouts/{{rollout_id}}/{action}", name=f"{action}_rollout")(control)


for _action in CONTROL_ACTIONS:
    _control_route(_action)
