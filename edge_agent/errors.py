"""Errors of the edge agent. Each says whether trying again can help (``retryable``)::

AgentError
├── AgentSettingsError      bad settings or data dir; fix and restart            (not retryable)
├── StateError              a transition the table lacks, or an unreadable saved state (not retryable)
├── ModelOutputError        the serving model answered NaN or infinite values    (not retryable)
├── ServiceAnswerError      the rollout service did not give a usable answer
│   ├── ServiceUnavailable  unreachable, timed out, 5xx: back off and poll again  (retryable)
│   ├── EnrollmentPending   enrolled, waiting for an operator to accept this key  (retryable)
│   ├── EnrollmentRefused   wrong enrollment token, retired id, bad proof         (not retryable)
│   └── DesiredStateRefused an answer the agent must not act on: unsigned or not by the pinned key, another
│                           device's, an older generation, expired; the agent keeps serving and polls again
├── UpdateRejected          this version must not run here; report why, keep serving (not retryable)
│   ├── VerificationFailed  digest, signature, fingerprint or unsafe path
│   ├── ValidationFailed    load, detection parity, latency budget or memory headroom on this device
│   ├── ShadowFailed        the candidate disagrees with the serving model on this device's frames
│   ├── ProbationFailed     errors, NaN/inf outputs or latency after the swap
│   ├── ReleaseRefused      another product line's bundle, an older release without an operator's order, a
│   │                       revoked version, failed gates without a recorded force
│   └── OfferRefused        beyond this agent's bounds: too many files or bytes, a redirect to another origin
├── DownloadFailed          a file could not be fetched completely               (retryable)
│   └── DiskSpaceError      the staging disk would run out, or ran out (ENOSPC) mid-download: reported as failed,
│                           the offer dropped, not remembered as refused         (retryable once space is freed)
├── ValidationInterrupted   the agent stopped while validating: validate again   (retryable)
├── NoModelError            nothing validated to serve yet                       (retryable)
├── ImageRefused            a /v1/detect image over a local API limit (bytes, pixels) (not retryable)
└── DetectBusy              every /v1/detect slot is taken: 503 with Retry-After  (retryable)
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of the agent's errors."""

    retryable = False


class AgentSettingsError(AgentError):
    """Settings or the data dir are unusable."""


class StateError(AgentError):
    """A transition the table does not have, or a saved state that cannot be read."""


class ModelOutputError(AgentError):
    """The model answered with NaN or infinite values."""


class ServiceAnswerError(AgentError):
    """The rollout service did not give a usable answer."""


class ServiceUnavailable(ServiceAnswerError):
    """Unreachable, timed out or answering 5xx: the agent backs off and keeps serving."""

    retryable = True


class DesiredStateRefused(ServiceAnswerError):
    """The poll's answer is not one the agent may act on (``edge_agent.trust``): it keeps what it serves."""


class EnrollmentPending(ServiceAnswerError):
    """The service holds this device's key for an operator to accept; the agent asks again every poll interval."""

    retryable = True


class EnrollmentRefused(ServiceAnswerError):
    """The service refused to enroll this device (enrollment token, a retired id, a proof it does not accept)."""


class UpdateRejected(AgentError):
    """The offered version must not run on this device; the agent reports why and keeps its model."""


class VerificationFailed(UpdateRejected):
    """A digest, the signature, the fingerprint or a path does not check out."""


class ValidationFailed(UpdateRejected):
    """The version does not load, match its golden detections, meet its latency budget or fit in memory here."""


class ShadowFailed(UpdateRejected):
    """On the frames this device serves (or its golden data), the candidate misses what the serving model finds."""


class ProbationFailed(UpdateRejected):
    """The version misbehaved after the swap."""


class ReleaseRefused(UpdateRejected):
    """The signed bundle is not one this device may install on the orders it has (``edge_agent.release_checks``)."""


class OfferRefused(UpdateRejected):
    """The offer is beyond this agent's bounds (files, bytes, URLs) or a download left its origin."""


class DownloadFailed(AgentError):
    """A file could not be fetched completely; the partial file is kept for a resume."""

    retryable = True


class DiskSpaceError(DownloadFailed):
    """The staging disk would run out, or ran out during the download (the partial file is removed then)."""


class ValidationInterrupted(AgentError):
    """The agent was stopped during validation; the saved state makes the next start validate again."""

    retryable = True


class NoModelError(AgentError):
    """No validated model is loaded yet."""

    retryable = True


class ImageRefused(AgentError):
    """An image sent to the local API is over one of its limits (body bytes, pixels read from its header)."""


class DetectBusy(AgentError):
    """Every ``/v1/detect`` slot is taken (``max_concurrent_decodes``): answered 503 with Retry-After."""

    retryable = True
