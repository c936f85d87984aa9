"""The production backends the tests run against: PostgreSQL (Prefect's server, MLflow's store) and Redis (datasketch's
LSH storage), on 127.0.0.1 as every development and CI machine runs them.

Where one is not reachable (a contributor's laptop) a test falls back or skips and says so; on CI (CI=true) it fails
instead, so CI never passes on the fallback.
"""

from __future__ import annotations

import asyncio
import os
import uuid

POSTGRES = os.environ.get("SFTPIPE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
REDIS_HOST, REDIS_PORT = os.environ.get("SFTPIPE_TEST_REDIS", "127.0.0.1:6379").rsplit(":", 1)


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


class BackendMissing(RuntimeError):
    pass


def unavailable(what: str, why: object) -> str:
    """The message for a missing backend; raises on CI, where falling back would hide what production runs on."""
    message = f"{what} is not reachable ({why})"
    if on_ci():
        raise BackendMissing(f"{message}; CI must test against it, not fall back")
    return message


async def _admin(sql: str) -> None:
    import asyncpg

    con = await asyncpg.connect(f"{POSTGRES}/postgres", timeout=5)
    try:
        await con.execute(sql)
    finally:
        await con.close()


def create_database(prefix: str) -> str:
    """A new, empty PostgreSQL database; returns its name. Raises OSError (or asyncpg's errors) when unreachable."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    return name


def drop_database(name: str) -> None:
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def database_url(name: str, driver: str) -> str:
    """SQLAlchemy URL of database `name` with `driver` (asyncpg for Prefect, psycopg2 for MLflow)."""
    return f"{POSTGRES.replace('postgresql://', f'postgresql+{driver}://', 1)}/{name}"
