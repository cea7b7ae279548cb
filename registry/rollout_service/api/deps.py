"""The dependencies routes take, read as types:

- ``ServiceDep``: the app's ``Service`` (``app.state.service``, built by ``create_app``).
- ``CurrentOperator``: the ``Operator`` whose bearer token checked out (any scope: reading); 401 otherwise.
- ``OperatingOperator`` and ``AdminOperator``: the same, with the ``operate`` or ``admin`` scope; 403 without.
- ``CurrentDevice``: the ``AuthenticatedDevice`` named by the path's ``device_id``, by its own token; 401 for an
  unknown token, 403 for another device's.
- ``RolloutId``: the path's rollout id.

The device poll (``GET /v1/devices/{device_id}/desired``) takes none of them: it is the hot path, and reads its
headers and ``service_of(request)`` by hand.
"""

# No "from __future__ import annotations": FastAPI reads these annotations as objects when routes are declared.

from typing import Annotated

from fastapi import Depends, Header, Path, Request

from registry.rollout_service.auth import AuthenticatedDevice, Operator, bearer, check_device
from registry.rollout_service.schemas import DeviceId
from registry.rollout_service.service import Service
from registry.rollout_service.token_entries import Scope

__all__ = [
    "AdminOperator",
    "CurrentDevice",
    "CurrentOperator",
    "OperatingOperator",
    "RolloutId",
    "ServiceDep",
    "service_of",
]


def service_of(request: Request) -> Service:
    """The ``Service`` of the app serving ``request``."""
    service: Service = request.app.state.service
    return service


async def _service(request: Request) -> Service:
    # async: FastAPI would run a plain function in a worker thread, for one attribute read
    return service_of(request)


ServiceDep = Annotated[Service, Depends(_service)]


async def current_operator(service: ServiceDep, authorization: Annotated[str | None, Header()] = None) -> Operator:
    """The operator holding the request's bearer token (checked in memory, so on the event loop)."""
    return service.operators.authenticate(bearer(authorization))


CurrentOperator = Annotated[Operator, Depends(current_operator)]


async def operating_operator(operator: CurrentOperator) -> Operator:
    return operator.require(Scope.operate)


async def admin_operator(operator: CurrentOperator) -> Operator:
    return operator.require(Scope.admin)


OperatingOperator = Annotated[Operator, Depends(operating_operator)]
AdminOperator = Annotated[Operator, Depends(admin_operator)]


def current_device(
    service: ServiceDep,
    device_id: Annotated[DeviceId, Path()],
    authorization: Annotated[str | None, Header()] = None,
) -> AuthenticatedDevice:
    """The device of the path, if the request's token is its own (a token not cached may cost a database read)."""
    return check_device(service.devices, device_id, bearer(authorization))


CurrentDevice = Annotated[AuthenticatedDevice, Depends(current_device)]
RolloutId = Annotated[int, Path(ge=1, le=2**62)]
