"""The service's view of registered bundles: gates, variants and fingerprint per version, cached.

What a version holds does not change once registered (its manifest digest is its identity), so the summary is
kept in the database and in memory; the file URLs are kept in memory for ``ttl_s`` only, because presigned S3
URLs expire. Only a cache miss calls MLflow, never the unchanged-desired-state path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from exporters.fingerprint import Fingerprint, check_compatible
from registry.errors import RegistryError, RegistryNotFoundError
from registry.resolver import BundleResolver, ResolvedBundle
from registry.rollout_service.db import BundleRecord, transaction, utcnow
from registry.rollout_service.errors import InvalidRequestError, UpstreamUnavailableError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundleSummary:
    model: str
    version: str
    manifest_sha256: str
    gates_passed: bool
    variants: dict[str, bool]  # variant -> its gates passed
    fingerprint: Fingerprint
    class_names: tuple[str, ...] = ()  # by class index; empty when not known (a record from an older service)
    release: int | None = None  # the bundle's signed release number; None: schema 1 (not numbered)

    @property
    def release_order(self) -> int:
        """The release to compare versions by: a bundle that predates numbering comes before every numbered one."""
        return self.release or 0


@dataclass(frozen=True)
class VariantChoice:
    variant: str | None
    reason: str | None  # why no variant fits, when variant is None


def variant_to_offer(
    bundle: BundleSummary, device: Fingerprint, preference: list[str], *, forced: bool = False
) -> VariantChoice:
    """The first variant in ``preference`` that the bundle has, that passed its gates, and the device can run; when
    an operator ``forced`` the rollout past failed gates and no passing variant fits, the first that fits."""
    ordered = [v for v in preference if v in bundle.variants] + sorted(set(bundle.variants) - set(preference))
    passing = [v for v in ordered if bundle.variants[v]]
    candidates = passing + [v for v in ordered if v not in passing] if forced else passing
    reasons = [f"{v} failed its gates" for v in ordered if v not in candidates]
    for variant in candidates:
        try:
            why_not = check_compatible(bundle.fingerprint, device, variant)
        except ValueError as exc:  # a version that cannot be compared is not a version to bet a line on
            why_not = f"cannot compare versions: {exc}"
        if why_not is None:
            return VariantChoice(variant, None)
        reasons.append(why_not)
    return VariantChoice(None, "; ".join(reasons) or "the bundle has no variants")


class BundleCatalog:
    """Bundle summaries and resolved file lists for (model, version), from MLflow on a miss."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        resolver_factory: Callable[[], BundleResolver] | None,
        *,
        ttl_s: float,
    ) -> None:
        self._sessions = sessions
        self._resolver_factory = resolver_factory
        self._ttl_s = ttl_s
        self._summaries: dict[tuple[str, str], BundleSummary] = {}
        self._resolved: dict[tuple[str, str], tuple[float, ResolvedBundle]] = {}
        self._lock = threading.Lock()

    def summary(self, model: str, version: str) -> BundleSummary:
        """What the service needs to target and choose a variant; raises ``InvalidRequestError`` if unknown."""
        key = (model, version)
        cached = self._summaries.get(key)
        if cached is not None:
            return cached
        with self._sessions() as session:
            record = session.get(BundleRecord, key)
        if record is None:
            return self._remember(self.resolve(model, version))
        summary = BundleSummary(
            model=model,
            version=version,
            manifest_sha256=record.manifest_sha256,
            gates_passed=record.gates_passed,
            variants={str(k): bool(v) for k, v in record.variants.items()},
            fingerprint=Fingerprint.model_validate(record.fingerprint),
            class_names=tuple(str(n) for n in record.class_names or ()),
            release=record.release,
        )
        self._summaries[key] = summary
        return summary

    def resolve(self, model: str, version: str) -> ResolvedBundle:
        """The version's manifest and file URLs; from memory while younger than the TTL."""
        key = (model, version)
        now = time.monotonic()
        with self._lock:
            hit = self._resolved.get(key)
        if hit is not None and now - hit[0] < self._ttl_s:
            return hit[1]
        if self._resolver_factory is None:
            raise UpstreamUnavailableError("no MLflow tracking URI configured (YOLO_OTA_MLFLOW_URI)")
        try:
            with self._resolver_factory() as resolver:
                resolved = resolver.resolve(model, version=version)
        except RegistryNotFoundError as exc:
            raise InvalidRequestError(f"version {version} of {model} is not in the registry ({exc})") from None
        except RegistryError as exc:
            if exc.retryable:
                raise UpstreamUnavailableError(str(exc)) from None
            raise InvalidRequestError(str(exc)) from None
        if resolved.manifest.name != model:
            # The product line is signed into the manifest; a bundle of another line put under this registered model
            # (through MLflow's API, past `yolo-ota register`) is not this line's version, whatever its number.
            raise InvalidRequestError(
                f"version {version} of {model} holds a bundle exported for product line {resolved.manifest.name!r}; "
                "it is not offered to devices"
            )
        with self._lock:
            self._resolved[key] = (now, resolved)
        return resolved

    def _remember(self, resolved: ResolvedBundle) -> BundleSummary:
        manifest = resolved.manifest
        summary = BundleSummary(
            model=resolved.model,
            version=resolved.version,
            manifest_sha256=resolved.manifest_sha256,
            gates_passed=manifest.gates_passed,
            variants={
                name: (manifest.gates[name].passed if name in manifest.gates else False) for name in manifest.variants
            },
            fingerprint=manifest.fingerprint,
            class_names=tuple(manifest.names.get(i, str(i)) for i in range(max(manifest.names, default=-1) + 1)),
            release=manifest.release,
        )
        try:
            with transaction(self._sessions) as session:
                session.merge(
                    BundleRecord(
                        model=summary.model,
                        version=summary.version,
                        manifest_sha256=summary.manifest_sha256,
                        gates_passed=summary.gates_passed,
                        variants=summary.variants,
                        fingerprint=manifest.fingerprint.model_dump(mode="json"),
                        class_names=list(summary.class_names),
                        release=summary.release,
                        resolved_at=utcnow(),
                    )
                )
        except IntegrityError:  # another replica stored the same version first: what it stored is the same
            pass
        self._summaries[(summary.model, summary.version)] = summary
        log.info(
            "bundle %s version %s: gates %s, variants %s",
            summary.model,
            summary.version,
            "pass" if summary.gates_passed else "fail",
            ",".join(summary.variants),
        )
        return summary
