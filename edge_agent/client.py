"""Talking to the rollout service: enrollment (signed by the device's own key, ``device-key.pem``; the device
token it gives is kept in the data dir), desired state with its ETag, and reports. Every failure becomes an
``edge_agent.errors`` error that says whether to retry.

An id the service does not know yet needs the enrollment token; it may then wait for an operator (202), and the
agent asks again every poll interval, serving what it has meanwhile. A device that already has a token but made
its key only now (it was enrolled before devices had keys) enrolls once with both, so the service takes its key.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx

from edge_agent.errors import (
    AgentSettingsError,
    EnrollmentPending,
    EnrollmentRefused,
    ServiceAnswerError,
    ServiceUnavailable,
)
from edge_agent.protocol import DesiredState, Enrolled, Report
from edge_agent.settings import AgentSettings
from edge_agent.trust import Trust
from exporters.device_identity import KEY_FILE, DeviceKey, enrollment_body
from exporters.errors import one_line
from exporters.files import atomic_write
from exporters.fingerprint import Fingerprint

log = logging.getLogger(__name__)

TOKEN_FILE = "device-token"


class ServiceClient:
    """One device's HTTP conversation with the rollout service."""

    def __init__(self, settings: AgentSettings, fingerprint: Fingerprint, trust: Trust) -> None:
        self._settings = settings
        self._fingerprint = fingerprint
        self._trust = trust  # pins the key the service signs desired states with, from the enrollment answer
        self._token_path = settings.data_dir / TOKEN_FILE
        self._http = httpx.Client(base_url=settings.server, timeout=settings.http_timeout_s)
        self._token: str | None = None
        had_key = (settings.data_dir / KEY_FILE).is_file()
        try:
            self._key = DeviceKey.load_or_create(settings.data_dir)
        except (OSError, ValueError) as exc:
            raise AgentSettingsError(f"device key in {settings.data_dir}: {one_line(exc)}") from None
        self._adopt_key = not had_key and self._token_path.is_file()  # enrolled before devices had keys

    def close(self) -> None:
        self._http.close()

    # -- enrollment ------------------------------------------------------------------------------------------

    @property
    def enrolled(self) -> bool:
        return self._load_token() is not None

    def _load_token(self) -> str | None:
        if self._token is None and self._token_path.is_file():
            self._token = self._token_path.read_text().strip() or None
        return self._token

    def enroll(self, *, show_token: bool = False) -> Enrolled:
        """Enroll with this device's key (and the enrollment token, if any) and keep the device token (mode 0600)
        for every later start; ``EnrollmentPending`` while an operator has not accepted the key."""
        body = enrollment_body(
            self._key,
            self._settings.device_id,
            fingerprint=self._fingerprint.model_dump(mode="json"),
            labels=self._settings.labels,
            enrollment_token=self._settings.enrollment_token,
        )
        response = self._send("POST", "/v1/devices/enroll", json=body, authorized=show_token)
        if response.status_code in (401, 403, 409, 422):
            hint = "" if self._settings.enrollment_token else " (no enrollment token was given)"
            raise EnrollmentRefused(f"enrollment refused ({response.status_code}): {_detail(response)}{hint}")
        _raise_for_status(response)
        enrolled = Enrolled.model_validate_json(response.content)
        if enrolled.device_token is None:
            raise EnrollmentPending(
                f"device {self._settings.device_id} waits for an operator to accept its key: {enrolled.reason}"
            )
        self._trust.pin(enrolled.state_key)  # before the token is kept: a service whose key differs gets nothing
        atomic_write(self._token_path, enrolled.device_token, mode=0o600)
        self._token = enrolled.device_token
        log.info("device %s enrolled with %s", self._settings.device_id, self._settings.server)
        return enrolled

    # -- desired state and reports ---------------------------------------------------------------------------

    def desired(self, etag: str | None) -> DesiredState | None:
        """The desired state, or None when it has not changed since ``etag`` (304)."""
        headers = {"If-None-Match": etag} if etag else {}
        response = self._authorized("GET", f"/v1/devices/{self._settings.device_id}/desired", headers=headers)
        if response.status_code == 304:
            return None
        _raise_for_status(response)
        return DesiredState.model_validate_json(response.content)

    def report(self, report: Report) -> None:
        """Deliver one report; raises ``ServiceUnavailable`` when it should be kept and sent again."""
        body = report.model_dump(mode="json", exclude_none=True)
        response = self._authorized("POST", f"/v1/devices/{self._settings.device_id}/reports", json=body)
        _raise_for_status(response)

    def _authorized(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        if self._load_token() is None:
            self.enroll()
        elif self._adopt_key:
            self._adopt_key = False
            try:
                self.enroll(show_token=True)
            except (EnrollmentPending, EnrollmentRefused) as exc:  # the token still works: go on with it
                log.warning("the service did not take this device's new key (%s); going on with its token", exc)
        response = self._send(method, path, **kwargs)
        if response.status_code in (401, 404):
            # The token was rotated, an operator accepted a new key, or the service lost this device: enroll
            # again once (the key proves who this is), then retry.
            log.warning("device token refused (%d): enrolling again", response.status_code)
            self._token = None
            self.enroll()
            response = self._send(method, path, **kwargs)
        return response

    def _send(self, method: str, path: str, *, authorized: bool = True, **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", None) or {})
        if authorized and self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        try:
            return self._http.request(method, path, headers=headers, **kwargs)
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(f"rollout service {self._settings.server}: {one_line(exc)}") from exc


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", response.text))[:300]
    except ValueError:
        return response.text[:300]


def _raise_for_status(response: httpx.Response) -> None:
    if response.status_code >= 500 or response.status_code == 429:
        raise ServiceUnavailable(f"rollout service answered {response.status_code}: {_detail(response)}")
    if response.status_code >= 400:
        raise ServiceAnswerError(
            f"rollout service refused {response.request.url.path} ({response.status_code}): {_detail(response)}"
        )
