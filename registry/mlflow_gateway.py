"""The MLflow gateway: the only module of the project that imports ``mlflow``.

It registers bundles as model versions (DESIGN.md section 5), lists them, and moves aliases, and it turns
MLflow's exceptions into the registry's own (``registry.errors``). Every call goes to an explicit tracking URI,
never MLflow's implicit local store, with a bounded number of HTTP retries. MLflow's own connection variables
(``MLFLOW_TRACKING_USERNAME``, ``MLFLOW_TRACKING_PASSWORD``, ``MLFLOW_TRACKING_TOKEN``,
``MLFLOW_TRACKING_INSECURE_TLS``, ...) are left as they are, for MLflow's client to read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporters.bundle import MANIFEST_NAME, SIGNATURE_NAME, Manifest, load_verified
from exporters.errors import flatten
from exporters.formats import FormatIndex, read_index
from exporters.report import gate_markdown
from registry import tags as ota
from registry.errors import (
    DuplicateBundleError,
    ProductLineMismatchError,
    PromotionRefusedError,
    RegistryError,
    RegistryNotFoundError,
    RegistryRequestError,
    RegistryUnavailableError,
    ReleaseOrderError,
)

log = logging.getLogger(__name__)

BUNDLE_ARTIFACT_PATH = "bundle"
DEFAULT_ALIAS = "production"
DEFAULT_EXPERIMENT = "yolo-ota"
_NOT_FOUND_CODES = {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"}
_DESCRIPTION_MAX = 5000  # characters kept of a version description


@dataclass(frozen=True)
class VersionInfo:
    """One registered version as the CLI and the rollout service see it."""

    model: str
    version: str
    source: str
    run_id: str | None
    aliases: tuple[str, ...]
    tags: dict[str, str]

    @property
    def gates(self) -> str:
        return self.tags.get(ota.GATES_TAG, "unknown")


@dataclass(frozen=True)
class Registration:
    """What ``register_bundle`` did."""

    version: VersionInfo
    run_id: str
    manifest_sha256: str


def _retry_settings(max_retries: int, timeout_s: float) -> None:
    # MLflow reads these on each request; only fill in what the user has not set.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(max_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(timeout_s)))


def _unreachable_reason(message: str) -> str:
    for pattern, reason in (
        ("Connection refused", "connection refused"),
        ("timed out", "timed out"),
        ("Name or service not known", "unknown host"),
        ("Temporary failure in name resolution", "unknown host"),
    ):
        if pattern in message:
            return reason
    return "no answer"


@contextlib.contextmanager
def _translated(what: str, tracking_uri: str) -> Iterator[None]:
    """Turn MLflow and transport exceptions into the registry's errors."""
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    try:
        yield
    except RegistryError:
        raise
    except MlflowException as exc:
        code = str(getattr(exc, "error_code", ""))
        message = flatten(str(exc.message if hasattr(exc, "message") else exc))
        if code in _NOT_FOUND_CODES:
            raise RegistryNotFoundError(f"{what}: {message}") from exc
        if "Max retries exceeded" in message or "Connection" in message or code in ("TEMPORARILY_UNAVAILABLE",):
            reason = _unreachable_reason(str(exc))
            raise RegistryUnavailableError(f"{what}: MLflow at {tracking_uri} is unreachable ({reason})") from exc
        if code == "INTERNAL_ERROR":
            raise RegistryUnavailableError(f"{what}: MLflow server error ({message})") from exc
        raise RegistryRequestError(f"{what}: {message}") from exc
    except RequestException as exc:
        reason = _unreachable_reason(str(exc))
        raise RegistryUnavailableError(f"{what}: MLflow at {tracking_uri} is unreachable ({reason})") from exc


