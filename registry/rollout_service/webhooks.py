"""MLflow's webhooks to this service: where they arrive, and the check of their HMAC signature and timestamp.

MLflow signs ``<delivery id>.<timestamp>.<body>`` with HMAC-SHA256 under the shared secret and sends
``X-MLflow-Signature: v1,<base64>``. A delivery more than five minutes from this service's clock is refused;
within that window, ``PromotionWatcher.remember_delivery`` refuses a delivery id seen before, so a captured
webhook cannot be sent again.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

from registry.rollout_service.errors import NotAuthenticatedError

WEBHOOK_NAME = "yolo-ota-rollout-service"
WEBHOOK_EVENTS = ("model_version_alias.created", "model_version.created")
WEBHOOK_PATH = "/v1/hooks/mlflow"
SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_HEADER = "X-MLflow-Delivery-Id"
WEBHOOK_REPLAY_WINDOW_S = 300


def verify_webhook(
    secret: str, headers: Mapping[str, str], body: bytes, *, now_s: float | None = None
) -> dict[str, Any]:
    """The webhook's JSON payload, if its HMAC signature and timestamp check out; else ``NotAuthenticatedError``."""
    signature = headers.get(SIGNATURE_HEADER.lower(), "")
    timestamp = headers.get(TIMESTAMP_HEADER.lower(), "")
    delivery = headers.get(DELIVERY_HEADER.lower(), "")
    if not (signature and timestamp and delivery):
        raise NotAuthenticatedError("webhook without signature, timestamp or delivery id")
    try:
        age_s = abs((now_s if now_s is not None else time.time()) - int(timestamp))
    except ValueError:
        raise NotAuthenticatedError("webhook timestamp is not a number") from None
    if age_s > WEBHOOK_REPLAY_WINDOW_S:
        raise NotAuthenticatedError(f"webhook timestamp is {age_s:.0f} s off; replay refused")
    signed = f"{delivery}.{timestamp}.".encode() + body
    expected = "v1," + base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode()
    if not hmac.compare_digest(expected, signature):
        raise NotAuthenticatedError("webhook signature does not match")
    try:
        payload = json.loads(body)
    except ValueError:
        raise NotAuthenticatedError("webhook body is not JSON") from None
    if not isinstance(payload, dict):
        raise NotAuthenticatedError("webhook body is not a JSON object")
    return payload
