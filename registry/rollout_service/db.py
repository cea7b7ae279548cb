"""The rollout service's tables (SQLAlchemy), the engine, and schema migrations (Alembic, run at start).

SQLite is the embedded default; PostgreSQL is for production, where several replicas share one database. Nothing
here keeps state in the process that another replica would need: concurrency is settled by the database
(compare-and-set updates, unique keys, and an advisory lock around migrations on PostgreSQL).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

log = logging.getLogger(__name__)

_MIGRATIONS = Path(__file__).with_name("migrations")
_MIGRATION_LOCK_KEY = 0x796F6C6F  # PostgreSQL advisory lock id held while one replica migrates


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(sa.types.TypeDecorator[datetime]):
    """Timestamps stored in UTC and read back timezone-aware, on SQLite as on PostgreSQL."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UtcDateTime(),
        dict[str, Any]: sa.JSON(),
        list[Any]: sa.JSON(),
    }


class OperatorToken(Base):
    """An operator's bearer token, by its sha256; the token itself is shown once, when it is made."""

    __tablename__ = "operator_tokens"

    token_sha256: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(128))
    created_at: Mapped[datetime]
    scope: Mapped[str] = mapped_column(sa.String(16), server_default="admin")  # read | operate | admin
    source: Mapped[str] = mapped_column(sa.String(16), server_default="setting")  # setting | api
    created_by: Mapped[str | None] = mapped_column(sa.String(128))
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class EnrollmentToken(Base):
    """A token that admits new device ids: named, by its sha256, optionally expiring and auto-accepting by id."""

    __tablename__ = "enrollment_tokens"

    name: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    token_sha256: Mapped[str] = mapped_column(sa.String(64), unique=True)
    auto_accept: Mapped[str | None] = mapped_column(sa.String(256))  # shell pattern of ids accepted at once
    source: Mapped[str] = mapped_column(sa.String(16))  # setting | api
    created_by: Mapped[str | None] = mapped_column(sa.String(128))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class SeenStatement(Base):
    """A signed statement already acted on (an enrollment proof, a webhook delivery): a replay is refused."""

    __tablename__ = "seen_statements"

    kind: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    digest: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    labels: Mapped[dict[str, Any]]
    fingerprint: Mapped[dict[str, Any]]
    token_sha256: Mapped[str] = mapped_column(sa.String(64), index=True)
    enrolled_at: Mapped[datetime]
    last_seen_at: Mapped[datetime | None]
    model: Mapped[str | None] = mapped_column(sa.String(256))
    current_version: Mapped[str | None] = mapped_column(sa.String(32))
    state: Mapped[str | None] = mapped_column(sa.String(32))
    # Identity: the base64 of its ed25519 public key (None: enrolled before devices had keys); its standing.
    public_key: Mapped[str | None] = mapped_column(sa.String(64))
    status: Mapped[str] = mapped_column(sa.String(16), server_default="accepted")  # pending|accepted|rejected|...
    enrolled_via: Mapped[str | None] = mapped_column(sa.String(128))  # the enrollment token's name


class KeyRequest(Base):
    """An enrollment of an existing device id with a key that is not its own: it waits for an operator."""

    __tablename__ = "device_key_requests"

    device_id: Mapped[str] = mapped_column(
        sa.String(128), sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    public_key: Mapped[str] = mapped_column(sa.String(64))
    labels: Mapped[dict[str, Any]]
    fingerprint: Mapped[dict[str, Any]]
    requested_at: Mapped[datetime]


class DeviceEvent(Base):
    __tablename__ = "device_events"
    __table_args__ = (sa.Index("ix_device_events_device_at", "device_id", "id"),)

    id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True)
    device_id: Mapped[str] = mapped_column(sa.String(128), sa.ForeignKey("devices.id", ondelete="CASCADE"))
    rollout_id: Mapped[int | None] = mapped_column(sa.BigInteger)
    model: Mapped[str | None] = mapped_column(sa.String(256))
    version: Mapped[str | None] = mapped_column(sa.String(32))
    state: Mapped[str] = mapped_column(sa.String(32))
    ok: Mapped[bool]
    reason: Mapped[str] = mapped_column(sa.Text)
    at: Mapped[datetime]
    received_at: Mapped[datetime]
    details: Mapped[dict[str, Any] | None]  # the figures of a shadow event


# schemas.ACTIVE_STATES as SQL: at most one rollout of a model may be in them per device set (migration 0005).
ROLLOUT_ACTIVE_SQL = "state IN ('pending', 'running', 'paused', 'halted')"


