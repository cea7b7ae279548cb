"""Settings of the command families that run on an operator's machine (export, gate, keys, registry, rollout).

The rollout service's settings are ``registry.rollout_service.settings.ServiceSettings`` (``[server]``) and the
agent's are ``edge_agent.settings.AgentSettings`` (``[agent]``); all of them are read by ``yolo_ota.config``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from yolo_ota.config import LayeredSettings

DEFAULT_ROLLOUT_SERVER = "http://127.0.0.1:8700"


class ExportSettings(LayeredSettings):
    """``yolo-ota export``: ``[export]``, ``YOLO_OTA_EXPORT_*``."""

    model_config = SettingsConfigDict(env_prefix="YOLO_OTA_EXPORT_", extra="ignore", frozen=True)
    config_family = "export"

    imgsz: str = "640"  # 640, or height,width
    variants: str = "cpu-fp32,cuda-fp32,cuda-fp16"
    formats: str | None = None  # torchscript,aoti,onnx; None: every format this machine can make and check
    batch: int = Field(default=1, ge=1)
    latency_budget_ms: float | None = Field(default=None, gt=0)
    noise_inputs: int = Field(default=2, ge=0)
    signing_key: Path | None = None

    @field_validator("imgsz", mode="before")
    @classmethod
    def _imgsz_text(cls, value: object) -> object:
        return str(value) if isinstance(value, int) else value  # imgsz = 640 in the file


class GateSettings(LayeredSettings):
    """``yolo-ota gate`` and ``yolo-ota inspect``: ``[gate]``, ``YOLO_OTA_GATE_*``."""

    model_config = SettingsConfigDict(env_prefix="YOLO_OTA_GATE_", extra="ignore", frozen=True)
    config_family = "gate"

    device: Literal["auto", "cuda", "cpu"] = "auto"
    latency_budget_ms: float | None = Field(default=None, gt=0)  # default: the one recorded at export
    public_key: Path | None = None


class KeysSettings(LayeredSettings):
    """``yolo-ota keys``: ``[keys]``, ``YOLO_OTA_KEYS_*``."""

    model_config = SettingsConfigDict(env_prefix="YOLO_OTA_KEYS_", extra="ignore", frozen=True)
    config_family = "keys"

    directory: Path | None = None  # where ``keys generate`` writes the pair


class RegistrySettings(LayeredSettings):
    """``yolo-ota register``, ``versions`` and ``promote``: ``[registry]``, ``YOLO_OTA_*``.

    ``mlflow_uri`` falls back to ``MLFLOW_TRACKING_URI``; MLflow's own credential variables
    (``MLFLOW_TRACKING_USERNAME``, ``MLFLOW_TRACKING_TOKEN``, ...) are read by MLflow itself.
    """

    model_config = SettingsConfigDict(env_prefix="YOLO_OTA_", extra="ignore", frozen=True)
    config_family = "registry"

    mlflow_uri: str | None = None
    experiment: str = "yolo-ota"  # the MLflow experiment of the bundles' runs
    promotion_alias: str = "production"  # the alias ``promote`` sets; the service watches the same name


class RolloutSettings(LayeredSettings):
    """``yolo-ota rollout ...``: ``[rollout]``, ``YOLO_OTA_SERVER`` and ``YOLO_OTA_TOKEN``."""

    model_config = SettingsConfigDict(env_prefix="YOLO_OTA_", extra="ignore", frozen=True)
    config_family = "rollout"

    server: str = DEFAULT_ROLLOUT_SERVER  # the rollout service's URL
    token: str | None = None  # an operator token, sent as a bearer token
