"""Fetching an offered bundle into a staging folder: resumable, digest-checked, bounded by free disk space.

Only the files the service lists are fetched (the chosen variant, the CPU fallback, the golden data) plus
``manifest.json`` (its sha256 must be the one the service vouches for) and ``manifest.sig`` when signed. A cut
download resumes with an HTTP Range request where the server honours it, and starts over where it does not.
Finished files are kept, so a restart after a kill re-checks them instead of fetching them again.

What the service announces is bounded before anything is fetched (``edge_agent.bounds``: files, bytes, URLs).
Redirects are followed within the URL's own origin (scheme, host, port) only, at most ``MAX_REDIRECTS`` times: a
redirect elsewhere refuses the offer (``OfferRefused``), so the service's URLs decide where a device connects,
never a server on the way. A disk that fills up mid-download (ENOSPC) fails the download with the file's name;
its partial file is removed (``DiskSpaceError``).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import shutil
import threading
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from edge_agent.bounds import DEFAULT_MAX_BUNDLE_BYTES, DEFAULT_MAX_BUNDLE_FILES, check_offer
from edge_agent.errors import DiskSpaceError, DownloadFailed, OfferRefused, VerificationFailed
from edge_agent.protocol import DesiredFile, DesiredState
from exporters.bundle import MANIFEST_NAME, SIGNATURE_NAME, safe_join, sha256_file
from exporters.errors import UnsafePathError, one_line
from exporters.files import atomic_write, commit_file
from exporters.formats import FORMATS_NAME

log = logging.getLogger(__name__)

_CHUNK_BYTES = 1 << 16
_PROGRESS_EVERY_S = 2.0
_MAX_MANIFEST_BYTES = 16 << 20
DIGEST_RETRIES = 2  # a file that arrives altered twice is refused, not fetched forever
MAX_REDIRECTS = 5  # within one origin
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


Selector = Callable[[Path], set[str]]  # staging folder -> the offered paths to fetch


def staged_path(staging: Path, relative: str) -> Path:
    """``exporters.bundle.safe_join`` with the refusal as a ``VerificationFailed``."""
    try:
        return safe_join(staging, relative)
    except UnsafePathError as exc:
        raise VerificationFailed(f"refused: {exc}") from None


class OriginBasicAuth(httpx.Auth):
    """HTTP basic credentials sent to one origin (scheme, host, port) only.

    Bundle files come from MLflow's artifact proxy, which wants its login, or from presigned S3 URLs, which must
    carry no ``Authorization`` header at all; the service names the URLs, so the origin is fixed by the device's
    own settings, never by what the service answers.
    """

    def __init__(self, origin_url: str, username: str, password: str) -> None:
        self.origin = _origin(httpx.URL(origin_url))
        self._basic = httpx.BasicAuth(username, password)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if _origin(request.url) == self.origin:
            yield from self._basic.auth_flow(request)
        else:
            yield request


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, url.port or default


def _show_origin(url: httpx.URL) -> str:
    scheme, host, port = _origin(url)
    return f"{scheme}://{host}:{port}"


class Downloader:
    """Fetches bundles over HTTP with its own client (files come from MLflow or S3, not the rollout service)."""

    def __init__(
        self,
        *,
        attempts: int,
        min_free_bytes: int,
        timeout_s: float,
        stop: threading.Event | None = None,
        auth: httpx.Auth | None = None,
        max_bundle_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
        max_bundle_files: int = DEFAULT_MAX_BUNDLE_FILES,
    ) -> None:
        self._attempts = attempts
        self._min_free_bytes = min_free_bytes
        self._max_bundle_bytes = max_bundle_bytes
        self._max_bundle_files = max_bundle_files
        # Redirects are followed by ``_get``, which knows where they may lead.
        self._http = httpx.Client(timeout=timeout_s, follow_redirects=False, auth=auth)
        self._stop = stop or threading.Event()

    def close(self) -> None:
        self._http.close()

    def fetch(self, desired: DesiredState, staging: Path, select: Selector | None = None) -> None:
        """Stage the files of ``desired`` under ``staging``; raises ``UpdateRejected`` or ``DownloadFailed``.

        ``select``, called once ``manifest.json`` and ``formats.json`` are staged, names the offered files to
        fetch (the variants this device can run); the others are not downloaded. Default: every file.
        """
        if desired.manifest_url is None or desired.manifest_sha256 is None:
            raise VerificationFailed("the desired state names no manifest or manifest digest")
        check_offer(desired, max_bundle_bytes=self._max_bundle_bytes, max_bundle_files=self._max_bundle_files)
        targets = [(f, staged_path(staging, f.path)) for f in desired.files]  # refuse before writing anything
        try:
            self._fetch_all(desired, staging, targets, select)
        except OSError as exc:
            if exc.errno not in _DISK_FULL:
                raise
            raise DiskSpaceError(f"the disk is full ({_errno_name(exc)}) writing into {staging}") from None

    def _fetch_all(
        self, desired: DesiredState, staging: Path, targets: list[tuple[DesiredFile, Path]], select: Selector | None
    ) -> None:
        assert desired.manifest_url is not None and desired.manifest_sha256 is not None
        staging.mkdir(parents=True, exist_ok=True)
        if select is None:  # every offered file is needed: refuse before writing anything
            self._check_space(staging, targets)
        manifest = self._small(desired.manifest_url, "manifest")
        digest = hashlib.sha256(manifest).hexdigest()
        if digest != desired.manifest_sha256:
            vouched = desired.manifest_sha256[:12]
            raise VerificationFailed(
                f"{MANIFEST_NAME} has sha256 {digest[:12]}..., the service vouches for {vouched}..."
            )
        atomic_write(staging / MANIFEST_NAME, manifest)
        signature = staging / SIGNATURE_NAME
        if desired.signature_url:
            atomic_write(signature, self._small(desired.signature_url, "signature"))
        else:
            signature.unlink(missing_ok=True)
        if select is not None:
            for entry, path in targets:
                if entry.path == FORMATS_NAME:  # small, and it says which variant files this device needs
                    self._fetch_file(entry, path)
            wanted = select(staging)
            skipped = [entry.path for entry, _ in targets if entry.path not in wanted]
            if skipped:
                log.info("not downloading %s: this device does not run them", ", ".join(sorted(skipped)))
            targets = [(entry, path) for entry, path in targets if entry.path in wanted]
            self._check_space(staging, targets)
        total = sum(entry.bytes for entry, _ in targets)
        log.info("downloading %s v%s: %d files, %.1f MB", desired.model, desired.version, len(targets), total / 1e6)
        for entry, path in targets:
            self._fetch_file(entry, path)

    def _check_space(self, staging: Path, targets: list[tuple[DesiredFile, Path]]) -> None:
        needed = 0
        for entry, path in targets:
            if path.is_file() and path.stat().st_size == entry.bytes:
                continue
            part = _part(path)
            needed += entry.bytes - (part.stat().st_size if part.is_file() else 0)
        free = shutil.disk_usage(staging).free
        if needed + self._min_free_bytes > free:
            raise DiskSpaceError(
                f"the download needs {needed / 1e6:.1f} MB and {self._min_free_bytes / 1e6:.0f} MB must stay free, "
                f"but {staging} has {free / 1e6:.1f} MB free"
            )

    @contextmanager
    def _get(self, url: str, headers: dict[str, str] | None = None) -> Iterator[httpx.Response]:
        """A streamed GET of ``url`` after at most ``MAX_REDIRECTS`` redirects within its origin; ``OfferRefused``
        for a redirect to another origin (nothing is requested there)."""
        origin = _origin(httpx.URL(url))
        request = self._http.build_request("GET", url, headers=headers)
        for _ in range(MAX_REDIRECTS + 1):
            response = self._http.send(request, stream=True)
            target = response.next_request
            if target is None:
                try:
                    yield response
                finally:
                    response.close()
                return
            response.close()
            if _origin(target.url) != origin:
                raise OfferRefused(
                    f"{url[:200]} redirected ({response.status_code}) to another origin, "
                    f"{_show_origin(target.url)}: only redirects within {_show_origin(request.url)} are followed"
                )
            request = target
        raise OfferRefused(f"{url[:200]}: more than {MAX_REDIRECTS} redirects")

    def _small(self, url: str, what: str) -> bytes:
        last: Exception | None = None
        for attempt in range(self._attempts):
            try:
                with self._get(url) as response:
                    if response.status_code < 300:
                        return _read_at_most(response, _MAX_MANIFEST_BYTES, f"{what} at {url[:200]}")
                    if response.status_code < 500:
                        raise DownloadFailed(f"{what} at {url}: HTTP {response.status_code}")
                    last = DownloadFailed(f"{what}: HTTP {response.status_code}")
            except httpx.HTTPError as exc:
                last = exc
            self._pause(attempt)
        raise DownloadFailed(
            f"{what} could not be fetched after {self._attempts} attempts: {one_line(last or Exception())}"
        )

    def _fetch_file(self, entry: DesiredFile, path: Path) -> None:
        if path.is_file() and path.stat().st_size == entry.bytes and sha256_file(path) == entry.sha256:
            log.info("%s already staged", entry.path)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        part = _part(path)
        mismatches = 0
        for attempt in range(self._attempts):
            try:
                self._transfer(entry, part)
            except httpx.HTTPError as exc:
                have = part.stat().st_size if part.is_file() else 0
                log.warning("%s cut at %d of %d bytes (%s); will resume", entry.path, have, entry.bytes, one_line(exc))
                self._pause(attempt)
                continue
            except _Retry as retry:
                log.warning("%s: %s", entry.path, retry)
                self._pause(attempt)
                continue
            size = part.stat().st_size
            actual = sha256_file(part) if size == entry.bytes else None
            if actual == entry.sha256:
                commit_file(part, path)
                return
            part.unlink(missing_ok=True)
            mismatches += 1
            detail = f"sha256 {actual[:12]}..." if actual else f"{size} bytes"
            if mismatches >= DIGEST_RETRIES:
                raise VerificationFailed(
                    f"{entry.path} arrived with {detail}, expected sha256 {entry.sha256[:12]}... and {entry.bytes} "
                    f"bytes ({mismatches} times): digest mismatch"
                )
            log.warning("%s arrived with %s, not the expected digest: fetching it again", entry.path, detail)
        raise DownloadFailed(f"{entry.path} could not be fetched completely after {self._attempts} attempts")

    def _transfer(self, entry: DesiredFile, part: Path) -> None:
        """One request: append to ``part`` from where it stopped (Range), or start over when the server ignores it."""
        offset = part.stat().st_size if part.is_file() else 0
        if offset >= entry.bytes:
            part.unlink(missing_ok=True)
            offset = 0
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        with self._get(entry.url, headers) as response:
            if response.status_code == 206 and response.headers.get("content-range", "").startswith(f"bytes {offset}-"):
                mode = "ab"
                log.info("%s: resuming at byte %d of %d", entry.path, offset, entry.bytes)
            elif response.status_code == 200:
                mode, offset = "wb", 0
            elif response.status_code >= 500 or response.status_code in (416, 429):
                if response.status_code == 416:
                    part.unlink(missing_ok=True)
                raise _Retry(f"HTTP {response.status_code}")
            else:
                raise DownloadFailed(f"{entry.path} at {entry.url}: HTTP {response.status_code}")
            self._copy(response, part, mode, offset, entry)

    def _copy(self, response: httpx.Response, part: Path, mode: str, offset: int, entry: DesiredFile) -> None:
        written = offset
        reported = time.monotonic()
        try:
            with part.open(mode) as handle:
                for chunk in response.iter_bytes(_CHUNK_BYTES):
                    if self._stop.is_set():
                        raise DownloadFailed("the agent is stopping")
                    handle.write(chunk)
                    written += len(chunk)
                    if written > entry.bytes:
                        break  # more than announced: the digest check will refuse it
                    if time.monotonic() - reported >= _PROGRESS_EVERY_S:
                        reported = time.monotonic()
                        log.info("%s: %.0f%% (%d of %d bytes)", entry.path, 100 * written / entry.bytes, written,
                                 entry.bytes)  # fmt: skip
        except OSError as exc:
            if exc.errno not in _DISK_FULL:
                raise
            # A full disk does not empty itself: keeping the part for a resume would only keep the disk full.
            part.unlink(missing_ok=True)
            free = shutil.disk_usage(part.parent).free
            raise DiskSpaceError(
                f"the disk is full ({_errno_name(exc)}) writing {entry.path} into {part.parent} at about byte "
                f"{written} of {entry.bytes} ({free} bytes free there now); the partial file {part.name} was removed"
            ) from None
        log.info("%s: %d of %d bytes", entry.path, written, entry.bytes)

    def _pause(self, attempt: int) -> None:
        self._stop.wait(min(0.2 * 2**attempt, 5.0))


class _Retry(Exception):
    """A transient answer (5xx, 416, 429): try the file again."""


def _part(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def _errno_name(exc: OSError) -> str:
    return f"{errno.errorcode.get(exc.errno or 0, exc.errno)}, {exc.strerror}"


def _read_at_most(response: httpx.Response, max_bytes: int, what: str) -> bytes:
    """The body of a streamed ``response``; ``OfferRefused`` as soon as it passes ``max_bytes``."""
    body = bytearray()
    for chunk in response.iter_bytes(_CHUNK_BYTES):
        body += chunk
        if len(body) > max_bytes:
            raise OfferRefused(f"{what} is larger than {max_bytes} bytes")
    return bytes(body)
