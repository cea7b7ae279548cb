"""Where each effective setting comes from, for ``yolo-ota config show``; secrets masked."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from enum import Enum
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel

from yolo_ota.config import MLFLOW_URI_FALLBACK_ENV, ConfigFile, LayeredSettings, environment_values

MASK = "********"
_SECRET_WORDS = ("token", "secret", "password")
# Read by MLflow itself, for the registry commands and the service's gateway; shown, never changed.
MLFLOW_VARIABLES = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
)


@dataclass(frozen=True)
class Origin:
    """One setting: its name, its value as text (masked if secret) and where it came from."""

    name: str
    value: str
    source: str


def is_secret(name: str) -> bool:
    return any(word in name.lower() for word in _SECRET_WORDS)


def masked(name: str, value: Any) -> str:
    """``value`` as text; a secret as ``********``, and the password inside a URL masked."""
    if value is None:
        return "-"
    if is_secret(name):
        return MASK
    text = _text(value)
    if "://" in text:
        parts = urlsplit(text)
        if parts.password:
            netloc = f"{parts.username}:{MASK}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
            return urlunsplit(parts._replace(netloc=netloc))
    return text


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_none=True)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _text(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, dict | list | tuple):
        return json.dumps(_plain(value), default=str)
    return str(value)


def origins(settings_cls: type[LayeredSettings], config: ConfigFile) -> list[Origin]:
    """Every setting of ``settings_cls`` as the environment, the file, a fallback or the default gives it."""
    env = environment_values(settings_cls)
    family = settings_cls.config_family
    section = config.section(family, top_level=settings_cls.config_top_level)
    found: list[Origin] = []
    for name, field in settings_cls.model_fields.items():
        fallback = os.environ.get(MLFLOW_URI_FALLBACK_ENV) if name == "mlflow_uri" else None
        if name in env:
            value, source = env[name], f"env {settings_cls.env_name(name)}"
        elif name in section:
            value, source = section[name], config.where(family, name)
        elif fallback:
            value, source = fallback, f"env {MLFLOW_URI_FALLBACK_ENV}"
        elif field.is_required():
            value, source = None, "required, not set"
        else:
            value, source = field.get_default(call_default_factory=True), "default"
        found.append(Origin(name, masked(name, value), source))
    return found


def mlflow_variables() -> list[Origin]:
    """MLflow's own connection variables that are set here (passed to MLflow untouched)."""
    return [
        Origin(name, masked(name, os.environ[name]), f"env {name}") for name in MLFLOW_VARIABLES if name in os.environ
    ]
