"""Presigned S3 URLs, for devices that fetch a bundle straight from S3 instead of through MLflow's artifact proxy.

A version whose source is an ``s3://`` URI (an MLflow server run with ``--no-serve-artifacts`` and an S3
artifact root) cannot be fetched by a device without AWS credentials; the rollout service, which has them,
hands out short-lived presigned GET URLs instead. ``boto3`` is imported only when a presigner is made.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from urllib.parse import urlsplit

from registry.errors import RegistryRequestError

DEFAULT_EXPIRES_S = 3600


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key); ``RegistryRequestError`` for anything else."""
    parts = urlsplit(uri)
    key = parts.path.lstrip("/")
    if parts.scheme != "s3" or not parts.netloc or not key:
        raise RegistryRequestError(f"{uri!r} is not an s3://bucket/key URI of one object")
    return parts.netloc, key


def s3_presigner(
    *, endpoint_url: str | None = None, expires_s: int = DEFAULT_EXPIRES_S, region: str | None = None
) -> Callable[[str], str]:
    """A function turning ``s3://bucket/key`` into a presigned GET URL valid for ``expires_s`` seconds.

    ``endpoint_url`` defaults to ``MLFLOW_S3_ENDPOINT_URL`` (the setting MLflow itself uses for S3-compatible
    stores such as MinIO), then to AWS. Credentials come from boto3's usual chain (environment, profile, role).
    """
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    if expires_s <= 0:
        raise RegistryRequestError(f"presigned URLs need a positive lifetime, not {expires_s} s")
    endpoint = endpoint_url or os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None
    # Path-style addressing: custom endpoints (MinIO, loopback) rarely resolve bucket sub-domains.
    config = Config(signature_version="s3v4", s3={"addressing_style": "path" if endpoint else "auto"})
    client = boto3.client("s3", endpoint_url=endpoint, region_name=region, config=config)

    def presign(uri: str) -> str:
        bucket, key = split_s3_uri(uri)
        try:
            url: str = client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_s
            )
        except (BotoCoreError, ClientError) as exc:
            raise RegistryRequestError(f"cannot presign {uri}: {exc}") from exc
        return url

    return presign
