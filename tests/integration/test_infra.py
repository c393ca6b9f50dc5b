"""The test infrastructure and the launcher's helpers, on real servers over loopback."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import nats
import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from tests.fakes.s3_requests import requests_to
from tests.fakes.tcp_proxy import TcpProxy
from tools.infra import (
    REPO_ROOT,
    NatsServer,
    PostgresUnavailable,
    ProcessExited,
    RcloneS3Server,
    ServiceProcess,
    create_database,
    database_name,
    drop_database,
    dsn_with_database,
    ensure_postgres_running,
    free_port,
    tcp_answers,
    wait_for_tcp,
)

pytestmark = pytest.mark.timeout(60)


def processes_under(directory: Path) -> list[str]:
    """Live processes whose command line or working directory lies in `directory`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or not pid_alive(int(proc.name)):
            continue
        try:
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if str(directory) in command or cwd.startswith(str(directory)):
            found.append(f"{proc.name}: {command}")
    return found


@pytest.fixture(autouse=True)
async def no_leftover_processes(tmp_path):
    """Everything a test here starts lives in its tmp_path; none of it may outlive the test."""
    yield
    deadline = time.monotonic() + 3
    while (leftovers := processes_under(tmp_path)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not leftovers, "processes outlived the test:\n" + "\n".join(leftovers)


def s3_client(endpoint_url: str, access_key: str = "test", secret_key: str = "test"):
    return get_session().create_client(
        "s3",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        # s3v4: rclone only accepts v4 signatures; no retries: a fault must show at once.
        config=AioConfig(signature_version="s3v4", retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5),
    )


async def put_and_read(endpoint_url: str, bucket: str, key: str, body: bytes, **keys: str) -> bytes:
    async with s3_client(endpoint_url, **keys) as s3:
        await s3.create_bucket(Bucket=bucket)
        await s3.put_object(Bucket=bucket, Key=key, Body=body)
        return await read_object(s3, bucket, key)


async def read_object(s3, bucket: str, key: str) -> bytes:
    reply = await s3.get_object(Bucket=bucket, Key=key)
    async with reply["Body"] as stream:
        return await stream.read()


# ---------------------------------------------------------------------------- NATS


async def publish_to_new_stream(url: str, count: int) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="INFRA", subjects=["infra.>"])
        for number in range(count):
            await js.publish("infra.test", f"message {number}".encode())
    finally:
        await nc.close()


async def stored_messages(url: str) -> list[bytes]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info("INFRA")
        return [(await js.get_msg("INFRA", seq)).data for seq in range(1, info.state.messages + 1)]
    finally:
        await nc.close()


async def test_nats_stop_and_start_keeps_port_and_jetstream_messages(nats_server):
    url = nats_server.url
    await publish_to_new_stream(url, 3)

    nats_server.stop()
    assert not tcp_answers(nats_server.host, nats_server.port)
    nats_server.start()

    assert nats_server.url == url
    assert await stored_messages(url) == [b"message 0", b"message 1", b"message 2"]


async def test_nats_killed_comes_back_on_the_same_port_with_its_stream(nats_server):
    await publish_to_new_stream(nats_server.url, 1)

    nats_server.kill()
    assert not nats_server.is_running()
    nats_server.start()

    assert await stored_messages(nats_server.url) == [b"message 0"]


def test_nats_refuses_to_start_on_a_busy_port(nats_server, tmp_path):
    second = NatsServer(tmp_path / "other", port=nats_server.port)
    with pytest.raises(RuntimeError, match="already listens"):
        second.start()


# ---------------------------------------------------------------------------- S3


async def test_moto_server_stores_and_returns_an_object(s3_endpoint_url, s3_bucket):
    assert os.environ["AWS_ACCESS_KEY_ID"] == "test"  # set by the fixture, for code under test
    assert await put_and_read(s3_endpoint_url, s3_bucket, "a/b.png", b"\x89PNG data") == b"\x89PNG data"


