"""AuthInterceptor on a real grpc.aio server over loopback, with raw-bytes methods."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from shared.auth import AuthInterceptor, allow, bearer_metadata, current_caller, token_hash
from shared.config import parse_auth_tokens
from shared.grpc_server import ServiceSpec, start_grpc_server

SERVICE = "casefile.test.v1.EchoService"
TOKENS = {"tok-gateway": "gateway", "tok-image": "image", "tok-admin": "admin"}
ALLOWED = allow(
    SERVICE,
    {
        "Whoami": ["gateway", "image"],
        "Stream": ["gateway"],
        "Upload": ["gateway"],
        "SetStoryImage": ["image"],
    },
)


async def whoami(request: bytes, context) -> bytes:
    return (current_caller() or "").encode()


async def stream(request: bytes, context):
    for _ in range(3):
        yield (current_caller() or "").encode()


async def upload(request_iterator, context) -> bytes:
    return b"".join([chunk async for chunk in request_iterator])


def register(server: grpc.aio.Server) -> None:
    handlers = {
        "Whoami": grpc.unary_unary_rpc_method_handler(whoami),
        "SetStoryImage": grpc.unary_unary_rpc_method_handler(whoami),
        "NotInTable": grpc.unary_unary_rpc_method_handler(whoami),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Upload": grpc.stream_unary_rpc_method_handler(upload),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


@pytest.fixture
async def channel():
    running = await start_grpc_server(
        listen_addr="127.0.0.1:0",
        services=[ServiceSpec(name=SERVICE, register=register)],
        interceptors=[AuthInterceptor(TOKENS, ALLOWED)],
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield channel
    await running.stop(0)


def unary(channel, method):
    return channel.unary_unary(f"/{SERVICE}/{method}")


async def expect_error(call, code, message):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code
    assert caught.value.details() == message


async def test_no_token_is_unauthenticated(channel):
    await expect_error(
        unary(channel, "Whoami")(b""), grpc.StatusCode.UNAUTHENTICATED, "missing bearer token"
    )


@pytest.mark.parametrize(
    "metadata",
    [
        (("authorization", "tok-gateway"),),
        (("authorization", "Basic tok-gateway"),),
        (("authorization", "Bearer "),),
    ],
)
async def test_malformed_header_is_unauthenticated(channel, metadata):
    await expect_error(
        unary(channel, "Whoami")(b"", metadata=metadata),
        grpc.StatusCode.UNAUTHENTICATED,
        "missing bearer token",
    )


async def test_unknown_token_is_unauthenticated(channel):
    await expect_error(
        unary(channel, "Whoami")(b"", metadata=bearer_metadata("tok-nobody")),
        grpc.StatusCode.UNAUTHENTICATED,
        "unknown token",
    )


async def test_wrong_caller_is_permission_denied(channel):
    await expect_error(
        unary(channel, "SetStoryImage")(b"", metadata=bearer_metadata("tok-gateway")),
        grpc.StatusCode.PERMISSION_DENIED,
        "caller 'gateway' may not call SetStoryImage",
    )


async def test_method_absent_from_table_is_permission_denied(channel):
    await expect_error(
        unary(channel, "NotInTable")(b"", metadata=bearer_metadata("tok-admin")),
        grpc.StatusCode.PERMISSION_DENIED,
        "caller 'admin' may not call NotInTable",
    )


@pytest.mark.parametrize("path", [f"/{SERVICE}/Whoamii", f"/{SERVICE}/whoami", "/no.such.Service/X"])
async def test_a_method_the_server_lacks_is_unimplemented_for_a_known_caller(channel, path):
    call = channel.unary_unary(path)
    await expect_error(call(b"", metadata=bearer_metadata("tok-admin")), grpc.StatusCode.UNIMPLEMENTED,
                       f"no method {path} on this server")  # fmt: skip
    # Without a known token nothing is said about which methods exist.
    await expect_error(call(b""), grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")


async def test_right_caller_reaches_handler_which_sees_its_name(channel):
    reply = await unary(channel, "SetStoryImage")(b"", metadata=bearer_metadata("tok-image"))
    assert reply == b"image"
    reply = await unary(channel, "Whoami")(b"", metadata=[("authorization", "bearer tok-gateway")])
    assert reply == b"gateway"


async def test_server_streaming_is_guarded_and_served(channel):
    method = channel.unary_stream(f"/{SERVICE}/Stream")
    replies = [r async for r in method(b"", metadata=bearer_metadata("tok-gateway"))]
    assert replies == [b"gateway"] * 3
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        [r async for r in method(b"", metadata=bearer_metadata("tok-image"))]
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        [r async for r in method(b"")]
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_client_streaming_is_guarded_and_served(channel):
    method = channel.stream_unary(f"/{SERVICE}/Upload")
    assert await method(iter([b"a", b"b"]), metadata=bearer_metadata("tok-gateway")) == b"ab"
    await expect_error(
        method(iter([b"a"]), metadata=bearer_metadata("tok-image")),
        grpc.StatusCode.PERMISSION_DENIED,
        "caller 'image' may not call Upload",
    )


async def test_health_needs_no_token(channel):
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_needs_no_token(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    replies = [r async for r in stub.ServerReflectionInfo(iter([request]))]
    names = {s.name for s in replies[0].list_services_response.service}
    assert SERVICE in names


async def test_refusal_log_never_contains_the_token(channel, caplog):
    caplog.set_level("WARNING", logger="shared.auth")
    with pytest.raises(grpc.aio.AioRpcError):
        await unary(channel, "SetStoryImage")(b"", metadata=bearer_metadata("tok-gateway"))
    with pytest.raises(grpc.aio.AioRpcError):
        await unary(channel, "Whoami")(b"", metadata=bearer_metadata("tok-nobody"))
    records = [r for r in caplog.records if r.getMessage() == "auth.refused"]
    assert len(records) == 2
    for record in records:
        assert "tok-" not in repr(record.__dict__)


async def test_a_caller_listed_by_the_hash_of_its_token_is_admitted():
    tokens = parse_auth_tokens(f"gateway:{token_hash('tok-hashed')},image:tok-image")
    assert "tok-hashed" not in dict(tokens)  # the table never held the token itself
    running = await start_grpc_server(
        listen_addr="127.0.0.1:0",
        services=[ServiceSpec(name=SERVICE, register=register)],
        interceptors=[AuthInterceptor(tokens, ALLOWED)],
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as hashed_channel:
            call = unary(hashed_channel, "Whoami")
            assert await call(b"", metadata=bearer_metadata("tok-hashed")) == b"gateway"
            assert await call(b"", metadata=bearer_metadata("tok-image")) == b"image"
            # Presenting the hash itself is not presenting the token.
            await expect_error(
                call(b"", metadata=bearer_metadata(token_hash("tok-hashed"))),
                grpc.StatusCode.UNAUTHENTICATED,
                "unknown token",
            )
    finally:
        await running.stop(0)


async def test_a_token_admitted_before_still_answers_for_its_caller_only(channel):
    call = unary(channel, "Whoami")
    for _ in range(2):  # the second time from the interceptor's verified tokens
        assert await call(b"", metadata=bearer_metadata("tok-gateway")) == b"gateway"
        assert await call(b"", metadata=bearer_metadata("tok-image")) == b"image"
    # A verified token is still checked against the method, and its neighbours still fail.
    await expect_error(
        unary(channel, "SetStoryImage")(b"", metadata=bearer_metadata("tok-gateway")),
        grpc.StatusCode.PERMISSION_DENIED,
        "caller 'gateway' may not call SetStoryImage",
    )
    for near in ("tok-gateway2", "tok-gatewa", "TOK-GATEWAY"):
        await expect_error(call(b"", metadata=bearer_metadata(near)), grpc.StatusCode.UNAUTHENTICATED, "unknown token")


def test_only_admitted_tokens_are_remembered():
    interceptor = AuthInterceptor(TOKENS, ALLOWED)
    for n in range(100):
        assert interceptor._caller_for(f"guess-{n}") is None
    assert interceptor._caller_for("tok-admin") == "admin"
    assert interceptor._verified == {"tok-admin": "admin"}
