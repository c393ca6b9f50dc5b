"""`make run`: the whole casefile stack on one machine, with no keys and no network.

PostgreSQL is the machine's own; NATS and S3 are started here unless the environment
points at running ones; then credits, story and image start in dependency order. Ctrl-C
stops what this process started, services first, and leaves the data in the run directory
(and PostgreSQL) for the next run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import shutil
import signal
import sys
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from shared.logs import configure_logging
from tools.infra import (
    DEFAULT_DATABASE_URL,
    REPO_ROOT,
    ManagedProcess,
    NatsServer,
    ProcessExited,
    RcloneS3Server,
    ServiceProcess,
    create_database,
    database_name,
    dsn_with_database,
    ensure_postgres_running,
    find_binary,
    tcp_answers,
)

log = logging.getLogger(__name__)

# CONTRACT.md's defaults for `make run`; anything already in the environment wins.
SERVICE_DEFAULTS = {
    "STORY_ADDR": "127.0.0.1:50051",
    "IMAGE_ADDR": "127.0.0.1:50052",
    "CREDITS_ADDR": "127.0.0.1:50053",
    "DATABASE_URL": DEFAULT_DATABASE_URL,
    "NATS_URL": "nats://127.0.0.1:4222",
    "S3_BUCKET": "casefile",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AUTH_TOKENS": "admin:dev-admin,gateway:dev-gateway,story:dev-story,image:dev-image",
    "PORTRAIT_PROVIDER": "local",
    "STORY_WRITER": "local",
}
# Each service's Prometheus endpoint under `make run`: its own port, given to it as
# METRICS_ADDR. <NAME>_METRICS_ADDR overrides one; an empty value turns its metrics off.
METRICS_DEFAULTS = {
    "STORY_METRICS_ADDR": "127.0.0.1:9151",
    "IMAGE_METRICS_ADDR": "127.0.0.1:9152",
    "CREDITS_METRICS_ADDR": "127.0.0.1:9153",
}
# Only ever used against the S3 server started here, which accepts nothing else.
LOCAL_S3_ACCESS_KEY = "casefile-dev"
LOCAL_S3_SECRET_KEY = "casefile-dev-secret"
DEFAULT_S3_PORT = 9000
# Credits first: story and image call it; image calls story.
START_ORDER = ("credits", "story", "image")
SERVICE_START_TIMEOUT_S = 60.0
SERVICE_STOP_GRACE_S = 10.0
WATCH_INTERVAL_S = 0.5


class StackFailed(RuntimeError):
    """Start-up could not finish; the message says what to do."""


@dataclass(frozen=True)
class StackConfig:
    run_dir: Path
    s3_port: int
    service_env: Mapping[str, str]

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"


def read_config(environ: Mapping[str, str]) -> StackConfig:
    """The stack's settings: CONTRACT.md's defaults under whatever the environment says."""
    run_dir = Path(environ.get("CASEFILE_RUN_DIR") or REPO_ROOT / ".run").resolve()
    raw_port = environ.get("STACK_S3_PORT", str(DEFAULT_S3_PORT))
    if not raw_port.isdigit():
        raise StackFailed(f"STACK_S3_PORT must be a port number, got {raw_port!r}")
    service_env = {**SERVICE_DEFAULTS, **METRICS_DEFAULTS, **environ}
    return StackConfig(run_dir=run_dir, s3_port=int(raw_port), service_env=service_env)


class Stack:
    """What this launcher started, so it stops exactly that, in reverse order."""

    def __init__(self, config: StackConfig):
        self.config = config
        self.env = dict(config.service_env)
        self.infrastructure: list[ManagedProcess] = []
        self.services: list[ServiceProcess] = []

    async def prepare_database(self) -> None:
        dsn = self.env["DATABASE_URL"]
        await asyncio.to_thread(ensure_postgres_running, dsn)
        name = database_name(dsn)
        if await create_database(dsn_with_database(dsn, "postgres"), name):
            log.info("stack.database_created", extra={"database": name})

    def start_nats_unless_running(self) -> None:
        url = urlsplit(self.env["NATS_URL"])
        host, port = url.hostname or "127.0.0.1", url.port or 4222
        if tcp_answers(host, port):
            log.info("stack.nats_reused", extra={"url": self.env["NATS_URL"]})
            return
        server = NatsServer(
            self.config.run_dir / "nats", host=host, port=port, log_path=self.config.log_dir / "nats.log"
        )
        self.infrastructure.append(server.start())

    def start_s3_unless_configured(self) -> None:
        if self.env.get("S3_ENDPOINT_URL"):
            log.info("stack.s3_reused", extra={"endpoint": self.env["S3_ENDPOINT_URL"]})
            return
        server = RcloneS3Server(
            self.config.run_dir / "s3",
            access_key=LOCAL_S3_ACCESS_KEY,
            secret_key=LOCAL_S3_SECRET_KEY,
            port=self.config.s3_port,
            log_path=self.config.log_dir / "s3.log",
        )
        try:
            self.infrastructure.append(server.start())
        except RuntimeError as error:
            raise StackFailed(f"{error}\nSet STACK_S3_PORT to a free port, or S3_ENDPOINT_URL to a running S3.") from error
        # The services talk only to this server, so a user's real AWS keys stay out of it.
        self.env.update(
            S3_ENDPOINT_URL=server.endpoint_url,
            AWS_ACCESS_KEY_ID=LOCAL_S3_ACCESS_KEY,
            AWS_SECRET_ACCESS_KEY=LOCAL_S3_SECRET_KEY,
        )

    async def start_services(self, stopping: asyncio.Event) -> bool:
        """Start each service and wait for it to be healthy; False if told to stop meanwhile."""
        for name in START_ORDER:
            if stopping.is_set():
                return False
            service = ServiceProcess(name, service_env(self.env, name), self.config.log_dir / f"{name}.log").start()
            self.services.append(service)
            address = self.env[f"{name.upper()}_ADDR"]
            try:
                healthy = await _unless_stopping(service.wait_healthy(address, SERVICE_START_TIMEOUT_S), stopping)
            except (ProcessExited, TimeoutError) as error:
                raise StackFailed(str(error)) from error
            if not healthy:
                return False
            log.info("stack.service_started", extra={"service": name, "addr": address})
        return True

    async def watch_services(self, stopping: asyncio.Event) -> int:
        """Wait for a stop request (exit code 0) or a service's death (exit code 1)."""
        while not stopping.is_set():
            for service in self.services:
                if not service.is_running():
                    log.error(
                        "stack.service_died",
                        extra={"service": service.name, "exit_code": service.returncode, "log": str(service.log_path)},
                    )
                    sys.stderr.write(f"{service.label} died; last lines of {service.log_path}:\n{service.log_tail()}\n")
                    return 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WATCH_INTERVAL_S):
                    await stopping.wait()
        return 0

    async def stop(self) -> None:
        """Services first (they drain NATS and flush to S3 on SIGTERM), then what we started."""
        for service in reversed(self.services):
            await service.terminate_async(SERVICE_STOP_GRACE_S)
        for server in reversed(self.infrastructure):
            await server.terminate_async(SERVICE_STOP_GRACE_S)
        log.info("stack.stopped")

    def kill(self) -> None:
        for process in [*reversed(self.services), *reversed(self.infrastructure)]:
            process.kill()


