"""GetImageUrl's presigned URLs against a server that checks them: `rclone serve s3`.

moto checks neither the SigV4 signature nor the expiry of a presigned URL; rclone (the
S3 server of `make run`) checks both, so here a tampered or expired URL must be refused.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

import aiobotocore.session
import grpc
import httpx
import pytest
from aiobotocore.config import AioConfig

from casefile.image.v1 import image_service_pb2, image_service_pb2_grpc
from services.image.config import Config
from services.image.main import build
from shared.auth import bearer_metadata
from tests.fakes.recraft import make_png
from tools.infra import RcloneS3Server, free_port

pytestmark = pytest.mark.timeout(60)

ACCESS_KEY, SECRET_KEY = "presign-key", "presign-secret"
TOKENS = "admin:t-admin,gateway:t-gateway,story:t-story,image:t-image"
KEY = "portraits/2b1f0a4e-8f5c-4c55-9a43-1d8c9b7e6f10/1.png"


@pytest.fixture
def rclone(tmp_path, monkeypatch):
    server = RcloneS3Server(tmp_path / "s3", access_key=ACCESS_KEY, secret_key=SECRET_KEY).start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def image(rclone, aws_credentials, monkeypatch, database_url, nats_server):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)  # after aws_credentials set its own
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    env = {
        "IMAGE_ADDR": "127.0.0.1:0",
        "DATABASE_URL": database_url,
        "NATS_URL": nats_server.url,
        "S3_ENDPOINT_URL": rclone.endpoint_url,
        "S3_BUCKET": "casefile",
        "STORY_ADDR": f"127.0.0.1:{free_port()}",
        "AUTH_TOKENS": TOKENS,
    }
    async with contextlib.AsyncExitStack() as stack:
        server = await build(Config.from_env(env), stack)
        session = aiobotocore.session.get_session()
        s3 = await stack.enter_async_context(
            session.create_client(
                "s3", endpoint_url=rclone.endpoint_url, region_name="us-east-1",
                aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                config=AioConfig(signature_version="s3v4", s3={"addressing_style": "path"}),
            )
        )
        await s3.put_object(Bucket="casefile", Key=KEY, Body=make_png(16, 16), ContentType="image/png")
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        stack.push_async_callback(channel.close)
        yield image_service_pb2_grpc.ImageServiceStub(channel)


async def signed(image, expires_in_seconds: int = 0) -> image_service_pb2.GetImageUrlResponse:
    return await image.GetImageUrl(
        image_service_pb2.GetImageUrlRequest(storage_id=KEY, expires_in_seconds=expires_in_seconds),
        metadata=bearer_metadata("t-gateway"),
    )


def _tamper_signature(url: str) -> str:
    head, _, signature = url.partition("X-Amz-Signature=")
    flipped = ("0" if signature[0] != "0" else "1") + signature[1:]
    return f"{head}X-Amz-Signature={flipped}"


async def test_a_signed_url_opens_and_a_tampered_one_is_refused(image):
    url = (await signed(image)).url
    async with httpx.AsyncClient() as http:
        good = await http.get(url)
        other_key = await http.get(url.replace("/1.png?", "/2.png?"))
        longer = await http.get(url.replace("X-Amz-Expires=3600", "X-Amz-Expires=604800"))
        bad_signature = await http.get(_tamper_signature(url))
        unsigned = await http.get(url.split("?")[0])
    assert good.status_code == 200 and good.content.startswith(b"\x89PNG")
    for refused in (other_key, longer, bad_signature):
        assert refused.status_code == 403, refused.text
    assert unsigned.status_code in (400, 403)


async def test_an_expired_url_is_refused(image):
    # Long enough for the first GET to arrive in time on a loaded machine (a second was not).
    answer = await signed(image, expires_in_seconds=4)
    async with httpx.AsyncClient() as http:
        assert (await http.get(answer.url)).status_code == 200
        # The expiry is the thing under test: wait for the time the service named to pass.
        remaining = (answer.expire_time.ToDatetime(tzinfo=UTC) - datetime.now(UTC)).total_seconds()
        await asyncio.sleep(max(remaining, 0) + 1.1)
        expired = await http.get(answer.url)
    assert expired.status_code in (400, 403), expired.text
    assert "expired" in expired.text.lower() or "denied" in expired.text.lower()
