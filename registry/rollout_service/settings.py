"""Settings of the rollout service: flags, then ``YOLO_OTA_*`` environment variables, then the config file.

The file is the one every command reads (``yolo_ota.config``: ``--config``, ``YOLO_OTA_CONFIG``,
``./yolo-ota.toml``, the user's config folder); the service reads its ``[server]`` table and, as before tables,
plain keys at the top of the file. ``mlflow_uri`` falls back to ``MLFLOW_TRACKING_URI``. Built once in ``main``
(or by a test) and passed to ``create_app``; never read at import time.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from registry.rollout_service.analysis.spec import AnalysisSpec, ShadowSpec
from registry.rollout_service.errors import ServiceSettingsError
from registry.rollout_service.schemas import WaveSpec
from registry.rollout_service.token_entries import TokenEntry, parse_entries
from yolo_ota.config import CONFIG_FILE_ENV, LayeredSettings, build, read_config

log = logging.getLogger(__name__)

__all__ = [
    "CONFIG_FILE_ENV",
    "DEFAULT_WAVES",
    "DEV_ENROLLMENT_TOKEN",
    "DEV_OPERATOR_TOKEN",
    "DEV_WEBHOOK_SECRET",
    "ServiceSettings",
    "load_settings",
]
DEV_OPERATOR_TOKEN = "dev-operator-token"
DEV_ENROLLMENT_TOKEN = "dev-enrollment-token"
DEV_WEBHOOK_SECRET = "dev-webhook-secret"

DEFAULT_WAVES = (
    WaveSpec(percent=10, bake_s=300, max_failure_rate=0.2, min_success_rate=0.9),
    WaveSpec(percent=50, bake_s=600, max_failure_rate=0.1, min_success_rate=0.95),
    WaveSpec(percent=100, bake_s=0, max_failure_rate=0.1, min_success_rate=0.95),
)


def _default_data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "yolo-ota" / "server"


class ServiceSettings(LayeredSettings):
    """Everything the rollout service reads. Secrets have no default outside ``dev_mode``."""

    model_config = SettingsConfigDict(env_prefix="YOLO_OTA_", extra="ignore", frozen=True)
    config_family = "server"
    config_top_level = True

    data_dir: Path = Field(default_factory=_default_data_dir)
    database_url: str | None = None  # default: SQLite in data_dir
    mlflow_uri: str | None = None
    operator_tokens: str | None = None  # comma-separated name[:scope]=token; seeds the operator tokens
    enrollment_token: str | None = None  # comma-separated name=token; seeds enrollment tokens that accept any id
    # The same secrets read from files (a mounted secret), so that neither a flag nor `ps` shows them.
    operator_tokens_file: Path | None = None
    enrollment_token_file: Path | None = None
    webhook_secret_file: Path | None = None
    dev_mode: bool = False

    host: str = "127.0.0.1"
    port: int = Field(default=8700, ge=1, le=65535)
    public_url: str | None = None  # where MLflow can reach this service, for the alias webhook
    webhook_secret: str | None = None
    watch_models: str | None = None  # comma-separated registered models; default: every registered model
    promotion_alias: str = "production"
    # MLflow's "Promote model" copies a version into another registered model: `<line><suffix>` is the promotion
    # target of `<line>`, unless promotion_targets maps names (`pcb-prod=pcb-defects,...`); "" turns the suffix off.
    promotion_copy_suffix: str = "-prod"
    promotion_targets: str | None = None
    # required: a promotion in MLflow creates its rollout waiting_for_approval, for an operator to approve or reject
    promotion_approval: Literal["required", "none"] = "none"
    alias_poll_interval_s: float = Field(default=30.0, gt=0)
    scheduler_interval_s: float = Field(default=5.0, gt=0)
    poll_interval_s: int = Field(default=30, ge=1)
    state_check_interval_s: float = Field(default=1.0, ge=0)
    bundle_cache_ttl_s: float = Field(default=300.0, ge=0)
    heartbeat_flush_s: float = Field(default=5.0, gt=0)
    default_waves: list[WaveSpec] = Field(default_factory=lambda: list(DEFAULT_WAVES))
    variant_preference: str = "cuda-fp16,cuda-fp32,cpu-fp32"
    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec)  # defaults of a rollout's analysis block
    shadow: ShadowSpec = Field(default_factory=ShadowSpec)  # defaults of a rollout's shadow block
    s3_endpoint_url: str | None = None  # for presigned URLs when bundles live in S3 and MLflow does not proxy them
    # The online key that signs each device's desired state (devices pin its public half when they enroll); when not
    # given, the first replica makes one and keeps it in the database, where every replica reads it.
    state_key_file: Path | None = None
    # How long a signed desired state holds: a device whose latest one expired reports `stale` (answers withheld).
    # A fresh one is signed every quarter of this, so a device that polls sees it renewed well before then.
    desired_state_validity_s: int = Field(default=6 * 3600, ge=5, le=30 * 86400)
    # The release public key (the one devices check bundles with): revocation lists must verify under it.
    release_public_key: Path | None = None
    # Request body limits in bytes, checked before a body is read (api/body_limits.py); a larger body gets 413.
    # Each is the largest body its schema admits in practice, with room, rounded up to a power of two:
    # - enrollment (DeviceEnroll): 64 labels of 256 + 256 characters and the rest are 35 KB in ASCII, 100 KB in
    #   3-byte UTF-8 (the fingerprint is ~0.3 KB) -> 128 KiB.
    # - reports (DeviceReport): an agent sends at most 200 events a report (edge_agent/reporting.py). 198 events
    #   with 1000-character reasons, 2 shadow events of 1000 classes and a window of 10,000 classes are 1.4 MB in
    #   ASCII, 2.9 MB in 3-byte UTF-8; so are the schema's 500 plain events and a window (0.9 / 2.2 MB) -> 4 MiB.
    #   (500 events each with a 1000-class shadow, the schema's ceiling, would be 217 MB: no agent sends that.)
    # - rollout creation (RolloutCreate): selector, 20 waves, reason, analysis and shadow blocks: 41 KB in ASCII,
    #   117 KB in UTF-8 -> 256 KiB.
    # - MLflow's webhook: an alias event is under 1 KB; a new version's event carries its tags and description
    #   (ours ~5 KB; MLflow allows 100,000-character tag values) -> 256 KiB. A larger one is refused, and the
    #   alias poll still sees the promotion.
    # - everything else (tokens, decisions on devices, a control's 1000-character reason): 64 KiB.
    max_enroll_bytes: int = Field(default=128 << 10, ge=1024)
    max_report_bytes: int = Field(default=4 << 20, ge=1024)
    max_rollout_bytes: int = Field(default=256 << 10, ge=1024)
    max_webhook_bytes: int = Field(default=256 << 10, ge=1024)
    max_body_bytes: int = Field(default=64 << 10, ge=1024)
    # Retention (retention.py): rows older than this many days are deleted by a background loop every
    # retention_interval_s, at most retention_batch_rows per DELETE; 0 keeps them forever. Telemetry of an active
    # rollout is kept until the rollout ends. The replay guard's rows go once no replica could accept their
    # statement again (not a setting: keeping them shorter would let a captured statement be replayed).
    device_event_retention_days: float = Field(default=90, ge=0)
    telemetry_retention_days: float = Field(default=30, ge=0)
    audit_retention_days: float = Field(default=365, ge=0)
    retention_interval_s: float = Field(default=3600, gt=0)
    retention_batch_rows: int = Field(default=5000, ge=1, le=1_000_000)

    @field_validator("default_waves")
    @classmethod
    def _waves_valid(cls, waves: list[WaveSpec]) -> list[WaveSpec]:
        from registry.rollout_service.schemas import check_waves

        check_waves(waves)
        return waves

    @model_validator(mode="before")
    @classmethod
    def _secrets_from_files(cls, values: Any) -> Any:
        """``X_file`` fills ``X`` from the file's text when ``X`` itself is not set."""
        if not isinstance(values, dict):
            return values
        for name in ("operator_tokens", "enrollment_token", "webhook_secret"):
            path = values.get(f"{name}_file")
            if path and not values.get(name):
                try:
                    values[name] = Path(path).read_text().strip()
                except OSError as exc:
                    raise ValueError(f"{name}_file: cannot read {path}: {exc.strerror}") from None
        return values

    @model_validator(mode="after")
    def _secrets_present(self) -> ServiceSettings:
        parse_entries(self.operator_tokens, setting="YOLO_OTA_OPERATOR_TOKENS", bare_prefix="operator", scoped=True)
        parse_entries(
            self.enrollment_token, setting="YOLO_OTA_ENROLLMENT_TOKEN", bare_prefix="enrollment", scoped=False
        )
        if self.dev_mode:
            return self
        # Enrollment tokens may all be made later (`yolo-ota enrollment-tokens create`); an operator token is the
        # way in to make them.
        missing = [] if (self.operator_tokens or "").strip() else ["YOLO_OTA_OPERATOR_TOKENS"]
        if self.public_url and not self.webhook_secret:
            missing.append("YOLO_OTA_WEBHOOK_SECRET (needed with YOLO_OTA_PUBLIC_URL)")
        if missing:
            raise ValueError(
                f"no {', '.join(missing)} set; the service has no default secrets outside dev mode "
                "(YOLO_OTA_DEV_MODE=true uses well-known tokens, for trials only)"
            )
        return self

    # -- derived ---------------------------------------------------------------------------------------------

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'rollouts.db'}"

    @property
    def operator_seeds(self) -> list[TokenEntry]:
        """The operator tokens the settings seed (dev mode without any: the well-known one, named ``dev``)."""
        entries = parse_entries(
            self.operator_tokens, setting="YOLO_OTA_OPERATOR_TOKENS", bare_prefix="operator", scoped=True
        )
        return entries or ([TokenEntry("dev", DEV_OPERATOR_TOKEN)] if self.dev_mode else [])

    @property
    def enrollment_seeds(self) -> list[TokenEntry]:
        """The enrollment tokens the settings seed (dev mode without any: the well-known one, named ``dev``)."""
        entries = parse_entries(
            self.enrollment_token, setting="YOLO_OTA_ENROLLMENT_TOKEN", bare_prefix="enrollment", scoped=False
        )
        return entries or ([TokenEntry("dev", DEV_ENROLLMENT_TOKEN)] if self.dev_mode else [])

    @property
    def webhook_key(self) -> str | None:
        if self.webhook_secret:
            return self.webhook_secret
        return DEV_WEBHOOK_SECRET if self.dev_mode else None

    @property
    def copies_promote(self) -> bool:
        """Whether a version copied into another registered model can be a promotion at all."""
        return bool(self.promotion_copy_suffix or self.promotion_targets)

    def promotion_source_of(self, target: str) -> str | None:
        """The registered model whose promotions ``target`` receives as copies, or None."""
        mapped = dict(part.partition("=")[::2] for part in _split(self.promotion_targets))
        if target in mapped:
            return mapped[target].strip() or None
        suffix = self.promotion_copy_suffix
        if suffix and target.endswith(suffix) and len(target) > len(suffix):
            return target[: -len(suffix)]
        return None

    @property
    def watched_models(self) -> list[str]:
        return _split(self.watch_models)

    @property
    def variant_order(self) -> list[str]:
        return _split(self.variant_preference)


def _split(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def load_settings(config_file: Path | None = None, **overrides: Any) -> ServiceSettings:
    """Settings from ``overrides`` (flags; None is not given), the environment and the config file (``config_file``,
    else the one found); one readable error if invalid."""
    from pydantic import ValidationError

    config = read_config(config_file, error=ServiceSettingsError)
    try:
        return build(ServiceSettings, config, overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        raise ServiceSettingsError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None