def service_env(env: Mapping[str, str], name: str) -> dict[str, str]:
    """The environment of one service: the stack's, with that service's own METRICS_ADDR."""
    return {**env, "METRICS_ADDR": env.get(f"{name.upper()}_METRICS_ADDR", "")}


def _metrics_lines(env: Mapping[str, str]) -> list[str]:
    lines = []
    for name in START_ORDER:
        addr = env.get(f"{name.upper()}_METRICS_ADDR", "")
        lines.append(f"  {name:<8} http://{addr}/metrics" if addr else f"  {name:<8} off")
    return lines


async def _unless_stopping(work: Awaitable[None], stopping: asyncio.Event) -> bool:
    """Run `work` unless `stopping` is set first; True when the work finished."""
    work_task = asyncio.ensure_future(work)
    stop_task = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({work_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work_task, stop_task):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if work_task.cancelled():
        return False
    work_task.result()
    return True


def _install_signal_handlers(stack: Stack, stopping: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stopping.is_set():
            # A second Ctrl-C means "now": no more grace periods.
            log.warning("stack.kill_requested", extra={"signal": signal.Signals(signum).name})
            stack.kill()
            os._exit(1)
        log.info("stack.stop_requested", extra={"signal": signal.Signals(signum).name})
        stopping.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)


async def run(config: StackConfig) -> int:
    """Start everything, wait for Ctrl-C or a crash, stop everything; the exit code."""
    stack = Stack(config)
    stopping = asyncio.Event()
    _install_signal_handlers(stack, stopping)
    try:
        await stack.prepare_database()
        stack.start_nats_unless_running()
        stack.start_s3_unless_configured()
        if not await stack.start_services(stopping):
            return 0
        sys.stdout.write(ready_banner(stack.env, config))
        sys.stdout.flush()
        return await stack.watch_services(stopping)
    except Exception as error:  # noqa: BLE001 - every start-up failure ends the same way
        log.error("stack.start_failed", extra={"error": str(error)})
        sys.stderr.write(f"\ncasefile did not start: {error}\n")
        return 1
    finally:
        await stack.stop()


def ready_banner(env: Mapping[str, str], config: StackConfig) -> str:
    """What a person needs right after start: addresses, two commands to paste, the logs."""
    story_addr = env["STORY_ADDR"]
    header = f"authorization: Bearer {_gateway_token(env['AUTH_TOKENS'])}"
    method = "casefile.story.v1.StoryService/GenerateStory"
    body = '{"userId":"u1"}'
    grpcurl = f"grpcurl -plaintext -H {shlex.quote(header)} -d {shlex.quote(body)} {story_addr} {method}"
    buf_curl = (
        f"{_buf_command()} curl --protocol grpc --http2-prior-knowledge -H {shlex.quote(header)} "
        f"-d {shlex.quote(body)} http://{story_addr}/{method}"
    )
    return "\n".join([
        "",
        "casefile is running:",
        f"  story    {story_addr}",
        f"  image    {env['IMAGE_ADDR']}",
        f"  credits  {env['CREDITS_ADDR']}",
        f"  nats     {env['NATS_URL']}",
        f"  s3       {env['S3_ENDPOINT_URL']} bucket {env['S3_BUCKET']}",
        "",
        "Prometheus metrics:",
        *_metrics_lines(env),
        "",
        "Write a story (its portrait follows moments later):",
        f"  {grpcurl}",
        f"  {buf_curl}",
        "",
        f"Logs: {_shown_path(config.log_dir)}/{{credits,story,image,nats,s3}}.log",
        "Stop with Ctrl-C; stories and portraits are kept for the next run.",
        "",
    ]) + "\n"


def _gateway_token(auth_tokens: str) -> str:
    for entry in auth_tokens.split(","):
        caller, _, token = entry.strip().partition(":")
        if caller == "gateway" and token:
            return token
    return "<gateway token from AUTH_TOKENS>"


def _buf_command() -> str:
    if shutil.which("buf"):
        return "buf"
    venv_buf = find_binary("buf")
    return _shown_path(Path(venv_buf)) if venv_buf else "buf"


def _shown_path(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def main() -> int:
    # The same one-JSON-object-per-line format as the services' logs.
    configure_logging("stack")
    try:
        config = read_config(os.environ)
    except StackFailed as error:
        sys.stderr.write(f"{error}\n")
        return 2
    return asyncio.run(run(config))


if __name__ == "__main__":
    sys.exit(main())
