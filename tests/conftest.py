"""Fixtures for every test: real PostgreSQL, NATS and S3 on loopback, isolated per test.

Scopes keep the suite fast: one migrated template database and one moto server per
session; per test, a database cloned from the template (a file copy, milliseconds), a
fresh bucket name and a nats-server of its own (~50 ms), so tests may stop it.

The fixtures are synchronous on purpose: sync and async tests can both use them, and no
fixture is tied to one event loop. Database work runs on a short-lived loop in a thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
from hypothesis import HealthCheck, settings

from tools.infra import (
    DEFAULT_DATABASE_URL,
    REPO_ROOT,
    MotoS3Server,
    NatsServer,
    ServiceProcess,
    create_database,
    drop_database,
    dsn_with_database,
    ensure_postgres_running,
    free_port,
)

T = TypeVar("T")

# Hypothesis drives real servers: an example takes milliseconds of I/O, not microseconds,
# and one server serves every example of a test. No example database: runs stay apart.
settings.register_profile(
    "casefile",
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "casefile"))

# Tokens every test stack accepts; `auth_tokens` hands them to tests, `make_env` to services.
TEST_TOKENS = {"admin": "test-admin", "gateway": "test-gateway", "story": "test-story", "image": "test-image"}
TEST_AWS_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
# Variables that would let a developer's own AWS setup leak into a test.
AMBIENT_AWS_VARIABLES = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
# What a child process needs from our environment; nothing else (no provider keys) leaks in.
INHERITED_VARIABLES = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
SERVICE_STOP_GRACE_S = 5.0


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync fixture code, whatever loop the test uses."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def unique_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def migration_directories() -> dict[str, Path]:
    """services/<name>/migrations for every service that has one; the schema is the name."""
    return {path.parent.name: path for path in sorted((REPO_ROOT / "services").glob("*/migrations")) if path.is_dir()}


async def apply_all_migrations(dsn: str) -> dict[str, list[str]]:
    """Every service's migrations into one database; the versions applied per schema."""
    directories = migration_directories()
    if not directories:
        return {}
    from shared.migrations import apply_migrations  # imported here: tools-only tests run without it

    conn = await asyncpg.connect(dsn)
    try:
        return {name: await apply_migrations(conn, schema=name, directory=path) for name, path in directories.items()}
    finally:
        await conn.close()


# ---------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def postgres_admin_dsn() -> str:
    """A DSN for the `postgres` maintenance database on the server DATABASE_URL names."""
    dsn = os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL)
    ensure_postgres_running(dsn)
    return dsn_with_database(dsn, "postgres")


@pytest.fixture(scope="session")
def database_template(postgres_admin_dsn: str) -> Iterator[str]:
    """Name of a database holding every service's migrations, dropped at session end."""
    name = unique_name("casefile_template")
    run_async(create_database(postgres_admin_dsn, name))
    try:
        run_async(apply_all_migrations(dsn_with_database(postgres_admin_dsn, name)))
        yield name
    finally:
        run_async(drop_database(postgres_admin_dsn, name))


@pytest.fixture
def database_url(postgres_admin_dsn: str, database_template: str) -> Iterator[str]:
    """DSN of a database of this test's own, migrated, dropped afterwards."""
    name = unique_name("casefile_test")
    run_async(create_database(postgres_admin_dsn, name, template=database_template))
    try:
        yield dsn_with_database(postgres_admin_dsn, name)
    finally:
        run_async(drop_database(postgres_admin_dsn, name))


# ---------------------------------------------------------------------------- NATS


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server with JetStream for this test; stop()/start() simulate an outage."""
    server = NatsServer(tmp_path / "nats").start()
    try:
        yield server
    finally:
        server.stop(grace=5.0)


# ---------------------------------------------------------------------------- S3


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3Server]:
    """One moto S3 server for the session; tests keep apart by bucket."""
    server = MotoS3Server(tmp_path_factory.mktemp("moto") / "moto.log").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """Fake AWS credentials in os.environ for this test only; the same dict, for child processes."""
    for variable in AMBIENT_AWS_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    no_file = str(tmp_path / "no-aws-config")  # keeps ~/.aws out of the test
    env = {**TEST_AWS_ENV, "AWS_CONFIG_FILE": no_file, "AWS_SHARED_CREDENTIALS_FILE": no_file}
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    return env


@pytest.fixture
def s3_endpoint_url(s3_server: MotoS3Server, aws_credentials: dict[str, str]) -> str:
    return s3_server.endpoint_url


@pytest.fixture
def s3_bucket(s3_server: MotoS3Server, aws_credentials: dict[str, str]) -> str:
    """A bucket name no other test uses; the code under test creates the bucket."""
    return f"test-{uuid.uuid4().hex[:20]}"


# ---------------------------------------------------------------------------- processes


@pytest.fixture
def auth_tokens() -> dict[str, str]:
    """caller -> token, as the services started by `make_env` accept them."""
    return dict(TEST_TOKENS)


@pytest.fixture
def make_env(
    database_url: str,
    nats_server: NatsServer,
    s3_endpoint_url: str,
    s3_bucket: str,
    aws_credentials: dict[str, str],
    auth_tokens: dict[str, str],
) -> Callable[..., dict[str, str]]:
    """make_env(**overrides) -> the complete environment of a service process for this test.

    Every call in one test gives the same addresses, so services started from it find each other.
    """
    base = {
        **{variable: os.environ[variable] for variable in INHERITED_VARIABLES if variable in os.environ},
        "STORY_ADDR": f"127.0.0.1:{free_port()}",
        "IMAGE_ADDR": f"127.0.0.1:{free_port()}",
        "CREDITS_ADDR": f"127.0.0.1:{free_port()}",
        "DATABASE_URL": database_url,
        "NATS_URL": nats_server.url,
        "S3_ENDPOINT_URL": s3_endpoint_url,
        "S3_BUCKET": s3_bucket,
        **aws_credentials,
        "AUTH_TOKENS": ",".join(f"{caller}:{token}" for caller, token in auth_tokens.items()),
        "PORTRAIT_PROVIDER": "local",
        "STORY_WRITER": "local",
    }

    def make(**overrides: str) -> dict[str, str]:
        return {**base, **overrides}

    return make


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """start_service(name, env) -> a running ServiceProcess, stopped (as a group) after the test.

    Then `await process.wait_healthy(env["<NAME>_ADDR"])`; `process.log_tail()` for asserts.
    """
    started: list[ServiceProcess] = []

    def start(name: str, env: dict[str, str], **options: Any) -> ServiceProcess:
        log_path = tmp_path / "logs" / f"{name}-{len(started)}.log"
        process = ServiceProcess(name, env, log_path, **options).start()
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in reversed(started):
            process.terminate(grace=SERVICE_STOP_GRACE_S)
