"""Errors of the rollout service. The REST layer maps each kind to one status code in one handler::

ServiceError                  base; ``status`` is the HTTP status the REST layer answers with
├── ConfigurationError        the settings are unusable (no secrets outside dev mode, bad config file)
├── NotAuthenticatedError     401: no token, or a token that is not known
├── ForbiddenError            403: a known token asking for something that is not its own
├── NotFoundError             404: no such device, rollout or model version
├── ConflictError             409: the request contradicts the current state (e.g. resume a completed rollout)
├── InvalidRequestError       422: well-formed but unusable (a version whose gates failed, bad waves)
└── UpstreamUnavailableError  503: MLflow did not answer (retryable)
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of the rollout service's errors."""

    status: int = 500
    retryable: bool = False


class ConfigurationError(ServiceError):
    """The service cannot start with these settings."""


class NotAuthenticatedError(ServiceError):
    status = 401


class ForbiddenError(ServiceError):
    status = 403


class NotFoundError(ServiceError):
    status = 404


class ConflictError(ServiceError):
    status = 409


class InvalidRequestError(ServiceError):
    status = 422


class UpstreamUnavailableError(ServiceError):
    status = 503
    retryable = True