def test_moto_server_keeps_the_connection_alive_and_logs_each_request(s3_server, s3_bucket):
    # S3 keeps connections alive; werkzeug's server closed each one, which every upload paid.
    connection = http.client.HTTPConnection(s3_server.host, s3_server.port, timeout=5)
    try:
        statuses, sockets = [], []
        for _ in range(2):
            connection.request("HEAD", f"/{s3_bucket}/alive.txt")
            answer = connection.getresponse()
            answer.read()
            statuses.append((answer.status, answer.will_close))
            sockets.append(connection.sock)
        # Unsigned and for a bucket nobody made: moto refuses it, and keeps the connection.
        assert statuses == [(404, False), (404, False)]
        assert sockets[0] is sockets[1] is not None
    finally:
        connection.close()
    assert requests_to(s3_server.log_path, s3_bucket, "alive.txt", method="HEAD") == [
        (f"/{s3_bucket}/alive.txt", 404)
    ] * 2


async def test_each_test_gets_a_bucket_of_its_own(s3_endpoint_url, s3_bucket):
    async with s3_client(s3_endpoint_url) as s3:
        existing = {bucket["Name"] for bucket in (await s3.list_buckets())["Buckets"]}
    assert s3_bucket not in existing


async def test_rclone_keeps_objects_across_restart_and_serves_presigned_urls(tmp_path):
    keys = {"access_key": "dev-key", "secret_key": "dev-secret"}
    data_dir = tmp_path / "s3"
    first = RcloneS3Server(data_dir, **keys).start()
    try:
        assert await put_and_read(first.endpoint_url, "casefile", "portraits/s1.png", b"portrait", **keys) == b"portrait"
    finally:
        first.stop()
    assert (data_dir / "casefile" / "portraits" / "s1.png").read_bytes() == b"portrait"

    second = RcloneS3Server(data_dir, **keys).start()
    try:
        async with s3_client(second.endpoint_url, keys["access_key"], keys["secret_key"]) as s3:
            assert await read_object(s3, "casefile", "portraits/s1.png") == b"portrait"
            url = await s3.generate_presigned_url(
                "get_object", Params={"Bucket": "casefile", "Key": "portraits/s1.png"}, ExpiresIn=60
            )
        async with httpx.AsyncClient() as http:
            signed = await http.get(url)
            unsigned = await http.get(url.split("?")[0])
    finally:
        second.stop()
    assert "X-Amz-Signature=" in url
    assert (signed.status_code, signed.content) == (200, b"portrait")
    assert unsigned.status_code in (400, 403)  # rclone answers 400 to an unsigned request


async def test_rclone_refuses_a_wrong_secret(tmp_path):
    server = RcloneS3Server(tmp_path / "s3", access_key="dev-key", secret_key="dev-secret").start()
    try:
        with pytest.raises(Exception, match="SignatureDoesNotMatch|InvalidAccessKeyId|AccessDenied|403"):
            await put_and_read(server.endpoint_url, "casefile", "k", b"x", access_key="dev-key", secret_key="wrong")
    finally:
        server.stop()


# ---------------------------------------------------------------------------- TcpProxy


async def test_cut_proxy_refuses_connections_and_restore_brings_back_the_same_objects(s3_endpoint_url, s3_bucket):
    moto_port = int(s3_endpoint_url.rsplit(":", 1)[1])
    async with TcpProxy("127.0.0.1", moto_port) as proxy:
        assert await put_and_read(proxy.url, s3_bucket, "k", b"kept") == b"kept"

        await proxy.cut()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(proxy.host, proxy.port)
        async with s3_client(proxy.url) as s3:
            with pytest.raises(Exception, match="Could not connect"):
                await s3.get_object(Bucket=s3_bucket, Key="k")

        await proxy.restore()
        async with s3_client(proxy.url) as s3:
            assert await read_object(s3, s3_bucket, "k") == b"kept"


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1024):
        writer.write(data)
        await writer.drain()
    writer.close()


