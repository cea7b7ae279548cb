"""The light resolver: from (model, alias or version) to a bundle's manifest and a download URL for every file.

It speaks MLflow's REST API with ``httpx`` only (no ``mlflow``, no ``boto3``), so the rollout service and the edge
agent can use it without the registry's heavy dependencies. Files are fetched through MLflow's artifact proxy
(``--serve-artifacts``), or, for a version whose source is an ``s3://`` URI, through presigned URLs made by a
caller-supplied ``presign`` callable (``registry.s3.s3_presigner``).

The manifest is trusted only when its sha256 equals the version's ``ota.manifest_sha256`` tag; every other file is
then named with the digest and size the manifest gives it, for the downloader to check.

Like MLflow's own client, it reads MLflow's connection variables: ``MLFLOW_TRACKING_TOKEN`` (bearer) or
``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (basic), ``MLFLOW_TRACKING_INSECURE_TLS`` and
``MLFLOW_TRACKING_SERVER_CERT_PATH``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
from pydantic import ValidationError

from exporters.bundle import MANIFEST_NAME, SIGNATURE_NAME, Manifest, plain_relative
from exporters.errors import UnsafePathError, flatten
from registry.errors import (
    ManifestMismatchError,
    RegistryNotFoundError,
    RegistryRequestError,
    RegistryUnavailableError,
)
from registry.tags import MANIFEST_DIGEST_TAG, SIGNED_TAG

log = logging.getLogger(__name__)

Presigner = Callable[[str], str]
"""Turns the ``s3://bucket/key`` URI of one file into an HTTP(S) URL that fetches it without credentials."""

_PROXY_PATH = "/api/2.0/mlflow-artifacts/artifacts"
_NOT_FOUND_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"})
_MAX_MANIFEST_BYTES = 8 << 20  # a manifest is a few kB; refuse to buffer anything absurd
_MAX_ANSWER_BYTES = 32 << 20  # REST answers here are single objects of a few kB
_BACKOFF_S = 0.25
_MAX_BACKOFF_S = 2.0
_MAX_SOURCE_HOPS = 4  # runs:/ and models:/ indirections followed before giving up on a loop


def mlflow_http_options() -> dict[str, Any]:
    """``httpx.Client`` arguments from MLflow's own credential and TLS variables, as MLflow's client reads them."""
    options: dict[str, Any] = {}
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if token:
        options["headers"] = {"Authorization": f"Bearer {token}"}
    elif user and password:
        options["auth"] = httpx.BasicAuth(user, password)
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        options["verify"] = False
    elif os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
        options["verify"] = os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"]
    return options


@dataclass(frozen=True)
class ResolvedFile:
    """One bundle file: its manifest path, where to fetch it, and what it must hash to."""

    path: str
    url: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class ResolvedBundle:
    """A model version's bundle as a device needs it: the verified manifest and a URL per listed file."""

    model: str
    version: str
    source: str
    tags: dict[str, str]
    manifest: Manifest
    manifest_bytes: bytes
    manifest_sha256: str
    manifest_url: str
    signature_url: str | None  # None when the version is unsigned (tag ota.signed is not "true")
    files: list[ResolvedFile]

    @property
    def signed(self) -> bool:
        return self.signature_url is not None


