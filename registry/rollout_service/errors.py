"""Errors of the rollout service. The REST layer maps each kind to one status code in one handler::

RolloutServiceError           base; ``status`` is the HTTP status the REST layer answers with
├── ServiceSettingsError      the settings are unusable (no secrets outside dev mode, bad config file)
├── NotAuthenticatedError     401: no token, or a token that is not known
├── ForbiddenError            403: a known token asking for something that is not its own
├── NotFoundError             404: no such device, rollout or model version
├── ConflictError             409: the request contradicts the current state (e.g. resume a completed rollout)
├── InvalidRequestError       422: well-formed but unusable (a version whose gates failed, bad waves)
└── UpstreamUnavailableError  503: MLflow did not answer (retryable)
"""

from __future__ import annotations


class RolloutServiceError(Exception):
    """Base of the rollout service's errors."""

    status: int = 500
    retryable: bool = False


class ServiceSettingsError(RolloutServiceError):
    """The service cannot start with these settings."""


class NotAuthenticatedError(RolloutServiceError):
    status = 401


class ForbiddenError(RolloutServiceError):
    status = 403


class NotFoundError(RolloutServiceError):
    status = 404


class ConflictError(RolloutServiceError):
    status = 409


class InvalidRequestError(RolloutServiceError):
    status = 422


class UpstreamUnavailableError(RolloutServiceError):
    status = 503
    retryable = True