async def test_cut_resets_connections_that_were_open():
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    echo_port = server.sockets[0].getsockname()[1]
    try:
        async with TcpProxy("127.0.0.1", echo_port) as proxy:
            reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.read(4), 2) == b"ping"

            await proxy.cut()
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(4), 2)
            writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_proxy_to_a_dead_target_drops_the_client():
    async with TcpProxy("127.0.0.1", free_port()) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), 2)
        writer.close()


# ---------------------------------------------------------------------------- PostgreSQL


@pytest.mark.parametrize("run", [1, 2])
async def test_each_test_gets_a_database_of_its_own(database_url, database_template, run):
    conn = await asyncpg.connect(database_url)
    try:
        # The other run of this test created the table too: it must not be visible here.
        assert await conn.fetchval("SELECT to_regclass('public.isolation_marker')") is None
        await conn.execute("CREATE TABLE isolation_marker (run int)")
        assert await conn.fetchval("SELECT current_database()") == database_name(database_url)
    finally:
        await conn.close()
    assert database_name(database_url) != database_template


async def test_test_databases_hold_every_services_migrations(database_url):
    directories = {path.parent.name: path for path in (REPO_ROOT / "services").glob("*/migrations")}
    if not directories:
        pytest.skip("no service has migrations yet")
    conn = await asyncpg.connect(database_url)
    try:
        for schema, directory in directories.items():
            applied = await conn.fetch(f"SELECT version FROM {schema}.schema_migrations ORDER BY version")
            expected = sorted(path.name[:4] for path in directory.glob("*.sql"))
            assert [row["version"] for row in applied] == expected, schema
    finally:
        await conn.close()


async def test_drop_database_disconnects_sessions_and_removes_it(postgres_admin_dsn):
    name = f"casefile_droptest_{uuid.uuid4().hex[:12]}"
    assert await create_database(postgres_admin_dsn, name) is True
    assert await create_database(postgres_admin_dsn, name) is False
    lingering = await asyncpg.connect(dsn_with_database(postgres_admin_dsn, name))

    await drop_database(postgres_admin_dsn, name)

    admin = await asyncpg.connect(postgres_admin_dsn)
    try:
        assert await admin.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name) == 0
    finally:
        await admin.close()
    with pytest.raises((asyncpg.AdminShutdownError, asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError)):
        await lingering.fetchval("SELECT 1")
    lingering.terminate()


def test_ensure_postgres_running_accepts_a_running_server(postgres_admin_dsn):
    ensure_postgres_running(postgres_admin_dsn)


def test_ensure_postgres_running_explains_what_to_set_when_nothing_answers():
    started = time.monotonic()
    with pytest.raises(PostgresUnavailable, match="DATABASE_URL="):
        ensure_postgres_running(f"postgresql://postgres@127.0.0.1:{free_port()}/casefile")
    assert time.monotonic() - started < 5


async def test_wait_for_tcp_times_out_with_the_address():
    port = free_port()
    with pytest.raises(TimeoutError, match=f"127.0.0.1:{port}"):
        await wait_for_tcp("127.0.0.1", port, timeout=0.3)


# ---------------------------------------------------------------------------- processes

# A stand-in service: health SERVING on <NAME>_ADDR, SIGTERM stops it; it prints its
# environment and can spawn a grandchild, ignore SIGTERM or crash, as FAKE_MODE says.
FAKE_SERVICE = textwrap.dedent(
    """
    import asyncio, json, os, signal, subprocess, sys
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    NAME = {name!r}
    GRANDCHILD = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"

    async def serve():
        mode = os.environ.get("FAKE_MODE", "")
        print(json.dumps({{"service": NAME, "pid": os.getpid(), "env": dict(os.environ)}}), flush=True)
        if mode == "crash":
            sys.exit("fake " + NAME + ": refusing to start")
        if mode == "grandchild":
            # It ignores SIGTERM: only the group's final SIGKILL can take it down.
            child = subprocess.Popen([sys.executable, "-c", GRANDCHILD])
            print(json.dumps({{"grandchild": child.pid}}), flush=True)
        server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        server.add_insecure_port(os.environ[NAME.upper() + "_ADDR"])
        await server.start()
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        stop = asyncio.Event()
        if mode == "stubborn":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        else:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(1)

    asyncio.run(serve())
    """
)