class Rollout(Base):
    __tablename__ = "rollouts"
    __table_args__ = (
        sa.Index("ix_rollouts_model_state", "model", "state"),
        sa.Index(
            "ux_rollouts_one_active", "model", "selector_key", unique=True,
            sqlite_where=sa.text(ROLLOUT_ACTIVE_SQL), postgresql_where=sa.text(ROLLOUT_ACTIVE_SQL),
        ),
    )  # fmt: skip

    id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True)
    model: Mapped[str] = mapped_column(sa.String(256))
    version: Mapped[str] = mapped_column(sa.String(32))
    previous_version: Mapped[str | None] = mapped_column(sa.String(32))
    strategy: Mapped[str] = mapped_column(sa.String(16))
    state: Mapped[str] = mapped_column(sa.String(32))
    selector: Mapped[dict[str, Any]]
    selector_key: Mapped[str] = mapped_column(sa.String(64))  # sha256 of the normalised selector: the device set
    waves: Mapped[list[Any]]
    ab: Mapped[dict[str, Any] | None]
    analysis: Mapped[dict[str, Any] | None]  # the AnalysisSpec it is judged by (server defaults merged in)
    shadow: Mapped[dict[str, Any] | None]  # the ShadowSpec its devices get with the desired state
    # An operator's orders, signed into each device's desired state: run a release older than the device's
    # (allow_downgrade), run a version whose gates failed (force_gates).
    allow_downgrade: Mapped[bool] = mapped_column(default=False, server_default=sa.false())
    force_gates: Mapped[bool] = mapped_column(default=False, server_default=sa.false())
    current_wave: Mapped[int] = mapped_column(default=0)
    wave_started_at: Mapped[datetime | None]
    revision: Mapped[int] = mapped_column(default=0)  # bumped by every transition; compare-and-set guard
    created_by: Mapped[str] = mapped_column(sa.String(128))
    reason: Mapped[str] = mapped_column(sa.Text)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class DeviceOutcome(Base):
    """The latest outcome of one device in one rollout: did it commit the version it was sent, or fail it."""

    __tablename__ = "device_outcomes"

    rollout_id: Mapped[int] = mapped_column(
        sa.BigInteger, sa.ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    version: Mapped[str] = mapped_column(sa.String(32))
    outcome: Mapped[str] = mapped_column(sa.String(16))  # succeeded | failed
    reason: Mapped[str] = mapped_column(sa.Text)
    at: Mapped[datetime]


class Telemetry(Base):
    __tablename__ = "telemetry"
    __table_args__ = (
        sa.Index("ix_telemetry_rollout_arm", "rollout_id", "arm"),
        sa.Index("ix_telemetry_model_version_at", "model", "version", "at"),  # the analysis's latency baselines
    )

    id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True)
    rollout_id: Mapped[int | None] = mapped_column(sa.BigInteger)
    arm: Mapped[str | None] = mapped_column(sa.String(16))
    device_id: Mapped[str] = mapped_column(sa.String(128))
    model: Mapped[str | None] = mapped_column(sa.String(256))
    version: Mapped[str] = mapped_column(sa.String(32))
    inferences: Mapped[int] = mapped_column(sa.BigInteger)
    errors: Mapped[int] = mapped_column(sa.BigInteger)
    latency_p50_ms: Mapped[float]
    latency_p99_ms: Mapped[float]
    detections_per_image: Mapped[float]
    mean_confidence: Mapped[float]
    # The bounded form (None for an older agent's window): what the canary analysis compares.
    frames: Mapped[int | None] = mapped_column(sa.BigInteger)
    empty_frames: Mapped[int | None] = mapped_column(sa.BigInteger)
    nonfinite: Mapped[int | None] = mapped_column(sa.BigInteger)
    histograms: Mapped[dict[str, Any] | None]
    class_counts: Mapped[dict[str, Any] | None]
    at: Mapped[datetime]


