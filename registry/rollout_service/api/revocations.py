"""Revocation routes: the latest list (any operator scope) and a new one, signed by the release key (``operate``).

The list itself is made and signed offline (``yolo-ota revoke``); the service only checks and keeps it, refuses
rollouts of what it revokes, and hands it to devices with their desired state.
"""

# No "from __future__ import annotations": FastAPI reads the route annotations as objects.

from fastapi import APIRouter

from exporters.signed_documents import SignedDocument
from registry.rollout_service.api.deps import CurrentOperator, OperatingOperator, ServiceDep
from registry.rollout_service.api.problems import V1_RESPONSES
from registry.rollout_service.schemas import RevocationsPublic

router = APIRouter(prefix="/v1", tags=["revocations"], responses=V1_RESPONSES)


@router.get("/revocations")
def latest_revocations(operator: CurrentOperator, service: ServiceDep) -> RevocationsPublic:
    current = service.desired.revocations
    return RevocationsPublic(
        sequence=current.revocations.sequence, revoked=list(current.revocations.revoked), signed=current.signed
    )


@router.put("/revocations")
def publish_revocations(operator: OperatingOperator, service: ServiceDep, body: SignedDocument) -> RevocationsPublic:
    """A new list, signed with the release key: a higher sequence than the latest, every earlier entry kept."""
    revocations = service.revocations.publish(body, actor=operator.actor)
    return RevocationsPublic(sequence=revocations.sequence, revoked=list(revocations.revoked), signed=body)