class BundleResolver:
    """Resolves registered bundles against one MLflow tracking server over its REST API."""

    def __init__(
        self,
        mlflow_url: str,
        *,
        timeout_s: float = 30.0,
        max_retries: int = 2,
        client: httpx.Client | None = None,
        presign: Presigner | None = None,
    ) -> None:
        if urlsplit(mlflow_url).scheme not in ("http", "https"):
            raise RegistryRequestError(f"MLflow URL {mlflow_url!r} is not an http(s) URL")
        if max_retries < 0:
            raise RegistryRequestError(f"max_retries must be >= 0, not {max_retries}")
        self.mlflow_url = mlflow_url.rstrip("/")
        self.max_retries = max_retries
        self._presign = presign
        self._owns_client = client is None
        self._client = client if client is not None else httpx.Client(timeout=timeout_s, **mlflow_http_options())

    # -- public ----------------------------------------------------------------------------------------------

    def resolve(self, model: str, *, alias: str | None = None, version: str | None = None) -> ResolvedBundle:
        """The bundle of ``model`` at ``alias`` or at ``version`` (exactly one of the two)."""
        if alias is not None and version is None:
            what = f"alias {alias!r} of {model}"
            body = self._get_json("/api/2.0/mlflow/registered-models/alias", {"name": model, "alias": alias}, what)
        elif version is not None and alias is None:
            what = f"version {version} of {model}"
            body = self._get_json("/api/2.0/mlflow/model-versions/get", {"name": model, "version": version}, what)
        else:
            raise RegistryRequestError("resolve needs exactly one of alias or version")
        model_version = body.get("model_version")
        if not isinstance(model_version, dict):
            raise RegistryRequestError(f"{what}: MLflow's answer has no model_version")
        return self._resolve_version(model, model_version)

    def artifact_url(self, source: str, relative: str) -> str:
        """The URL that fetches the file ``relative`` under the artifact URI ``source``.

        ``mlflow-artifacts:`` URIs go through this server's artifact proxy, ``runs:/`` and ``models:/`` URIs are
        looked up first, and ``s3://`` URIs need the ``presign`` callable.
        """
        return self._artifact_url(self._location(source), relative)

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> BundleResolver:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    # -- steps -----------------------------------------------------------------------------------------------

    def _resolve_version(self, model: str, model_version: dict[str, Any]) -> ResolvedBundle:
        version = str(model_version.get("version", ""))
        source = str(model_version.get("source", ""))
        what = f"version {version} of {model}"
        tags = {str(t["key"]): str(t.get("value", "")) for t in model_version.get("tags", []) if "key" in t}
        expected = tags.get(MANIFEST_DIGEST_TAG)
        if not expected:
            raise RegistryRequestError(f"{what} has no {MANIFEST_DIGEST_TAG} tag: not a yolo-ota bundle")
        location = self._location(source)
        manifest_url = self._artifact_url(location, MANIFEST_NAME)
        manifest_bytes = self._get(manifest_url, f"{MANIFEST_NAME} of {what}", max_bytes=_MAX_MANIFEST_BYTES).body
        actual = hashlib.sha256(manifest_bytes).hexdigest()
        if actual != expected:
            raise ManifestMismatchError(
                f"{MANIFEST_NAME} of {what} has sha256 {actual[:12]}..., its {MANIFEST_DIGEST_TAG} tag says "
                f"{expected[:12]}...: the stored bundle was altered"
            )
        manifest = _parse_manifest(manifest_bytes, what)
        files = [
            ResolvedFile(path=path, url=self._artifact_url(location, path), sha256=entry.sha256, bytes=entry.bytes)
            for path, entry in sorted(manifest.files.items())
        ]
        signed = tags.get(SIGNED_TAG) == "true"
        log.info("resolved %s: %d files from %s%s", what, len(files), source, " (signed)" if signed else "")
        return ResolvedBundle(
            model=model,
            version=version,
            source=source,
            tags=tags,
            manifest=manifest,
            manifest_bytes=manifest_bytes,
            manifest_sha256=actual,
            manifest_url=manifest_url,
            signature_url=self._artifact_url(location, SIGNATURE_NAME) if signed else None,
            files=files,
        )

    def _location(self, source: str, *, depth: int = 0) -> str:
        """The storage URI that ``source`` stands for.

        ``runs:/<run_id>/<path>`` becomes the run's artifact URI plus path; ``models:/<name>/<version>`` and
        ``models:/<name>@<alias>`` (what ``MlflowClient.copy_model_version`` writes) become that version's source.
        """
        scheme = urlsplit(source).scheme
        if scheme not in ("runs", "models"):
            return source
        if depth >= _MAX_SOURCE_HOPS:
            raise RegistryRequestError(f"source {source!r}: more than {_MAX_SOURCE_HOPS} runs:/ or models:/ hops")
        if scheme == "runs":
            return self._location(self._run_location(source), depth=depth + 1)
        return self._location(self._model_version_source(source), depth=depth + 1)

    def _run_location(self, source: str) -> str:
        parts = PurePosixPath(urlsplit(source).path).parts  # ("/", run_id, *subpath)
        if urlsplit(source).netloc or len(parts) < 2:
            raise RegistryRequestError(f"source {source!r} is not a runs:/<run_id>/<path> URI")
        run_id, subpath = parts[1], "/".join(parts[2:])
        body = self._get_json("/api/2.0/mlflow/runs/get", {"run_id": run_id}, f"run {run_id} of source {source}")
        artifact_uri = str(body.get("run", {}).get("info", {}).get("artifact_uri", ""))
        if not artifact_uri:
            raise RegistryRequestError(f"run {run_id} of source {source} has no artifact URI")
        return f"{artifact_uri.rstrip('/')}/{subpath}" if subpath else artifact_uri

    def _model_version_source(self, source: str) -> str:
        path = urlsplit(source).path.strip("/")
        name, at, alias = path.rpartition("@")
        if at and name and alias:
            what = f"alias {alias!r} of {name} (source {source})"
            body = self._get_json("/api/2.0/mlflow/registered-models/alias", {"name": name, "alias": alias}, what)
        else:
            name, _, version = path.rpartition("/")
            if urlsplit(source).netloc or not name or not version.isdigit():
                raise RegistryRequestError(
                    f"source {source!r} is not a models:/<name>/<version> or models:/<name>@<alias> URI "
                    "(logged-model sources are not supported)"
                )
            what = f"version {version} of {name} (source {source})"
            body = self._get_json("/api/2.0/mlflow/model-versions/get", {"name": name, "version": version}, what)
        found = str(body.get("model_version", {}).get("source", ""))
        if not found:
            raise RegistryRequestError(f"{what} has no source")
        return found

    def _artifact_url(self, location: str, relative: str) -> str:
        relative = _safe_relative(relative)
        parts = urlsplit(location)
        if parts.scheme == "mlflow-artifacts":
            # The URI may name a host (mlflow-artifacts://host:port/...); devices reach the proxy through the
            # URL they were given, which is the one that must work from where they are.
            segments = [s for s in parts.path.split("/") if s] + relative.split("/")
            return f"{self.mlflow_url}{_PROXY_PATH}/{_quote_path(segments)}"
        if parts.scheme == "s3":
            if self._presign is None:
                raise RegistryRequestError(
                    f"source {location} is in S3 and the server does not proxy it: a presigner is needed "
                    "(BundleResolver(..., presign=s3_presigner())) or serve artifacts through MLflow"
                )
            return self._presign(f"{location.rstrip('/')}/{relative}")
        raise RegistryRequestError(
            f"source {location!r} cannot be fetched by devices: expected mlflow-artifacts:/, runs:/, models:/ or s3:// "
            "(run the MLflow server with --serve-artifacts)"
        )

    # -- HTTP ------------------------------------------------------------------------------------------------

    def _get_json(self, path: str, params: dict[str, str], what: str) -> dict[str, Any]:
        answer = self._get(f"{self.mlflow_url}{path}", what, params=params)
        try:
            body = json.loads(answer.body)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise RegistryRequestError(f"{what}: MLflow answered {path} with something other than a JSON object")
        return body

    def _get(
        self, url: str, what: str, *, params: dict[str, str] | None = None, max_bytes: int = _MAX_ANSWER_BYTES
    ) -> _Answer:
        """GET with bounded retries on connection failures and server errors; raise registry errors otherwise."""
        failure = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(_BACKOFF_S * 2 ** (attempt - 1), _MAX_BACKOFF_S))
            try:
                answer = self._fetch(url, params, max_bytes, what)
            except httpx.TransportError as exc:
                failure = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                continue
            if answer.status < 400:
                return answer
            if answer.status >= 500:
                failure = f"HTTP {answer.status}: {answer.message()}"
                continue
            raise answer.client_error(what)
        tries = self.max_retries + 1
        raise RegistryUnavailableError(
            flatten(f"{what}: MLflow at {self.mlflow_url} did not answer after {tries} tries ({failure})")
        )

    def _fetch(self, url: str, params: dict[str, str] | None, max_bytes: int, what: str) -> _Answer:
        """One GET, reading at most ``max_bytes`` of the body."""
        request = self._client.build_request("GET", url, params=params)
        response = self._client.send(request, stream=True)
        try:
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > max_bytes:
                    raise RegistryRequestError(f"{what}: the answer is larger than {max_bytes} bytes; refused")
        finally:
            response.close()
        return _Answer(status=response.status_code, reason=response.reason_phrase, body=bytes(body))