class AnalysisRecord(Base):
    """One stored verdict of a rollout's fleet analysis (a canary wave, or an A/B test)."""

    __tablename__ = "analysis_verdicts"
    __table_args__ = (sa.Index("ix_analysis_verdicts_rollout", "rollout_id", "id"),)

    id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True)
    rollout_id: Mapped[int] = mapped_column(sa.BigInteger)
    at: Mapped[datetime]
    wave: Mapped[int]
    kind: Mapped[str] = mapped_column(sa.String(16))  # canary | ab
    verdict: Mapped[str] = mapped_column(sa.String(16))
    score: Mapped[float | None]
    reason: Mapped[str] = mapped_column(sa.Text)
    action: Mapped[str] = mapped_column(sa.String(16))
    winner: Mapped[str | None] = mapped_column(sa.String(16))
    treatment_version: Mapped[str] = mapped_column(sa.String(32))
    control_version: Mapped[str | None] = mapped_column(sa.String(32))
    treatment_windows: Mapped[int]
    control_windows: Mapped[int]
    metrics: Mapped[list[Any]]


class AuditRecord(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True)
    at: Mapped[datetime]
    actor: Mapped[str] = mapped_column(sa.String(128))
    action: Mapped[str] = mapped_column(sa.String(64))
    rollout_id: Mapped[int | None] = mapped_column(sa.BigInteger, index=True)
    model: Mapped[str | None] = mapped_column(sa.String(256))
    version: Mapped[str | None] = mapped_column(sa.String(32))
    reason: Mapped[str] = mapped_column(sa.Text)


class AliasState(Base):
    """The last version seen behind each watched alias; moving it is a compare-and-set, so one replica acts."""

    __tablename__ = "alias_state"

    model: Mapped[str] = mapped_column(sa.String(256), primary_key=True)
    alias: Mapped[str] = mapped_column(sa.String(256), primary_key=True)
    version: Mapped[str] = mapped_column(sa.String(32))
    updated_at: Mapped[datetime]


class Promotion(Base):
    __tablename__ = "promotions"

    id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True)
    model: Mapped[str] = mapped_column(sa.String(256))
    alias: Mapped[str] = mapped_column(sa.String(256))
    version: Mapped[str] = mapped_column(sa.String(32))
    outcome: Mapped[str] = mapped_column(sa.String(16))
    rollout_id: Mapped[int | None] = mapped_column(sa.BigInteger)
    reason: Mapped[str] = mapped_column(sa.Text)
    at: Mapped[datetime]


class BundleRecord(Base):
    """What the service needs of a registered version without asking MLflow again: gates, variants, fingerprint."""

    __tablename__ = "bundles"

    model: Mapped[str] = mapped_column(sa.String(256), primary_key=True)
    version: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    manifest_sha256: Mapped[str] = mapped_column(sa.String(64))
    release: Mapped[int | None] = mapped_column(sa.BigInteger)  # None: a schema 1 bundle (not numbered)
    gates_passed: Mapped[bool]
    variants: Mapped[dict[str, Any]]  # variant name -> gates passed
    fingerprint: Mapped[dict[str, Any]]
    class_names: Mapped[list[Any] | None]  # by class index; None: stored before class names were kept
    resolved_at: Mapped[datetime]


class ServiceKey(Base):
    """The service's own signing key (``state``: desired states), made by the first replica to start, so that every
    replica signs with the same key; unused when ``YOLO_OTA_STATE_KEY_FILE`` names one."""

    __tablename__ = "service_keys"

    name: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    private_pem: Mapped[str] = mapped_column(sa.Text)
    created_at: Mapped[datetime]


class RevocationListRecord(Base):
    """Each revocation list the service was given (``exporters.revocations``), signed by the release key; devices
    get the one with the highest sequence."""

    __tablename__ = "revocation_lists"

    sequence: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True)
    document: Mapped[str] = mapped_column(sa.Text)  # base64 of the signed JSON bytes
    signature: Mapped[str] = mapped_column(sa.String(128))
    created_by: Mapped[str] = mapped_column(sa.String(128))
    created_at: Mapped[datetime]


class StateGeneration(Base):
    """One row whose counter moves whenever what any device should run may have changed.

    Replicas read it (cheaply, at most once a second) to know when their cached desired states are stale.
    """

    __tablename__ = "state_generation"

    id: Mapped[int] = mapped_column(primary_key=True)
    generation: Mapped[int] = mapped_column(sa.BigInteger)


# -- engine and migrations ---------------------------------------------------------------------------------------


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL and a busy timeout so readers and the scheduler do not collide."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("sqlite"):
        path = sa.engine.make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection: Any, record: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return sa.create_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: committed on success, rolled back on any error."""
    with sessions.begin() as session:
        yield session


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision. On PostgreSQL one replica at a time, under an advisory lock."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    log.info("database schema at the newest revision (%s)", engine.url.render_as_string(hide_password=True))
