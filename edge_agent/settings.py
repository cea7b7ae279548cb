"""Settings of the edge agent: flags, then ``YOLO_OTA_AGENT_*`` environment variables, then the config file.

The file is the one every command reads (``yolo_ota.config``), except that ``YOLO_OTA_AGENT_CONFIG`` names it
before ``YOLO_OTA_CONFIG`` does: ``--config``, ``YOLO_OTA_AGENT_CONFIG``, ``YOLO_OTA_CONFIG``, ``./yolo-ota.toml``,
the user's config folder. The agent reads its ``[agent]`` table and, as its files had before tables, plain keys at
the top of the file. Built once in ``main`` (or by a test, or by a program that embeds the agent) and passed down;
never read at import time.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from edge_agent.bounds import DEFAULT_MAX_BUNDLE_BYTES, DEFAULT_MAX_BUNDLE_FILES
from edge_agent.errors import AgentSettingsError
from yolo_ota.config import CONFIG_FILE_ENV as SHARED_CONFIG_FILE_ENV
from yolo_ota.config import LayeredSettings, build, read_config

CONFIG_FILE_ENV = "YOLO_OTA_AGENT_CONFIG"
_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
MIN_API_TOKEN_CHARS = 16


class AgentSettings(LayeredSettings):
    """Everything the agent reads."""

    model_config = SettingsConfigDict(env_prefix="YOLO_OTA_AGENT_", extra="ignore", frozen=True)
    config_family = "agent"
    config_env_names = (CONFIG_FILE_ENV, SHARED_CONFIG_FILE_ENV)
    config_top_level = True

    server: str  # rollout service base URL
    device_id: str
    data_dir: Path
    enrollment_token: str | None = None  # only needed to enroll a new id
    enrollment_token_file: Path | None = None  # the same, read from a file (neither a flag nor `ps` shows it)
    public_key: Path | None = None  # the release key: unsigned or badly signed bundles and revocation lists refused
    # Without a release key the agent refuses to start, unless it is told it may (and then says so at every start
    # and in /v1/status): allow_unsigned, or dev (trials on one machine).
    allow_unsigned: bool = False
    dev: bool = False
    # The key the service signs desired states with (base64 of its 32 bytes); default: pinned at first enrollment.
    service_key: str | None = Field(default=None, max_length=64)
    # MLflow's login, for bundle files fetched through its artifact proxy: sent to mlflow_url's origin only.
    mlflow_url: str | None = None
    mlflow_username: str | None = None
    mlflow_password: str | None = None
    mlflow_password_file: Path | None = None  # the same, read from a file
    listen: str | None = "127.0.0.1:8710"  # local API; None: no HTTP server (in-process use)
    labels: dict[str, str] = Field(default_factory=dict)
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # CUDA serving: letterbox, decode and NMS on the GPU (None: for CUDA variants), the forward from a CUDA graph.
    device_pipeline: bool | None = None
    cuda_graphs: bool = True

    poll_interval_s: float | None = Field(default=None, gt=0)  # default: what the service says
    poll_jitter: float = Field(default=0.1, ge=0, le=1)  # +- this fraction of the interval
    backoff_max_s: float = Field(default=300.0, gt=0)
    http_timeout_s: float = Field(default=30.0, gt=0)
    report_interval_s: float = Field(default=30.0, gt=0)  # telemetry; events are sent at once

    download_attempts: int = Field(default=5, ge=1)
    min_free_bytes: int = Field(default=64 << 20, ge=0)  # kept free on the data dir's disk after a download
    validation_timeout_s: float = Field(default=600.0, gt=0)
    validation_nice: int = Field(default=10, ge=0, le=19)  # validation yields the CPU to serving
    memory_headroom: float = Field(default=0.2, ge=0, lt=1)  # GPU share that must stay free after loading
    # Shadow validation (thresholds come with the desired state): the ring of sampled request images it runs on.
    shadow_sample_every: int = Field(default=2, ge=1)  # keep every k-th answered request's image
    shadow_ring_frames: int = Field(default=64, ge=0)  # 0: keep none (shadow validation then uses golden data)
    shadow_ring_bytes: int = Field(default=32 << 20, ge=0)
    shadow_time_limit_s: float | None = Field(default=None, ge=0)  # caps the desired state's time_limit_s

    probation_inferences: int = Field(default=200, ge=1)
    probation_s: float = Field(default=60.0, gt=0)
    probation_min_inferences: int = Field(default=20, ge=1)  # probed with golden inputs when traffic is scarce
    probation_p99_factor: float = Field(default=1.5, ge=1)
    keep_versions: int = Field(default=3, ge=2)  # installed versions kept on disk, the serving one included
    # Seconds to wait right after a state is saved, before its step runs: for crash-recovery drills (kill the
    # agent while it sits in a state) and demos. Empty in production.
    pause_on_enter: dict[str, float] = Field(default_factory=dict)

    # The local API (edge_agent.api, edge_agent.image_limits): an optional bearer token and the limits of /v1/detect.
    api_token: str | None = None  # when set, every route but /healthz needs "Authorization: Bearer <token>"
    api_token_file: Path | None = None  # the same, read from a file
    max_image_bytes: int = Field(default=32 << 20, ge=1)  # a larger body is refused (413) before it is read
    max_image_pixels: int = Field(default=36_000_000, ge=1)  # width x height from the header, before decoding (413)
    max_concurrent_decodes: int = Field(default=4, ge=1)  # /v1/detect requests reading, decoding, detecting at once
    decode_wait_s: float = Field(default=1.0, ge=0)  # wait for a free slot, then 503 with Retry-After
    # Bounds on what the service sends (edge_agent.bounds).
    min_poll_interval_s: float = Field(default=1.0, gt=0)  # the service's poll period is clamped to these two
    max_poll_interval_s: float = Field(default=3600.0, gt=0)
    max_bundle_bytes: int = Field(default=DEFAULT_MAX_BUNDLE_BYTES, ge=1)  # an offer's files together; refused above
    max_bundle_files: int = Field(default=DEFAULT_MAX_BUNDLE_FILES, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _secrets_from_files(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        for name in ("enrollment_token", "mlflow_password", "api_token"):
            if values.get(f"{name}_file") and not values.get(name):
                path = Path(values[f"{name}_file"])
                try:
                    values[name] = path.read_text().strip() or None
                except OSError as exc:
                    raise ValueError(f"{name}_file: cannot read {path}: {exc.strerror}") from None
        return values

    @model_validator(mode="after")
    def _mlflow_login(self) -> AgentSettings:
        if bool(self.mlflow_username) != bool(self.mlflow_password):
            raise ValueError("mlflow_username and mlflow_password go together")
        if self.mlflow_username and not self.mlflow_url:
            raise ValueError("mlflow_url is needed with mlflow_username: the only origin the login is sent to")
        return self

    @model_validator(mode="after")
    def _poll_bounds(self) -> AgentSettings:
        if self.min_poll_interval_s > self.max_poll_interval_s:
            raise ValueError("min_poll_interval_s is above max_poll_interval_s")
        return self

    @field_validator("api_token")
    @classmethod
    def _api_token(cls, value: str | None) -> str | None:
        if value is not None and len(value) < MIN_API_TOKEN_CHARS:
            raise ValueError(f"at least {MIN_API_TOKEN_CHARS} characters (e.g. `openssl rand -base64 32`)")
        return value

    @field_validator("server", "mlflow_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value.rstrip("/")

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, value: str) -> str:
        if not _DEVICE_ID.match(value):
            raise ValueError(f"{value!r}: letters, digits and . _ : - only, starting with a letter or digit")
        return value

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value in (None, "", "off"):
            return None
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{value!r} is not HOST:PORT")
        return value

    @property
    def listen_address(self) -> tuple[str, int] | None:
        if self.listen is None:
            return None
        host, _, port = self.listen.rpartition(":")
        return host, int(port)


def load_settings(config_file: Path | None = None, **overrides: Any) -> AgentSettings:
    """Settings from ``overrides`` (flags; None is not given), the environment and the config file (``config_file``,
    else the one found); one readable error if invalid."""
    config = read_config(config_file, env_names=AgentSettings.config_env_names, error=AgentSettingsError)
    try:
        return build(AgentSettings, config, overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "settings"
        flag = "--" + where.replace("_", "-")
        raise AgentSettingsError(
            f"{flag} (or YOLO_OTA_AGENT_{where.upper()}): {first['msg']}".replace("Field required", "required")
        ) from None