def write_fake_service(directory: Path, name: str) -> Path:
    path = directory / "services" / name / "main.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    for package in (directory / "services", path.parent):
        (package / "__init__.py").touch()
    path.write_text(FAKE_SERVICE.format(name=name))
    return path


def fake_env(**extra: str) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "CREDITS_ADDR": f"127.0.0.1:{free_port()}", **extra}


def pid_alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie (dead, just not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(") ", 1)[-1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        # ProcessLookupError: the process exited while its stat file was being read.
        return False


async def dies_soon(pid: int, timeout: float = 3.0) -> bool:
    """SIGKILL is delivered asynchronously: give the kernel a moment."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def test_service_process_becomes_healthy_and_terminate_takes_its_children_down(tmp_path):
    script = write_fake_service(tmp_path, "credits")
    env = fake_env(FAKE_MODE="grandchild")
    process = ServiceProcess("credits", env, tmp_path / "credits.log", argv=[sys.executable, str(script)]).start()
    try:
        await process.wait_healthy(env["CREDITS_ADDR"], timeout=20)
        grandchild = int(process.log_tail().split('"grandchild": ')[1].split("}")[0])
        assert pid_alive(grandchild)
    finally:
        exit_code = process.terminate(grace=5)
    assert exit_code == 0
    assert await dies_soon(grandchild)
    assert f'"PYTHONPATH": "{REPO_ROOT}{os.pathsep}{REPO_ROOT / "gen"}"' in process.log_tail()


async def test_service_that_dies_at_start_reports_its_log_tail(tmp_path):
    script = write_fake_service(tmp_path, "credits")
    env = fake_env(FAKE_MODE="crash")
    process = ServiceProcess("credits", env, tmp_path / "credits.log", argv=[sys.executable, str(script)]).start()
    with pytest.raises(ProcessExited, match="refusing to start") as raised:
        await process.wait_healthy(env["CREDITS_ADDR"], timeout=20)
    assert raised.value.returncode == 1


async def test_service_ignoring_sigterm_is_killed_after_the_grace(tmp_path):
    script = write_fake_service(tmp_path, "credits")
    env = fake_env(FAKE_MODE="stubborn")
    process = ServiceProcess("credits", env, tmp_path / "credits.log", argv=[sys.executable, str(script)]).start()
    await process.wait_healthy(env["CREDITS_ADDR"], timeout=20)
    started = time.monotonic()
    assert await process.terminate_async(grace=0.5) == -signal.SIGKILL
    assert time.monotonic() - started < 5


async def test_wait_healthy_times_out_when_nobody_serves(tmp_path):
    process = ServiceProcess("idle", {}, tmp_path / "idle.log", argv=[sys.executable, "-c", "import time; time.sleep(30)"])
    process.start()
    try:
        with pytest.raises(TimeoutError, match="not healthy"):
            await process.wait_healthy(f"127.0.0.1:{free_port()}", timeout=0.5)
    finally:
        process.kill()


# ---------------------------------------------------------------------------- make run


class StackUnderTest:
    """`python -m tools.stack` in a copy of the repo whose services are fakes."""

    def __init__(self, tmp_path: Path, database_url: str):
        self.root = tmp_path / "repo"
        for package in ("tools", "shared"):  # the launcher logs through shared.logs
            shutil.copytree(REPO_ROOT / package, self.root / package, ignore=shutil.ignore_patterns("__pycache__"))
        for name in ("credits", "story", "image"):
            write_fake_service(self.root, name)
        self.run_dir = tmp_path / "run"
        self.nats_port, self.s3_port = free_port(), free_port()
        self.env = {
            "PATH": os.environ["PATH"],
            "PYTHONPATH": str(self.root),
            "CASEFILE_RUN_DIR": str(self.run_dir),
            "DATABASE_URL": database_url,
            "NATS_URL": f"nats://127.0.0.1:{self.nats_port}",
            "STACK_S3_PORT": str(self.s3_port),
            **{f"{name}_ADDR": f"127.0.0.1:{free_port()}" for name in ("STORY", "IMAGE", "CREDITS")},
        }
        self.process: subprocess.Popen[str] | None = None

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self, **extra_env: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tools.stack"], cwd=self.root, env={**self.env, **extra_env},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )

    def wait_ready(self, timeout: float = 30) -> str:
        """The banner, once the stack has printed all of it."""
        deadline = time.monotonic() + timeout
        lines: list[str] = []
        while not lines or not lines[-1].startswith("Stop with Ctrl-C"):
            line = self.process.stdout.readline()
            assert line and time.monotonic() < deadline, f"no banner; stderr:\n{self.process.stderr.read()}"
            lines.append(line)
        return "".join(lines)

    def wait_exit(self, timeout: float = 30) -> tuple[int, str]:
        _, err = self.process.communicate(timeout=timeout)
        return self.process.returncode, err

    def stop(self, sig: signal.Signals) -> tuple[int, str]:
        self.process.send_signal(sig)
        return self.wait_exit()

    def service_pid(self, name: str) -> int:
        return json.loads((self.run_dir / "logs" / f"{name}.log").read_text().splitlines()[-1])["pid"]

    def infrastructure_answers(self) -> dict[str, bool]:
        return {"nats": tcp_answers("127.0.0.1", self.nats_port), "s3": tcp_answers("127.0.0.1", self.s3_port)}

    def cleanup(self) -> None:
        """Stop a launcher a failed test left running: SIGTERM, so it stops its children too."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()  # its children live in their own groups: they may be left over
            self.process.communicate()


@pytest.fixture
async def stack(tmp_path, postgres_admin_dsn):
    database = f"casefile_stack_{uuid.uuid4().hex[:12]}"  # the stack must create it
    under_test = StackUnderTest(tmp_path, dsn_with_database(postgres_admin_dsn, database))
    try:
        yield under_test
    finally:
        under_test.cleanup()
        await drop_database(postgres_admin_dsn, database)


async def database_exists(admin_dsn: str, name: str) -> bool:
    conn = await asyncpg.connect(admin_dsn)
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    finally:
        await conn.close()


DEV_S3_KEYS = {"access_key": "casefile-dev", "secret_key": "casefile-dev-secret"}


async def test_stack_starts_everything_and_prints_commands_to_paste(stack, postgres_admin_dsn):
    stack.start()
    banner = await asyncio.to_thread(stack.wait_ready)

    assert stack.infrastructure_answers() == {"nats": True, "s3": True}
    assert await database_exists(postgres_admin_dsn, database_name(stack.env["DATABASE_URL"]))
    story_addr = stack.env["STORY_ADDR"]
    assert (
        f"grpcurl -plaintext -H 'authorization: Bearer dev-gateway' -d '{{\"userId\":\"u1\"}}' "
        f"{story_addr} casefile.story.v1.StoryService/GenerateStory"
    ) in banner
    assert "curl --protocol grpc --http2-prior-knowledge -H 'authorization: Bearer dev-gateway'" in banner
    assert f"http://{story_addr}/casefile.story.v1.StoryService/GenerateStory" in banner
    credits_env = json.loads((stack.run_dir / "logs" / "credits.log").read_text().splitlines()[-1])["env"]
    assert credits_env["S3_ENDPOINT_URL"] == stack.s3_url
    assert credits_env["AWS_ACCESS_KEY_ID"] == DEV_S3_KEYS["access_key"]
    assert credits_env["AUTH_TOKENS"] == "admin:dev-admin,gateway:dev-gateway,story:dev-story,image:dev-image"
    assert credits_env["PYTHONPATH"].split(os.pathsep) == [str(stack.root), str(stack.root / "gen")]
    exit_code, err = await asyncio.to_thread(stack.stop, signal.SIGTERM)
    assert exit_code == 0, err
    assert not any(pid_alive(stack.service_pid(name)) for name in ("credits", "story", "image"))
    assert stack.infrastructure_answers() == {"nats": False, "s3": False}


async def test_stack_stops_on_sigint_and_the_next_run_keeps_portraits_and_events(stack):
    stack.start()
    await asyncio.to_thread(stack.wait_ready)
    await put_and_read(stack.s3_url, "casefile", "portraits/p.png", b"png", **DEV_S3_KEYS)
    await publish_to_new_stream(stack.env["NATS_URL"], 2)
    pids = [stack.service_pid(name) for name in ("credits", "story", "image")]

    exit_code, err = await asyncio.to_thread(stack.stop, signal.SIGINT)
    assert exit_code == 0, err
    assert stack.infrastructure_answers() == {"nats": False, "s3": False}
    assert not any(pid_alive(pid) for pid in pids)

    started = time.monotonic()
    stack.start()
    await asyncio.to_thread(stack.wait_ready)
    assert time.monotonic() - started < 15
    async with s3_client(stack.s3_url, DEV_S3_KEYS["access_key"], DEV_S3_KEYS["secret_key"]) as s3:
        assert await read_object(s3, "casefile", "portraits/p.png") == b"png"
    assert await stored_messages(stack.env["NATS_URL"]) == [b"message 0", b"message 1"]
    exit_code, err = await asyncio.to_thread(stack.stop, signal.SIGTERM)
    assert exit_code == 0, err


async def test_stack_reuses_a_running_nats_and_leaves_it_running(stack, nats_server):
    stack.env["NATS_URL"] = nats_server.url
    stack.start()
    await asyncio.to_thread(stack.wait_ready)
    exit_code, err = await asyncio.to_thread(stack.stop, signal.SIGINT)
    assert exit_code == 0, err
    assert tcp_answers(nats_server.host, nats_server.port)
    assert not (stack.run_dir / "nats").exists()


async def test_stack_stops_everything_when_a_service_dies_at_start(stack):
    stack.start(FAKE_MODE="crash")
    exit_code, err = await asyncio.to_thread(stack.wait_exit)
    assert exit_code == 1
    assert "service credits exited with code 1" in err
    assert "fake credits: refusing to start" in err  # the log tail
    assert stack.infrastructure_answers() == {"nats": False, "s3": False}
    assert not (stack.run_dir / "logs" / "story.log").exists()


async def test_stack_stops_everything_when_a_service_dies_later(stack):
    stack.start()
    await asyncio.to_thread(stack.wait_ready)
    others = [stack.service_pid(name) for name in ("credits", "image")]
    os.kill(stack.service_pid("story"), signal.SIGKILL)

    exit_code, err = await asyncio.to_thread(stack.wait_exit)
    assert exit_code == 1
    assert "service story died" in err
    assert stack.infrastructure_answers() == {"nats": False, "s3": False}
    assert not any(pid_alive(pid) for pid in others)


async def test_stack_refuses_a_busy_s3_port_with_advice(stack):
    busy = await asyncio.start_server(lambda reader, writer: writer.close(), "127.0.0.1", stack.s3_port)
    try:
        stack.start()
        exit_code, err = await asyncio.to_thread(stack.wait_exit)
    finally:
        busy.close()
        await busy.wait_closed()
    assert exit_code == 1
    assert "STACK_S3_PORT" in err
    assert stack.infrastructure_answers()["nats"] is False
