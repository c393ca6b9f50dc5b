"""ImageService.GetImageUrl (and the methods not built yet) through the real gRPC server.

The image service runs from build() on this test's database, nats-server and moto bucket;
objects are written straight into the bucket, and the URLs are fetched with httpx.
"""

from __future__ import annotations

import contextlib
import uuid
from datetime import UTC, datetime, timedelta

import aiobotocore.session
import grpc
import httpx
import pytest

from casefile.image.v1 import image_service_pb2, image_service_pb2_grpc
from services.image.config import Config
from services.image.main import build
from shared.auth import bearer_metadata
from shared.grpc_errors import details_of
from tests.fakes.recraft import make_png
from tests.fakes.tcp_proxy import TcpProxy
from tools.infra import free_port

TOKENS = "admin:t-admin,gateway:t-gateway,story:t-story,image:t-image"
GATEWAY = bearer_metadata("t-gateway")


@pytest.fixture
def image_env(database_url, nats_server, s3_endpoint_url, s3_bucket):
    def make(**overrides: str) -> dict[str, str]:
        return {
            "IMAGE_ADDR": "127.0.0.1:0",
            "DATABASE_URL": database_url,
            "NATS_URL": nats_server.url,
            "S3_ENDPOINT_URL": s3_endpoint_url,
            "S3_BUCKET": s3_bucket,
            # Nothing is published in these tests, so story is never called.
            "STORY_ADDR": f"127.0.0.1:{free_port()}",
            "AUTH_TOKENS": TOKENS,
            **overrides,
        }

    return make


@pytest.fixture
async def start_image(image_env):
    """start_image(env) -> an ImageService stub on a freshly built service."""
    # Depending on image_env makes the service stop before its database, NATS and S3 go.
    async with contextlib.AsyncExitStack() as stack:

        async def start(env: dict[str, str]) -> image_service_pb2_grpc.ImageServiceStub:
            server = await build(Config.from_env(env), stack)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
            stack.push_async_callback(channel.close)
            return image_service_pb2_grpc.ImageServiceStub(channel)

        yield start


@pytest.fixture
async def image(start_image, image_env):
    return await start_image(image_env())


@pytest.fixture
async def s3(s3_endpoint_url):
    session = aiobotocore.session.get_session()
    async with session.create_client("s3", endpoint_url=s3_endpoint_url, region_name="us-east-1") as client:
        yield client


async def put_portrait(s3, bucket: str, key: str | None = None) -> tuple[str, bytes]:
    key = key or f"portraits/{uuid.uuid4()}.png"
    data = make_png(32, 32)
    await s3.put_object(Bucket=bucket, Key=key, Body=data, ContentType="image/png")
    return key, data


async def get_url(stub, metadata=GATEWAY, **fields) -> image_service_pb2.GetImageUrlResponse:
    return await stub.GetImageUrl(image_service_pb2.GetImageUrlRequest(**fields), metadata=metadata)


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_presigned_url_serves_the_portrait(image, s3, s3_bucket):
    key, data = await put_portrait(s3, s3_bucket)

    before = datetime.now(UTC)
    answer = await get_url(image, storage_id=key)

    async with httpx.AsyncClient() as http:
        response = await http.get(answer.url)
    assert response.status_code == 200 and response.content == data
    expire_time = answer.expire_time.ToDatetime(tzinfo=UTC)
    assert before + timedelta(seconds=3590) <= expire_time <= before + timedelta(seconds=3610)
    assert "X-Amz-Expires=3600" in answer.url


async def test_expires_in_seconds_sets_the_lifetime(image, s3, s3_bucket):
    key, _ = await put_portrait(s3, s3_bucket)

    before = datetime.now(UTC)
    answer = await get_url(image, storage_id=key, expires_in_seconds=60)

    assert "X-Amz-Expires=60&" in answer.url or answer.url.endswith("X-Amz-Expires=60")
    expire_time = answer.expire_time.ToDatetime(tzinfo=UTC)
    assert before + timedelta(seconds=55) <= expire_time <= before + timedelta(seconds=65)


async def test_story_may_ask_for_a_portrait_url(image, s3, s3_bucket):
    key, _ = await put_portrait(s3, s3_bucket)

    answer = await get_url(image, metadata=bearer_metadata("t-story"), storage_id=key)

    assert answer.url