@dataclass(frozen=True)
class _Answer:
    """A fully read HTTP answer."""

    status: int
    reason: str
    body: bytes

    def _json_field(self, key: str) -> str:
        try:
            body = json.loads(self.body)
        except ValueError:
            return ""
        return str(body.get(key) or "") if isinstance(body, dict) else ""

    def message(self) -> str:
        return self._json_field("message") or self.body.decode(errors="replace").strip() or self.reason

    def client_error(self, what: str) -> RegistryNotFoundError | RegistryRequestError:
        message, code = self.message(), self._json_field("error_code")
        # MLflow answers an unknown alias with 400 INVALID_PARAMETER_VALUE "Registered model alias X not found."
        not_found = (
            self.status == 404
            or code in _NOT_FOUND_CODES
            or (code == "INVALID_PARAMETER_VALUE" and "not found" in message.lower())
        )
        if not_found:
            return RegistryNotFoundError(flatten(f"{what}: not found ({message})"))
        return RegistryRequestError(flatten(f"{what}: MLflow refused the request (HTTP {self.status}: {message})"))


def _quote_path(segments: list[str]) -> str:
    return "/".join(quote(segment, safe="") for segment in segments)


def _safe_relative(relative: str) -> str:
    """``relative`` as a plain path inside the bundle (``exporters.bundle.plain_relative``)."""
    try:
        return "/".join(plain_relative(relative).parts)
    except UnsafePathError:
        raise RegistryRequestError(f"bundle path {relative!r} is not a plain relative path inside the bundle") from None


def _parse_manifest(manifest_bytes: bytes, what: str) -> Manifest:
    try:
        manifest = Manifest.model_validate_json(manifest_bytes)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ManifestMismatchError(
            flatten(f"{MANIFEST_NAME} of {what} is not valid: {where}: {first['msg']}")
        ) from None
    for path in manifest.files:
        try:
            _safe_relative(path)
        except RegistryRequestError:
            raise ManifestMismatchError(
                flatten(f"{MANIFEST_NAME} of {what} lists {path!r}, a path that leaves the bundle: refused")
            ) from None
    return manifest
