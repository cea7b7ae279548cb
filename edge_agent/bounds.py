"""Bounds on what the rollout service sends: the agent trusts the service to name versions, not to size its device.

A compromised or buggy service (or whoever sits between it and the device) must not make a device poll in a tight
loop, fill its disk with a bundle of any size or any number of files, write names longer than a path may be, or
fetch from URLs that are not http(s). What cannot be bounded by the protocol's own fields (``edge_agent.protocol``
bounds ``DesiredFile`` and ``Enrolled``) is bounded here:

    clamp_poll_interval_s   the service's poll period, clamped to [min_poll_interval_s, max_poll_interval_s]
    check_desired           names and the ETag short enough to be path components and headers (at each poll)
    check_offer             the number of files, their total bytes and the manifest/signature URLs (before any
                            byte is fetched: ``OfferRefused``, reported like any refusal)
"""

from __future__ import annotations

import logging

from edge_agent.errors import OfferRefused, ServiceAnswerError
from edge_agent.protocol import DesiredState

log = logging.getLogger(__name__)

MAX_NAME_CHARS = 200  # model, version, variant: each becomes a path component (255 bytes on most filesystems)
MAX_ETAG_CHARS = 1024  # sent back as If-None-Match
MAX_URL_CHARS = 8192  # presigned S3 URLs with a session token run to a few KB
DEFAULT_MAX_BUNDLE_BYTES = 4 << 30
DEFAULT_MAX_BUNDLE_FILES = 64


def clamp_poll_interval_s(asked_s: float, minimum_s: float, maximum_s: float) -> float:
    """The service's poll period within [minimum_s, maximum_s]; logged when it had to be moved."""
    clamped = min(max(float(asked_s), minimum_s), maximum_s)
    if clamped != asked_s:
        log.warning(
            "the service asked for a poll every %s s; polling every %s s (min_poll_interval_s %s, max_poll_interval_s"
            " %s)",
            asked_s,
            clamped,
            minimum_s,
            maximum_s,
        )
    return clamped


def check_desired(desired: DesiredState) -> None:
    """``ServiceAnswerError`` when a name or the ETag of a desired state is too long to be used as it is."""
    for field, limit in (("model", MAX_NAME_CHARS), ("version", MAX_NAME_CHARS), ("variant", MAX_NAME_CHARS),
                         ("etag", MAX_ETAG_CHARS)):  # fmt: skip
        value = getattr(desired, field)
        if value is not None and len(value) > limit:
            raise ServiceAnswerError(
                f"the desired state's {field} is {len(value)} characters long (at most {limit}): ignored"
            )


def check_offer(desired: DesiredState, *, max_bundle_bytes: int, max_bundle_files: int) -> None:
    """``OfferRefused`` when the offer has more files or bytes than this device takes, or a URL that is not
    http(s); nothing has been fetched yet."""
    if len(desired.files) > max_bundle_files:
        raise OfferRefused(
            f"the offer lists {len(desired.files)} files; max_bundle_files is {max_bundle_files}: nothing was fetched"
        )
    total = sum(f.bytes for f in desired.files)
    if total > max_bundle_bytes:
        raise OfferRefused(
            f"the offer's files add up to {total} bytes ({total / 1e6:.1f} MB); max_bundle_bytes is "
            f"{max_bundle_bytes} ({max_bundle_bytes / 1e6:.1f} MB): nothing was fetched"
        )
    paths = [f.path for f in desired.files]
    if len(set(paths)) != len(paths):
        raise OfferRefused("the offer lists one path twice: nothing was fetched")
    for what, url in (("manifest_url", desired.manifest_url), ("signature_url", desired.signature_url)):
        if url is not None:
            check_url(url, what)


def check_url(url: str, what: str) -> None:
    """``OfferRefused`` unless ``url`` is an http(s) URL of at most ``MAX_URL_CHARS``."""
    if len(url) > MAX_URL_CHARS:
        raise OfferRefused(f"{what} is {len(url)} characters long (at most {MAX_URL_CHARS})")
    if not url.startswith(("http://", "https://")):
        raise OfferRefused(f"{what} is not an http(s) URL: {url[:80]!r}")