async def test_missing_portrait_is_not_found(image):
    error = await refused(get_url(image, storage_id=f"portraits/{uuid.uuid4()}.png"))

    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "storage_id: no such portrait"
    details = details_of(error)
    assert (details.reason, details.domain) == ("IMAGE_NOT_FOUND", "image.casefile")


async def test_object_outside_portraits_is_not_found(image, s3, s3_bucket):
    key, _ = await put_portrait(s3, s3_bucket, key="private/someone-else.png")

    error = await refused(get_url(image, storage_id=key))

    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_portrait_asked_for_with_a_user_id_is_not_found(image, s3, s3_bucket):
    key, _ = await put_portrait(s3, s3_bucket)

    error = await refused(get_url(image, storage_id=key, user_id="u1"))

    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_empty_storage_id_is_invalid(image):
    error = await refused(get_url(image, storage_id=""))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "storage_id: must not be empty"
    assert details_of(error).violations == (("storage_id", "must not be empty"),)


@pytest.mark.parametrize("storage_id", ["portraits/../x", "portraits/./a.png", "portraits//a.png", "/portraits/a.png", "portraits/"])
@pytest.mark.parametrize("user_id", ["", "u1"])
async def test_a_storage_id_no_key_can_have_is_invalid_not_an_outage(image, storage_id, user_id):
    error = await refused(get_url(image, storage_id=storage_id, user_id=user_id))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details_of(error).fields == ("storage_id",)


@pytest.mark.parametrize("expires_in_seconds", [-1, 604_801])
async def test_expiry_out_of_range_is_invalid(image, s3, s3_bucket, expires_in_seconds):
    key, _ = await put_portrait(s3, s3_bucket)

    error = await refused(get_url(image, storage_id=key, expires_in_seconds=expires_in_seconds))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("expires_in_seconds:")
    assert details_of(error).fields == ("expires_in_seconds",)


async def test_callers_outside_the_table_are_refused(image, s3, s3_bucket):
    key, _ = await put_portrait(s3, s3_bucket)

    wrong_caller = await refused(get_url(image, metadata=bearer_metadata("t-image"), storage_id=key))
    no_token = await refused(get_url(image, metadata=(), storage_id=key))

    assert wrong_caller.code() == grpc.StatusCode.PERMISSION_DENIED
    assert no_token.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_job_methods_refuse_an_empty_request_naming_its_fields(image):
    unary = await refused(
        image.CreateGenerationJob(image_service_pb2.CreateGenerationJobRequest(user_id="u1"), metadata=GATEWAY)
    )
    stream = await refused(
        _drain(image.WatchGenerationJob(image_service_pb2.WatchGenerationJobRequest(job_id="j"), metadata=GATEWAY))
    )

    assert unary.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {"request_id", "prompt", "model", "num_images"} <= set(details_of(unary).fields)
    assert stream.code() == grpc.StatusCode.INVALID_ARGUMENT


async def _drain(stream) -> list:
    return [item async for item in stream]


async def test_public_endpoint_signs_urls_that_clients_reach(start_image, image_env, s3, s3_bucket, s3_server):
    async with TcpProxy(s3_server.host, s3_server.port) as public:
        image = await start_image(image_env(S3_PUBLIC_ENDPOINT_URL=public.url))
        key, data = await put_portrait(s3, s3_bucket)

        answer = await get_url(image, storage_id=key)

        assert answer.url.startswith(f"{public.url}/")
        async with httpx.AsyncClient() as http:
            response = await http.get(answer.url)
        assert response.status_code == 200 and response.content == data


async def test_s3_down_is_unavailable(start_image, image_env, s3, s3_bucket, s3_server):
    async with TcpProxy(s3_server.host, s3_server.port) as proxy:
        image = await start_image(image_env(S3_ENDPOINT_URL=proxy.url))
        key, _ = await put_portrait(s3, s3_bucket)
        await proxy.cut()

        error = await refused(get_url(image, storage_id=key))

        assert error.code() == grpc.StatusCode.UNAVAILABLE
        details = details_of(error)
        assert (details.reason, details.domain, details.retry_after_seconds) == (
            "DEPENDENCY_UNAVAILABLE", "image.casefile", 1.0
        )
