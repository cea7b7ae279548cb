"""Request and response bodies of the access routes: operator tokens, enrollment tokens, device decisions."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from registry.rollout_service.token_entries import Scope

TokenName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
IdPattern = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9._:*?\[\]!-]+$")]
_YEAR_S = 366 * 24 * 3600


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OperatorTokenCreate(_Body):
    name: TokenName
    scope: Scope
    expires_in_s: float | None = Field(default=None, gt=0, le=10 * _YEAR_S)  # none: until revoked


class EnrollmentTokenCreate(_Body):
    name: TokenName
    auto_accept: IdPattern | None = None  # shell pattern of device ids accepted at once; none: every id waits
    expires_in_s: float | None = Field(default=None, gt=0, le=10 * _YEAR_S)


class TokenCreated(BaseModel):
    """The token itself, shown this once: only its sha256 is kept."""

    name: str
    token: str


class _TokenPublic(BaseModel):
    name: str
    source: str  # setting | api
    created_at: datetime
    created_by: str | None
    expires_at: datetime | None
    revoked_at: datetime | None
    active: bool


class OperatorTokenPublic(_TokenPublic):
    scope: Scope


class EnrollmentTokenPublic(_TokenPublic):
    auto_accept: str | None


class OperatorTokenList(BaseModel):
    tokens: list[OperatorTokenPublic]


class EnrollmentTokenList(BaseModel):
    tokens: list[EnrollmentTokenPublic]


class DeviceDecision(BaseModel):
    device_id: str
    action: str  # accept | reject | decommission
    done: str
