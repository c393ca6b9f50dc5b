"""start_grpc_server and run_service against real servers and a real child process."""

import asyncio
import json
import os
import pathlib
import signal
import sys
import textwrap

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from shared.grpc_errors import details_of
from shared.config import ConfigError
from shared.grpc_server import ServiceSpec, add_strictly_decoded, start_grpc_server

SERVICE = "casefile.test.v1.PingService"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def register_ping(server: grpc.aio.Server) -> None:
    async def ping(request: bytes, context) -> bytes:
        return b"pong:" + request

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Ping": grpc.unary_unary_rpc_method_handler(ping)}
    )
    server.add_generic_rpc_handlers((handler,))


@pytest.fixture
async def running():
    running = await start_grpc_server(
        listen_addr="127.0.0.1:0", services=[ServiceSpec(name=SERVICE, register=register_ping)]
    )
    yield running
    await running.stop(0)


async def check(channel, service: str = "") -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    return reply.status


async def test_serves_on_a_free_port_with_health_serving(running):
    assert running.port > 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        assert await channel.unary_unary(f"/{SERVICE}/Ping")(b"x") == b"pong:x"
        assert await check(channel) == health_pb2.HealthCheckResponse.SERVING
        assert await check(channel, SERVICE) == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_services(running):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        [reply] = [r async for r in stub.ServerReflectionInfo(iter([request]))]
    names = {s.name for s in reply.list_services_response.service}
    assert names == {
        SERVICE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }


async def test_stop_reports_not_serving_then_refuses_calls(running):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE)
        )
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.create_task(running.stop(grace=2))
        assert (await asyncio.wait_for(watch.read(), 5)).status == (
            health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await stopping
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await check(channel)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_taken_port_fails_loudly(running):
    with pytest.raises(OSError, match="cannot listen on"):
        await start_grpc_server(listen_addr=f"127.0.0.1:{running.port}", services=[])


async def test_a_taken_port_names_the_variable_it_came_from(running):
    with pytest.raises(ConfigError) as caught:
        await start_grpc_server(listen_addr=f"127.0.0.1:{running.port}", services=[], listen_addr_name="STORY_ADDR")

    assert caught.value.name == "STORY_ADDR" and f"cannot listen on 127.0.0.1:{running.port}" in str(caught.value)


CHILD = """
import asyncio, sys
import grpc
from shared.grpc_server import run_service, start_grpc_server
from shared.logs import configure_logging

async def build(stack):
    async def on_close():
        print("exit-stack-closed", flush=True)
        if sys.argv[1] == "hang":
            await asyncio.sleep(3600)
    stack.push_async_callback(on_close)
    return await start_grpc_server(listen_addr="127.0.0.1:0", services=[])

configure_logging("child")
asyncio.run(run_service("child", build, grace=0.5))
"""


async def spawn(tmp_path: pathlib.Path, source: str, *args: str) -> asyncio.subprocess.Process:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(source))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "gen")])}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )


async def start_child(tmp_path: pathlib.Path, mode: str) -> tuple[asyncio.subprocess.Process, int]:
    child = await spawn(tmp_path, CHILD, mode)
    started = await asyncio.wait_for(read_event(child.stderr, "service.started"), 20)
    return child, started["port"]


async def read_event(stream: asyncio.StreamReader, event: str) -> dict:
    while line := await stream.readline():
        # gRPC's C core or a traceback may also write to stderr; only JSON lines are events.
        record = json.loads(line) if line.startswith(b"{") else {}
        if record.get("event") == event:
            return record
    raise AssertionError(f"stream ended before {event}")


async def test_run_service_stops_gracefully_on_sigterm(tmp_path):
    child, port = await start_child(tmp_path, "normal")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await check(channel) == health_pb2.HealthCheckResponse.SERVING
        child.send_signal(signal.SIGTERM)
        stopped = await asyncio.wait_for(read_event(child.stderr, "service.stopped"), 20)
        assert stopped["service"] == "child"
        assert await asyncio.wait_for(child.wait(), 20) == 0
        assert b"exit-stack-closed" in await child.stdout.read()
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()


async def test_second_signal_exits_at_once(tmp_path):
    child, _ = await start_child(tmp_path, "hang")
    try:
        child.send_signal(signal.SIGINT)
        # The exit stack now hangs; only a second signal can end the process.
        assert await asyncio.wait_for(child.stdout.readline(), 20) == b"exit-stack-closed\n"
        child.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(child.wait(), 20) == 130
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()



FAILING_CHILD = """
import asyncio
from shared.grpc_server import run_service
from shared.logs import configure_logging

async def build(stack):
    raise OSError("port already in use")

configure_logging("child")
asyncio.run(run_service("child", build))
"""


async def test_run_service_logs_a_failed_build(tmp_path):
    child = await spawn(tmp_path, FAILING_CHILD)
    failed = await asyncio.wait_for(read_event(child.stderr, "service.failed"), 20)
    assert "OSError: port already in use" in failed["error"]
    assert await asyncio.wait_for(child.wait(), 20) == 1


class _Health(health_pb2_grpc.HealthServicer):
    async def Check(self, request, context):
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Watch(self, request, context):
        for _ in range(2):
            yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@pytest.mark.parametrize("method", ["Check", "Watch"])
async def test_undecodable_request_bytes_are_invalid_argument_not_unknown(method):
    server = grpc.aio.server()
    add_strictly_decoded(server, health_pb2.DESCRIPTOR.services_by_name["Health"], _Health())
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            path = f"/grpc.health.v1.Health/{method}"
            call = channel.unary_stream(path) if method == "Watch" else channel.unary_unary(path)
            valid = health_pb2.HealthCheckRequest(service="x").SerializeToString()
            answered = [r async for r in call(valid, timeout=5)] if method == "Watch" else [await call(valid, timeout=5)]
            with pytest.raises(grpc.aio.AioRpcError) as bad_utf8:
                await _drain(call(b"\x0a\x02\xff\xfe", timeout=5))
            with pytest.raises(grpc.aio.AioRpcError) as corrupt:
                await _drain(call(b"\xff\xff\xff", timeout=5))
    finally:
        await server.stop(0)

    assert len(answered) == (2 if method == "Watch" else 1)
    for raised in (bad_utf8, corrupt):
        details = details_of(raised.value)
        assert (details.code, details.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ("request",))
        assert "grpc.health.v1.HealthCheckRequest" in details.message


async def _drain(call):
    if hasattr(call, "__aiter__"):
        return [r async for r in call]
    return await call
