"""The per-app ``Service``: the engine and the managers over it, built once by ``build_service(settings)``.

``create_app`` builds one and keeps it in ``app.state.service``; routes reach it through ``api.deps``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa

from registry.mlflow_gateway import MlflowGateway
from registry.resolver import BundleResolver
from registry.rollout_service.analysis.fleet import FleetAnalysis, Tagger
from registry.rollout_service.auth import OperatorTokens
from registry.rollout_service.bundles import BundleCatalog
from registry.rollout_service.db import make_engine, migrate, session_factory
from registry.rollout_service.desired import DesiredIndex
from registry.rollout_service.devices import DeviceRegistry
from registry.rollout_service.enrollment_tokens import EnrollmentTokens
from registry.rollout_service.identity import DeviceIdentity
from registry.rollout_service.metrics import ServiceMetrics
from registry.rollout_service.promotions import PromotionWatcher
from registry.rollout_service.queries import Queries
from registry.rollout_service.retention import Retention
from registry.rollout_service.revocations import RevocationStore
from registry.rollout_service.rollouts import RolloutManager
from registry.rollout_service.settings import ServiceSettings
from registry.rollout_service.state_signing import StateSigner


@dataclass
class Service:
    """Everything a request handler may need, built once per app."""

    settings: ServiceSettings
    operators: OperatorTokens
    enrollment_tokens: EnrollmentTokens
    identity: DeviceIdentity
    devices: DeviceRegistry
    desired: DesiredIndex
    rollouts: RolloutManager
    promotions: PromotionWatcher
    queries: Queries
    retention: Retention
    catalog: BundleCatalog
    metrics: ServiceMetrics
    engine: sa.Engine
    signer: StateSigner
    revocations: RevocationStore


def build_service(settings: ServiceSettings) -> Service:
    """Engine, migrations, and the managers over them."""
    engine = make_engine(settings.database)
    migrate(engine)
    sessions = session_factory(engine)
    resolver_factory, gateway_factory = _mlflow_factories(settings)
    catalog = BundleCatalog(sessions, resolver_factory, ttl_s=settings.bundle_cache_ttl_s)
    signer = StateSigner(sessions, settings)
    desired = DesiredIndex(sessions, catalog, settings, signer)
    analysis = FleetAnalysis(sessions, catalog, settings.analysis, tagger=_fleet_tagger(gateway_factory))
    rollouts = RolloutManager(
        sessions, catalog, settings, fleet=desired.fleet, on_change=desired.invalidate, analysis=analysis,
        revocations=lambda: desired.revocations,
    )  # fmt: skip
    operators = OperatorTokens(sessions, generation=desired.refresh)
    operators.seed(settings.operator_seeds)
    enrollment_tokens = EnrollmentTokens(sessions)
    enrollment_tokens.seed(settings.enrollment_seeds)
    devices = DeviceRegistry(sessions, catalog, desired, settings)
    return Service(
        settings=settings,
        operators=operators,
        enrollment_tokens=enrollment_tokens,
        identity=DeviceIdentity(sessions, enrollment_tokens, devices),
        devices=devices,
        desired=desired,
        rollouts=rollouts,
        promotions=PromotionWatcher(sessions, catalog, rollouts, gateway_factory, settings),
        queries=Queries(sessions, rollouts),
        retention=Retention(sessions, settings),
        catalog=catalog,
        metrics=ServiceMetrics(sessions),
        engine=engine,
        signer=signer,
        revocations=RevocationStore(sessions, settings, on_change=desired.invalidate),
    )


def _mlflow_factories(
    settings: ServiceSettings,
) -> tuple[Callable[[], BundleResolver] | None, Callable[[], MlflowGateway] | None]:
    """How to reach MLflow for bundles and for aliases and tags; neither without an MLflow URI."""
    mlflow_uri = settings.mlflow_uri
    if not mlflow_uri:
        return None, None
    presign = None
    if settings.s3_endpoint_url:
        from registry.s3 import s3_presigner

        presign = s3_presigner(endpoint_url=settings.s3_endpoint_url)

    def resolver_factory() -> BundleResolver:
        return BundleResolver(mlflow_uri, timeout_s=10, max_retries=1, presign=presign)

    gateways: list[MlflowGateway] = []

    def gateway_factory() -> MlflowGateway:
        # Built on first use: importing mlflow takes seconds, and the REST API should answer before that.
        if not gateways:
            gateways.append(MlflowGateway(mlflow_uri, max_retries=1, timeout_s=10))
        return gateways[0]

    return resolver_factory, gateway_factory


def _fleet_tagger(gateway_factory: Callable[[], MlflowGateway] | None) -> Tagger | None:
    """Writes a version's ``ota.fleet.*`` tags through the MLflow gateway (none without MLflow)."""
    if gateway_factory is None:
        return None

    factory = gateway_factory

    def tag(model: str, version: str, tags: dict[str, str]) -> None:
        gateway = factory()
        for key, value in tags.items():
            gateway.set_version_tag(model, version, key, value)

    return tag
