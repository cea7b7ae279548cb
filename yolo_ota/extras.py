"""Which install extra brings each optional library, so that a command run without it can say what to install.

The core install (numpy, pydantic, typer, rich, cryptography) reads and verifies bundles; everything that runs a
model, talks to MLflow or serves the REST API comes with an extra (pyproject.toml). tests/test_infra.py checks
this table against uv.lock.
"""

from __future__ import annotations

# top-level module -> (distribution, the smallest extra that installs it)
MODULE_EXTRAS: dict[str, tuple[str, str]] = {
    "torch": ("torch", "gate"),
    "torchvision": ("torchvision", "export"),
    "ultralytics": ("ultralytics", "export"),
    "mlflow": ("mlflow", "registry"),
    "boto3": ("boto3", "registry"),
    "httpx": ("httpx", "registry"),
    "fastapi": ("fastapi", "server"),
    "uvicorn": ("uvicorn", "server"),
    "sqlalchemy": ("sqlalchemy", "server"),
    "alembic": ("alembic", "server"),
    "psycopg": ("psycopg", "server"),
    "cv2": ("opencv-python-headless", "agent"),
    "tenacity": ("tenacity", "agent"),
    "prometheus_client": ("prometheus-client", "agent"),
}


def missing_extra_message(error: ModuleNotFoundError) -> str | None:
    """One line naming the extra to install for ``error``'s module; ``None`` for a module no extra brings."""
    module = (error.name or "").partition(".")[0]
    if module not in MODULE_EXTRAS:
        return None
    distribution, extra = MODULE_EXTRAS[module]
    return f"this command needs {distribution}, which is not installed: install yolo-ota[{extra}]"
