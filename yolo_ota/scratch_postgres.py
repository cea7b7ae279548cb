"""Scratch PostgreSQL databases for the tests and the benchmarks: created empty, dropped after use.

The server is the one ``YOLO_OTA_TEST_POSTGRES`` names (an admin connection URL), by default a local one with
trust authentication; nothing here runs when it is not reachable.
"""

from __future__ import annotations

import os

ADMIN_URL_ENV = "YOLO_OTA_TEST_POSTGRES"
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"


def admin_url() -> str:
    return os.environ.get(ADMIN_URL_ENV, DEFAULT_ADMIN_URL)


def postgres_reachable() -> bool:
    """Whether the admin URL accepts a connection within 3 s (psycopg installed, server up, access granted)."""
    try:
        import psycopg

        with psycopg.connect(admin_url(), connect_timeout=3):
            return True
    except Exception:
        return False


def create_postgres_database(name: str) -> str:
    """A new, empty database ``name`` (an older one of that name is dropped first); returns its SQLAlchemy URL."""
    import psycopg

    with psycopg.connect(admin_url(), autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        connection.execute(f'CREATE DATABASE "{name}"')
    base = admin_url().rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return f"{base}/{name}"


def drop_postgres_database(name: str) -> None:
    import psycopg

    with psycopg.connect(admin_url(), autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