class MlflowGateway:
    """Registry operations against one MLflow tracking server."""

    def __init__(self, tracking_uri: str, *, max_retries: int = 2, timeout_s: float = 30) -> None:
        if not tracking_uri:
            raise RegistryRequestError(
                "no MLflow tracking URI given (--mlflow-uri, YOLO_OTA_MLFLOW_URI, [registry] mlflow_uri in the config "
                "file, or MLFLOW_TRACKING_URI)"
            )
        _retry_settings(max_retries, timeout_s)
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self._client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    # -- reading ---------------------------------------------------------------------------------------------

    def _version_info(self, mv: Any) -> VersionInfo:
        return VersionInfo(
            model=mv.name,
            version=str(mv.version),
            source=mv.source,
            run_id=mv.run_id,
            aliases=tuple(getattr(mv, "aliases", []) or []),
            tags=dict(mv.tags or {}),
        )

    def get_version(self, model: str, version: str) -> VersionInfo:
        with _translated(f"version {version} of {model}", self.tracking_uri):
            return self._version_info(self._client.get_model_version(model, version))

    def get_version_by_alias(self, model: str, alias: str) -> VersionInfo:
        with _translated(f"alias {alias!r} of {model}", self.tracking_uri):
            return self._version_info(self._client.get_model_version_by_alias(model, alias))

    def list_versions(self, model: str) -> list[VersionInfo]:
        """Every version of ``model``, newest first."""
        with _translated(f"versions of {model}", self.tracking_uri):
            registered = self._client.get_registered_model(model)
            found = self._client.search_model_versions(f"name = '{_quote(model)}'")
        # Search results carry no aliases; the registered model has them all.
        by_version: dict[str, list[str]] = {}
        for alias, version in (registered.aliases or {}).items():
            by_version.setdefault(str(version), []).append(alias)
        infos = [self._version_info(mv) for mv in found]
        infos = [dataclasses.replace(v, aliases=tuple(sorted(by_version.get(v.version, [])))) for v in infos]
        return sorted(infos, key=lambda v: -int(v.version))

    def find_by_manifest(self, model: str, digest: str) -> VersionInfo | None:
        """The version of ``model`` holding the bundle whose manifest has this sha256, if any."""
        with _translated(f"versions of {model}", self.tracking_uri):
            found = self._client.search_model_versions(
                f"name = '{_quote(model)}' and tags.`{ota.MANIFEST_DIGEST_TAG}` = '{digest}'"
            )
        return self._version_info(found[0]) if found else None

    def aliases(self, models: list[str] | None = None) -> dict[str, dict[str, str]]:
        """``{model: {alias: version}}`` for ``models``, or for every registered model when None."""
        from mlflow.exceptions import MlflowException

        found: dict[str, dict[str, str]] = {}
        with _translated("registered models", self.tracking_uri):
            if models:
                for name in models:
                    try:
                        registered = self._client.get_registered_model(name)
                    except MlflowException as exc:  # an unknown watched model is not an error: it may come later
                        if str(getattr(exc, "error_code", "")) in _NOT_FOUND_CODES:
                            continue
                        raise
                    found[name] = {a: str(v) for a, v in (registered.aliases or {}).items()}
                return found
            token: str | None = None
            while True:
                page = self._client.search_registered_models(max_results=200, page_token=token)
                for registered in page:
                    found[registered.name] = {a: str(v) for a, v in (registered.aliases or {}).items()}
                token = page.token
                if not token:
                    return found

    def newest_versions(self) -> dict[str, tuple[str, str]]:
        """``{model: (version, source)}``: the newest version of every registered model that has one."""
        found: dict[str, tuple[str, str]] = {}
        with _translated("registered models", self.tracking_uri):
            token: str | None = None
            while True:
                page = self._client.search_registered_models(max_results=200, page_token=token)
                for registered in page:
                    versions = [v for v in registered.latest_versions or [] if str(v.version).isdigit()]
                    if versions:
                        newest = max(versions, key=lambda v: int(v.version))
                        found[registered.name] = (str(newest.version), str(newest.source or ""))
                token = page.token
                if not token:
                    return found

    # -- writing ---------------------------------------------------------------------------------------------

    def register_bundle(self, bundle_dir: Path, model: str, *, experiment: str = DEFAULT_EXPERIMENT) -> Registration:
        """Verify the bundle, log it as run artifacts under ``bundle/`` and create a model version from them.

        Refuses a bundle with a missing or altered file (``exporters`` errors) and one already registered under
        ``model`` (``DuplicateBundleError``, naming the version).
        """
        manifest = load_verified(bundle_dir)
        index = read_index(bundle_dir, manifest)
        if manifest.name != model:
            raise ProductLineMismatchError(
                f"{bundle_dir} was exported for product line {manifest.name!r} (signed into its manifest); it can be "
                f"registered as {manifest.name!r} only, not {model!r} (export it again with --name {model})"
            )
        manifest_bytes = (bundle_dir / MANIFEST_NAME).read_bytes()
        digest = ota.manifest_digest(manifest_bytes)
        signed = (bundle_dir / SIGNATURE_NAME).is_file()
        self._ensure_model(model)
        existing = self.find_by_manifest(model, digest)
        if existing is not None:
            raise DuplicateBundleError(
                f"this bundle (manifest sha256 {digest[:12]}...) is already version {existing.version} of {model}",
                existing.version,
            )
        self._check_release_grows(model, manifest.release)
        with _translated(f"registering {bundle_dir} as {model}", self.tracking_uri):
            experiment_id = self._experiment_id(experiment)
            run = self._client.create_run(
                experiment_id,
                run_name=f"{model}-{manifest.name}",
                tags={"yolo_ota.kind": "bundle", ota.MANIFEST_DIGEST_TAG: digest},
            )
            run_id = run.info.run_id
            try:
                self._log_run(run_id, bundle_dir, manifest, index)
            except BaseException:
                self._client.set_terminated(run_id, status="FAILED")
                raise
            # MLflow writes the run's UI link to stdout; keep stdout for the command's own result.
            with contextlib.redirect_stdout(sys.stderr):
                self._client.set_terminated(run_id)
            source = f"{run.info.artifact_uri.rstrip('/')}/{BUNDLE_ARTIFACT_PATH}"
            mv = self._client.create_model_version(
                model,
                source=source,
                run_id=run_id,
                tags=ota.version_tags(manifest, manifest_bytes, signed=signed, index=index),
                description=_description(manifest),
            )
        log.info("registered %s as %s version %s (run %s)", bundle_dir, model, mv.version, run_id)
        return Registration(version=self._version_info(mv), run_id=run_id, manifest_sha256=digest)

    def _check_release_grows(self, model: str, release: int | None) -> None:
        """A line's releases only grow with its versions: refuse a bundle older than a version registered before."""
        releases = [(int(r), v.version) for v in self.list_versions(model) if (r := v.tags.get(ota.RELEASE_TAG))]
        if not releases:
            return
        newest, version = max(releases)
        if (release or 0) < newest:
            raise ReleaseOrderError(
                f"this bundle is release {release or 'unnumbered'}, older than release {newest} (version {version} of "
                f"{model}): a line's releases only grow; export it again with a higher --release"
            )

    def promote(self, model: str, version: str, *, alias: str = DEFAULT_ALIAS, force: bool = False) -> VersionInfo:
        """Point ``alias`` at ``version``; refuse a version whose gates did not pass unless ``force``."""
        info = self.get_version(model, version)
        if info.gates != "pass":
            if not force:
                raise PromotionRefusedError(
                    f"version {version} of {model} has ota.gates={info.gates}; not promoted (use --force to override)"
                )
            with _translated(f"tagging version {version} of {model}", self.tracking_uri):
                self._client.set_model_version_tag(model, version, ota.FORCED_TAG, f"alias {alias} despite gates")
        with _translated(f"setting alias {alias!r} on version {version} of {model}", self.tracking_uri):
            self._client.set_registered_model_alias(model, alias, version)
        log.info("alias %s of %s -> version %s%s", alias, model, version, " (forced)" if force else "")
        return self.get_version(model, version)

    def set_version_tag(self, model: str, version: str, key: str, value: str) -> None:
        with _translated(f"tagging version {version} of {model}", self.tracking_uri):
            self._client.set_model_version_tag(model, version, key, value)

    def ensure_webhook(self, name: str, url: str, secret: str, events: tuple[str, ...]) -> str:
        """Create the webhook ``name`` calling ``url`` on ``events``, or bring an existing one up to date.

        Returns its id. The secret is re-set every time, since MLflow never shows a stored one.
        """
        hook_events: list[Any] = list(events)  # MLflow types these as literals of its own
        with _translated(f"webhook {name}", self.tracking_uri):
            token: str | None = None
            while True:
                page = self._client.list_webhooks(max_results=100, page_token=token)
                for hook in page:
                    if hook.name == name:
                        self._client.update_webhook(
                            hook.webhook_id, url=url, events=hook_events, secret=secret, status="ACTIVE"
                        )
                        log.info("webhook %s updated: %s on %s", name, url, ",".join(events))
                        return str(hook.webhook_id)
                token = page.token
                if not token:
                    break
            hook = self._client.create_webhook(name=name, url=url, events=hook_events, secret=secret)
        log.info("webhook %s created: %s on %s", name, url, ",".join(events))
        return str(hook.webhook_id)

    def _ensure_model(self, model: str) -> None:
        from mlflow.exceptions import MlflowException

        with _translated(f"registered model {model}", self.tracking_uri):
            try:
                self._client.get_registered_model(model)
            except MlflowException as exc:
                if str(getattr(exc, "error_code", "")) not in _NOT_FOUND_CODES:
                    raise
                self._client.create_registered_model(model, description="YOLO detector bundles (yolo-ota)")

    def _experiment_id(self, name: str) -> str:
        experiment = self._client.get_experiment_by_name(name)
        return experiment.experiment_id if experiment is not None else self._client.create_experiment(name)

    def _log_run(self, run_id: str, bundle_dir: Path, manifest: Manifest, index: FormatIndex) -> None:
        from mlflow.entities import Metric, Param

        self._client.log_artifacts(run_id, str(bundle_dir), artifact_path=BUNDLE_ARTIFACT_PATH)
        timestamp_ms = int(Path(bundle_dir / MANIFEST_NAME).stat().st_mtime * 1000)
        metrics = [
            Metric(key, float(value), timestamp_ms, 0) for key, value in ota.run_metrics(manifest, index).items()
        ]
        params = [Param(key, value[:6000]) for key, value in ota.run_params(manifest, index).items()]
        self._client.log_batch(run_id, metrics=metrics, params=params)


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def _description(manifest: Manifest) -> str:
    """The gate tables as Markdown for the version's description (MLflow renders it as Markdown)."""
    verdict = "pass" if manifest.gates_passed else "**FAIL**"
    tables = gate_markdown(manifest.gates.values(), title=f"Gates of {manifest.name}")
    text = f"yolo-ota bundle `{manifest.name}`, gates: {verdict}\n\n{tables}"
    return text if len(text) <= _DESCRIPTION_MAX else text[: _DESCRIPTION_MAX - 4].rsplit("\n", 1)[0] + "\n..."
